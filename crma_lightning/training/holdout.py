"""The ``validate`` and ``test`` subcommands: every task's holdout set with the current weights.

``train.py validate|test --ckpt_path ...``: one dataloader per task, each batch scored with its
task's adapters, per-task sums all-reduced by torchmetrics, logged as
``val/<task>/{loss,token_accuracy}`` (``test/...`` on the test split), and as ``val/<task>/accuracy``
where the task metric is token accuracy (exact match and ROUGE-L need generation: ``test --run``).
"""

from __future__ import annotations

from torch import Tensor, nn
from torchmetrics.aggregation import SumMetric

from crma_lightning.data import ContinualDataModule

SUMS = ("loss_sum", "tokens", "correct")


def holdout_sums(tasks: list[str]) -> nn.ModuleDict:
    """Per task, one summing metric per quantity of ``losses.TokenStats``."""
    return nn.ModuleDict({t: nn.ModuleDict({k: SumMetric() for k in SUMS}) for t in tasks})


class HoldoutSteps:
    """LightningModule steps for validate/test; the module provides ``task_names``, ``use_task``,
    ``token_stats``, ``log`` and ``holdout_sums`` (from :func:`holdout_sums`)."""

    def _eval_step(self, batch: dict[str, Tensor], dataloader_idx: int) -> None:
        task = self.task_names[dataloader_idx]
        self.use_task(task)
        s = self.token_stats(batch)
        for name in SUMS:
            self.holdout_sums[task][name].update(getattr(s, name))

    def _eval_epoch_end(self, prefix: str) -> None:
        for task, sums in self.holdout_sums.items():
            v = {name: metric.compute() for name, metric in sums.items()}
            tokens = v["tokens"].clamp_min(1)
            self.log(f"{prefix}/{task}/loss", v["loss_sum"] / tokens, add_dataloader_idx=False)
            accuracy = v["correct"] / tokens
            self.log(f"{prefix}/{task}/token_accuracy", accuracy, add_dataloader_idx=False)
            if self._task_metric(task) == "token_accuracy":
                self.log(f"{prefix}/{task}/accuracy", accuracy, add_dataloader_idx=False)
            for metric in sums.values():
                metric.reset()

    def _task_metric(self, task: str) -> str:
        dm = self.trainer.datamodule
        return dm.spec(task).task_metric if isinstance(dm, ContinualDataModule) else "token_accuracy"

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")
