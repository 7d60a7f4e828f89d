"""Evaluate every task's holdout set before training and after each task: the matrices L and A.

Row ``base`` is the model before any training; row ``<task k>`` is after training task k. Every
row covers all tasks (later ones too, for forward transfer). Task i is evaluated with its own LoRA
(the shared one under NAIVE) and, in MODULAR, the current CRMA. Each rank evaluates a disjoint
shard of every holdout set and the per-task sums (loss, tokens, correct) are all-reduced, so the
result equals a single-process evaluation. After each row the matrices, the summary metrics of
docs/method.md §4 and heatmaps are written to the run directory's ``continual/`` (atomically: a
crash keeps the last complete row) and logged as ``val/<task>/loss``, ``val/<task>/accuracy``,
``cl/*`` at step = number of tasks trained.
"""

from __future__ import annotations

import gc

import lightning.pytorch as pl
import numpy as np
import torch

from callbacks.boundary import TaskBoundaryCallback, run_dir
from crma_lightning import metrics as clm
from crma_lightning.config import ConfigError
from crma_lightning.protocols import ContinualModule, as_continual
from crma_lightning.report import heatmap_figure, pyplot, save_figure, table
from crma_lightning.rundir import ACCURACY_MATRIX, BASE_ROW, LOSS_MATRIX

CL_SCALARS = (
    "drift_pct",
    "bwt",
    "fwt",
    "forgetting",
    "final_avg_loss",
    "final_avg_accuracy",
    "spectral_max_sigma",
    "spectral_max_row_col_err",
)
"""Summary values also logged as ``cl/<name>`` scalars."""


class ContinualEvaluation(TaskBoundaryCallback):
    """Holdout loss and token accuracy on every task, before training and after each task."""

    role = "evaluation"

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
        module = as_continual(pl_module)
        dm = trainer.datamodule
        training_task = dm.task_names[min(dm.task_index_at_epoch(trainer.current_epoch), dm.num_tasks - 1)]
        was_training = pl_module.training
        pl_module.eval()
        sums = torch.zeros(dm.num_tasks, 3, dtype=torch.float64, device=pl_module.device)  # (T, [loss, tokens, correct])
        try:
            with trainer.precision_plugin.forward_context():
                for i, task in enumerate(dm.task_names):
                    module.use_task(task)
                    for batch in dm.holdout_batches(task, trainer.global_rank, trainer.world_size, self.batch_size):
                        batch = {k: v.to(pl_module.device) for k, v in batch.items()}
                        s = module.token_stats(batch)
                        sums[i] += torch.stack([s.loss_sum, s.tokens, s.correct]).double()
        finally:
            module.use_task(training_task)
            pl_module.train(was_training)
        sums = trainer.strategy.reduce(sums, reduce_op="sum")
        tokens = sums[:, 1].clamp_min(1)
        return (sums[:, 0] / tokens).tolist(), (sums[:, 2] / tokens).tolist()

    def _add_row(self, trainer: pl.Trainer, pl_module: pl.LightningModule, name: str) -> None:
        loss, acc = self.evaluate(trainer, pl_module)
        self.loss_rows[name] = loss
        self.acc_rows[name] = acc
        self._publish(trainer, as_continual(pl_module))

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
            print(self.render(trainer, as_continual(pl_module)), flush=True)

    # -- results -------------------------------------------------------------------------
    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        return np.array(list(self.loss_rows.values())), np.array(list(self.acc_rows.values()))

    def summary(self, trainer: pl.Trainer, module: ContinualModule) -> dict:
        dm = trainer.datamodule
        loss, acc = self.matrices()
        done = loss.shape[0] - 1  # rows after the base row
        has_crma = module.crma is not None
        out = {
            "strategy": module.strategy,
            "tasks": list(dm.task_names),
            "tasks_completed": done,
            "seed": getattr(dm, "seed", None),
            "base_model": module.backbone_config.label,
            "drift_pct": None,
            "bwt": None,
            "fwt": None,
            "forgetting": None,
            "final_avg_loss": None,
            "final_avg_accuracy": None,
            # Reported by the spectral callback, when it runs (and only meaningful with CRMA).
            "spectral_max_sigma": module.run_facts.get("spectral_max_sigma") if has_crma else None,
            "spectral_max_row_col_err": module.run_facts.get("spectral_max_row_col_err") if has_crma else None,
        }
        if done >= 1:
            # Metrics over the tasks trained so far: rows 0..done, columns 0..done-1.
            out |= clm.summarize(loss[: done + 1, :done], acc[: done + 1, :done])
        return out

    def _publish(self, trainer: pl.Trainer, module: ContinualModule) -> None:
        out = run_dir(trainer)  # on every rank: a collective
        if not trainer.is_global_zero:
            return
        tasks = list(trainer.datamodule.task_names)
        step = len(self.loss_rows) - 1
        summary = self.summary(trainer, module)
        out.write_matrices(tasks, {LOSS_MATRIX: self.loss_rows, ACCURACY_MATRIX: self.acc_rows}, summary)
        loss, acc = self.matrices()
        figures = {
            LOSS_MATRIX: heatmap_figure(loss, list(self.loss_rows), tasks, "holdout loss L[after, task] (lower is better)", "viridis_r"),
            ACCURACY_MATRIX: heatmap_figure(acc, list(self.acc_rows), tasks, "token accuracy A[after, task]", "viridis"),
        }  # fmt: skip
        for name, fig in figures.items():
            save_figure(fig, out.figure_file(name))
        scalars = {f"val/{t}/loss": v for t, v in zip(tasks, loss[-1], strict=True)}
        scalars |= {f"val/{t}/accuracy": v for t, v in zip(tasks, acc[-1], strict=True)}
        scalars |= {f"cl/{k}": v for k, v in summary.items() if k in CL_SCALARS and v is not None}
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            # Lightning has no logger-neutral image API; loggers whose writer takes figures
            # (TensorBoard's SummaryWriter) get them.
            add_figure = getattr(logger.experiment, "add_figure", None)
            if add_figure is not None:
                for name, fig in figures.items():
                    add_figure(f"continual/{name}", fig, global_step=step, close=False)
        for fig in figures.values():
            pyplot().close(fig)
        # A figure is a web of reference cycles holding its (tasks x tasks) pixel buffer; collect it
        # now rather than when the cyclic collector gets to it (memory would pile up over tasks).
        gc.collect()

    def render(self, trainer: pl.Trainer, module: ContinualModule) -> str:
        tasks = list(trainer.datamodule.task_names)
        s = self.summary(trainer, module)
        fmt = {
            k: ("n/a" if v is None else f"{v:+.3f}" if k in ("drift_pct", "bwt", "fwt") else f"{v:.4g}")
            for k, v in s.items()
            if k in CL_SCALARS
        }
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
