"""Gradient-norm statistics per task and per parameter group: the peak and mean of the logged norms.

Per task, of ``train/grad_norm`` (all trainable adapters), ``train/grad_norm/lora`` and, with CRMA,
``train/grad_norm/crma`` (``ContinualLM.gradient_norms``: global, before any clipping); logged as
``grad_norm/<task>/...`` and written to ``continual/grad_norm.json``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from crma_lightning.callbacks.boundary import TaskBoundaryCallback, run_dir

from crma_lightning.core.atomic import atomic_write_json
from crma_lightning.core.clock import TaskClock
from crma_lightning.methods.protocol import as_continual

METRIC = "train/grad_norm"
#: Group name in grad_norm.json -> the metric the module logs.
GROUPS = {"total": METRIC, "lora": f"{METRIC}/lora", "crma": f"{METRIC}/crma"}
#: Logged by crma_lightning.callbacks.zclip.ZClip: 1.0 on a step it clipped.
CLIPPED = "zclip/clipped"


class GradNormStats(TaskBoundaryCallback):
    """Per-task max and mean of each logged gradient norm (total, LoRA, CRMA).

    At each task end the task's statistics are logged as ``grad_norm/<task>/{max,mean}`` (the total),
    ``grad_norm/<task>/<group>/{max,mean}`` and written to ``<run dir>/continual/grad_norm.json``
    (atomically, rank 0)::

        {task: {max, mean, steps, max_step,           # the total, as before the groups existed
                lora: {max, mean, max_step}, crma: {max, mean, max_step},   # crma only with CRMA
                clipped: n}}                          # steps ZClip clipped (only with ZClip on)

    The statistics are resumable state.
    """

    def __init__(self) -> None:
        super().__init__()
        # task -> group -> {max, sum, steps, max_step}; task -> "clipped" -> count
        self.stats: dict[str, dict[str, dict[str, float]]] = {}
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
        metrics = trainer.callback_metrics
        if METRIC not in metrics or skipped != self._skipped:
            self._skipped = skipped
            return
        names = [g for g, m in GROUPS.items() if m in metrics]
        keys = [GROUPS[g] for g in names] + ([CLIPPED] if CLIPPED in metrics else [])
        device = metrics[METRIC].device
        values = torch.stack(
            [metrics[k].detach().float().reshape(()).to(device) for k in keys]
        ).tolist()  # one sync
        task = TaskClock.of(trainer).task(trainer.current_epoch)
        per_task = self.stats.setdefault(task, {})
        for group, value in zip(names, values, strict=False):
            s = per_task.setdefault(group, {"max": value, "sum": 0.0, "steps": 0, "max_step": step})
            if value > s["max"]:
                s["max"], s["max_step"] = value, step
            s["sum"] += value
            s["steps"] += 1
        if CLIPPED in metrics:
            clipped = per_task.setdefault("clipped", {"count": 0})
            clipped["count"] += int(values[-1] > 0)

    @staticmethod
    def _group_summary(s: dict[str, float]) -> dict[str, float]:
        return {"max": s["max"], "mean": s["sum"] / max(s["steps"], 1), "max_step": s["max_step"]}

    def summary(self) -> dict[str, dict]:
        """{task: {max, mean, steps, max_step, lora: {...}, crma: {...}, clipped}} for the tasks seen."""
        out: dict[str, dict] = {}
        for task, per_task in self.stats.items():
            total = per_task["total"]
            entry: dict = {**self._group_summary(total), "steps": total["steps"]}
            for group in ("lora", "crma"):
                if group in per_task:
                    entry[group] = self._group_summary(per_task[group])
            if "clipped" in per_task:
                entry["clipped"] = per_task["clipped"]["count"]
            out[task] = entry
        return out

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task_index: int) -> None:
        out = run_dir(trainer).grad_norm_file  # on every rank: a collective
        task = trainer.datamodule.task_names[task_index]
        summary = self.summary()
        if task in summary:
            s = summary[task]
            metrics = {f"grad_norm/{task}/max": s["max"], f"grad_norm/{task}/mean": s["mean"]}
            for group in ("lora", "crma"):
                if group in s:
                    metrics |= {
                        f"grad_norm/{task}/{group}/max": s[group]["max"],
                        f"grad_norm/{task}/{group}/mean": s[group]["mean"],
                    }
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=task_index + 1)
        if trainer.is_global_zero:
            atomic_write_json(out, summary)

    def state_dict(self) -> dict:
        return super().state_dict() | {
            "stats": {t: {g: dict(s) for g, s in per.items()} for t, per in self.stats.items()},
            "last_step": self._last_step,
            "skipped": self._skipped,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        # Checkpoints from before the groups kept one {max, sum, steps, max_step} per task: the total.
        self.stats = {
            t: {"total": dict(per)} if "max" in per else {g: dict(s) for g, s in per.items()}
            for t, per in state_dict["stats"].items()
        }
        self._last_step = state_dict["last_step"]
        self._skipped = state_dict["skipped"]
