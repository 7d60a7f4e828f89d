"""Gradient-norm statistics per task: the peak and mean of ``train/grad_norm`` over each task's steps.

The authors report that plain LoRA shows gradient-norm spikes that CRMA removes (docs/method.md §3);
this makes the comparison a number per task. The per-step norm is the one the module logs as
``train/grad_norm`` (the global norm of all trainable adapter gradients, after the all-reduce and
before clipping). At each task end the task's ``max``, ``mean``, ``steps`` and the step of the peak
are logged as ``grad_norm/<task>/{max,mean}`` and written to ``<run dir>/continual/grad_norm.json``
(atomically, rank 0). The statistics are resumable state.
"""

from __future__ import annotations

import lightning.pytorch as pl

from callbacks.boundary import TaskBoundaryCallback, run_dir
from crma_lightning.atomic import atomic_write_json
from crma_lightning.protocols import as_continual

METRIC = "train/grad_norm"


class GradNormStats(TaskBoundaryCallback):
    """Per-task max and mean of the logged gradient norm."""

    def __init__(self) -> None:
        super().__init__()
        self.stats: dict[str, dict[str, float]] = {}
        self._last_step = 0
        self._skipped = 0

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int
    ) -> None:
        # Only batches that ended with an optimizer step (not accumulation steps) have a new norm;
        # a skipped non-finite step logs none, and the value it would have left behind is stale.
        step = trainer.global_step
        if step == self._last_step:
            return
        self._last_step = step
        skipped = as_continual(pl_module).nonfinite_skipped
        norm = trainer.callback_metrics.get(METRIC)
        if norm is None or skipped != self._skipped:
            self._skipped = skipped
            return
        dm = trainer.datamodule
        task = dm.task_names[dm.task_index_at_epoch(trainer.current_epoch)]
        value = float(norm)
        s = self.stats.setdefault(task, {"max": value, "sum": 0.0, "steps": 0, "max_step": step})
        if value > s["max"]:
            s["max"], s["max_step"] = value, step
        s["sum"] += value
        s["steps"] += 1

    def summary(self) -> dict[str, dict[str, float]]:
        """{task: {max, mean, steps, max_step}} for the tasks seen so far."""
        return {
            task: {
                "max": s["max"],
                "mean": s["sum"] / max(s["steps"], 1),
                "steps": s["steps"],
                "max_step": s["max_step"],
            }
            for task, s in self.stats.items()
        }

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task_index: int) -> None:
        out = run_dir(trainer).grad_norm_file  # on every rank: a collective
        task = trainer.datamodule.task_names[task_index]
        summary = self.summary()
        if task in summary:
            for logger in trainer.loggers:
                logger.log_metrics(
                    {
                        f"grad_norm/{task}/max": summary[task]["max"],
                        f"grad_norm/{task}/mean": summary[task]["mean"],
                    },
                    step=task_index + 1,
                )
        if trainer.is_global_zero:
            atomic_write_json(out, summary)

    def state_dict(self) -> dict:
        return super().state_dict() | {
            "stats": {k: dict(v) for k, v in self.stats.items()},
            "last_step": self._last_step,
            "skipped": self._skipped,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.stats = {k: dict(v) for k, v in state_dict["stats"].items()}
        self._last_step = state_dict["last_step"]
        self._skipped = state_dict["skipped"]
