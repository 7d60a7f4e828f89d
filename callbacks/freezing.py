"""Per-task freezing policy: what trains during each task (the table is ``crma_lightning.methods.layouts``).

Applied at train start and at every epoch start (idempotent). Parameters outside the set get
``requires_grad=False``: the optimizer skips them entirely, so a frozen adapter stays bit-identical.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from crma_lightning.core.clock import TaskClock
from crma_lightning.methods.protocol import ContinualModule, as_continual


class FreezingPolicy(Callback):
    """Sets the trainable parameters for the current task from the module's adapter layout."""

    role = "freezing"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        task = TaskClock.of(trainer).task(trainer.current_epoch)
        self.apply(as_continual(pl_module), task)

    @staticmethod
    def apply(module: ContinualModule, task: str) -> None:
        trainable = module.trainable_parameters(task)
        for p in module.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        module.use_task(task)
