"""Evaluate every task's holdout set before training and after each task: the matrices L and A.

Row ``base`` is the model before any training; row ``<task k>`` is after training task k. Every
row covers all tasks (later ones too, for forward transfer). Task i is evaluated with its own LoRA
(the shared one under NAIVE) and, in MODULAR, the current CRMA. Each rank evaluates a disjoint
shard of every holdout set and the per-task sums (loss, tokens, correct) are all-reduced, so the
result equals a single-process evaluation. After each row the matrices, the summary metrics of
method.md §4 and heatmaps are written to ``<run dir>/continual/`` (atomically: a crash keeps the
last complete row) and logged as ``val/<task>/loss``, ``val/<task>/accuracy``, ``cl/*`` at
step = number of tasks trained.
"""

from __future__ import annotations

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.boundary import TaskBoundaryCallback, run_dir
from callbacks.spectral import SpectralBoundLogger
from crma_lightning import metrics as clm
from crma_lightning.config import ConfigError
from crma_lightning.report import BASE_ROW, heatmap_figure, save_figure, table, write_report


class ContinualEvaluation(TaskBoundaryCallback):
    """Holdout loss and token accuracy on every task, before training and after each task."""

    def __init__(self, batch_size: int | None = None, print_table: bool = True):
        """
        Args:
            batch_size: evaluation batch size (default: data.eval_batch_size).
            print_table: print the matrices and summary at the end of training (rank 0).
        """
        super().__init__()
        self.batch_size = batch_size
        self.print_table = print_table
        self.loss_rows: dict[str, list[float]] = {}
        self.acc_rows: dict[str, list[float]] = {}

    # -- evaluation ----------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[list[float], list[float]]:
        dm = trainer.datamodule
        training_task = dm.task_names[min(dm.task_index_at_epoch(trainer.current_epoch), dm.num_tasks - 1)]
        was_training = pl_module.training
        pl_module.eval()
        sums = torch.zeros(dm.num_tasks, 3, dtype=torch.float64, device=pl_module.device)  # (T, [loss, tokens, correct])
        try:
            with trainer.precision_plugin.forward_context():
                for i, task in enumerate(dm.task_names):
                    pl_module.use_task(task)
                    for batch in dm.holdout_batches(task, trainer.global_rank, trainer.world_size, self.batch_size):
                        batch = {k: v.to(pl_module.device) for k, v in batch.items()}
                        s = pl_module.token_stats(batch)
                        sums[i] += torch.stack([s.loss_sum, s.tokens, s.correct]).double()
        finally:
            pl_module.use_task(training_task)
            pl_module.train(was_training)
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        tokens = sums[:, 1].clamp_min(1)
        return (sums[:, 0] / tokens).tolist(), (sums[:, 2] / tokens).tolist()

    def _add_row(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
        loss, acc = self.evaluate(trainer, pl_module)
        self.loss_rows[name] = loss
        self.acc_rows[name] = acc
        self._publish(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if BASE_ROW not in self.loss_rows:
            if trainer.global_step > 0:
                # Resumed without this callback's state: the base row can no longer be measured.
                raise ConfigError(
                    "the checkpoint has no ContinualEvaluation state (was the callback missing or renamed?); "
                    "the base-model row cannot be recomputed after training. Resume with the same callbacks."
                )
            self._add_row(trainer, pl_module, BASE_ROW)
        super().on_train_start(trainer, pl_module)

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task_index: int) -> None:
        self._add_row(trainer, pl_module, trainer.datamodule.task_names[task_index])

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if self.print_table and trainer.is_global_zero and self.loss_rows:
            print(self.render(trainer, pl_module), flush=True)

    # -- results -------------------------------------------------------------------------
    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        return np.array(list(self.loss_rows.values())), np.array(list(self.acc_rows.values()))

    def summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        dm = trainer.datamodule
        tasks = list(dm.task_names)
        loss, acc = self.matrices()
        done = loss.shape[0] - 1  # rows after the base row
        spectral = next((c for c in trainer.callbacks if isinstance(c, SpectralBoundLogger)), None)
        has_crma = getattr(pl_module, "crma", None) is not None
        out = {
            "strategy": pl_module.strategy,
            "tasks": tasks,
            "tasks_completed": done,
            "seed": getattr(dm, "seed", None),
            "base_model": pl_module.backbone_config.label,
            "drift_pct": None,
            "bwt": None,
            "fwt": None,
            "forgetting": None,
            "final_avg_loss": None,
            "final_avg_accuracy": None,
            "spectral_max_sigma": spectral.max_sigma if (has_crma and spectral) else None,
            "spectral_max_row_col_err": spectral.max_row_col_err if (has_crma and spectral) else None,
        }
        if done >= 1:
            # Metrics over the tasks trained so far: rows 0..done, columns 0..done-1.
            out |= clm.summarize(loss[: done + 1, :done], acc[: done + 1, :done])
        return out

    def _publish(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out_dir = run_dir(trainer) / "continual"  # on every rank: a collective
        if not trainer.is_global_zero:
            return
        tasks = list(trainer.datamodule.task_names)
        step = len(self.loss_rows) - 1
        summary = self.summary(trainer, pl_module)
        write_report(out_dir, tasks, self.loss_rows, self.acc_rows, summary)
        loss, acc = self.matrices()
        figures = {
            "loss_matrix": heatmap_figure(loss, list(self.loss_rows), tasks, "holdout loss L[after, task] (lower is better)", "viridis_r"),
            "accuracy_matrix": heatmap_figure(acc, list(self.acc_rows), tasks, "token accuracy A[after, task]", "viridis"),
        }
        for name, fig in figures.items():
            save_figure(fig, out_dir / f"{name}.png")
        scalars = {f"val/{t}/loss": v for t, v in zip(tasks, loss[-1], strict=True)}
        scalars |= {f"val/{t}/accuracy": v for t, v in zip(tasks, acc[-1], strict=True)}
        scalars |= {f"cl/{k}": v for k, v in summary.items() if k in CL_SCALARS and v is not None}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            # Images have no logger-neutral API in Lightning; TensorBoard is the product's viewer.
            if isinstance(logger, TensorBoardLogger):
                for name, fig in figures.items():
                    logger.experiment.add_figure(f"continual/{name}", fig, global_step=step, close=False)
        import matplotlib.pyplot as plt

        for fig in figures.values():
            plt.close(fig)

    def render(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        tasks = list(trainer.datamodule.task_names)
        s = self.summary(trainer, pl_module)
        fmt = {k: ("n/a" if v is None else f"{v:+.3f}" if k in ("drift_pct", "bwt", "fwt") else f"{v:.4g}") for k, v in s.items() if k in CL_SCALARS}
        return "\n".join(
            [
                "",
                table(self.loss_rows, tasks, f"holdout loss ({s['strategy']}; rows: after training, columns: task)"),
                "",
                table(self.acc_rows, tasks, "token accuracy"),
                "",
                "  ".join(f"{k}={v}" for k, v in fmt.items()),
            ]
        )

    # -- resumable state ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        return super().state_dict() | {"loss_rows": dict(self.loss_rows), "acc_rows": dict(self.acc_rows)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.loss_rows = dict(state_dict["loss_rows"])
        self.acc_rows = dict(state_dict["acc_rows"])


CL_SCALARS = ("drift_pct", "bwt", "fwt", "forgetting", "final_avg_loss", "final_avg_accuracy", "spectral_max_sigma", "spectral_max_row_col_err")
