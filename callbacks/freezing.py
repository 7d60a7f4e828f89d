"""Per-task freezing policy (method.md §2): what trains during each task, for each strategy.

| strategy | trains during task k                 |
|----------|--------------------------------------|
| naive    | the shared LoRA                      |
| frozen   | LoRA_k                               |
| modular  | LoRA_k and every CRMA parameter      |

The base model never trains. Applied at train start and at every epoch start (idempotent; a run
resumed mid-epoch gets no epoch-start hook, so the train-start call is what restores its set); parameters outside the set get ``requires_grad=False`` and hence no gradient,
which the optimizer skips entirely (no weight decay, no momentum): frozen stays bit-identical.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

POLICY: dict[str, tuple[str, ...]] = {"naive": ("lora",), "frozen": ("lora",), "modular": ("lora", "crma")}


class FreezingPolicy(Callback):
    """Sets the trainable parameters for the current task from the module's adapter contract."""

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.on_train_epoch_start(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dm = trainer.datamodule
        task = dm.task_names[min(dm.task_index_at_epoch(trainer.current_epoch), dm.num_tasks - 1)]
        self.apply(pl_module, task)

    @staticmethod
    def apply(pl_module: pl.LightningModule, task: str) -> None:
        trainable = [p for kind in POLICY[pl_module.strategy] for p in pl_module.adapter_parameters(kind, task)]
        for p in pl_module.parameters():
            p.requires_grad_(False)
        for p in trainable:
            p.requires_grad_(True)
        pl_module.use_task(task)
