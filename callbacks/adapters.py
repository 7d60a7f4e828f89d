"""Save each task's adapters when the task ends: ``adapters/<task>/`` (PEFT) and ``adapters/crma/``.

``adapters/<task>/`` holds the LoRA used for that task (under NAIVE, the shared LoRA as it was at
the end of the task) in PEFT's format; ``adapters/crma/`` the latest CRMA state (safetensors +
JSON), rewritten after every task. Written by rank 0, atomically.
"""

from __future__ import annotations

import lightning.pytorch as pl

from callbacks.boundary import TaskBoundaryCallback, run_dir
from crma_lightning.checkpoint import save_crma, save_lora


class AdapterCheckpoint(TaskBoundaryCallback):
    """Writes the adapters of every completed task into ``<run dir>/<dirname>/``."""

    def __init__(self, dirname: str = "adapters"):
        """
        Args:
            dirname: folder inside the run directory.
        """
        super().__init__()
        self.dirname = dirname

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task_index: int) -> None:
        root = run_dir(trainer) / self.dirname  # on every rank: a collective
        if not trainer.is_global_zero:
            return
        task = trainer.datamodule.task_names[task_index]
        save_lora(pl_module.model, pl_module.adapter_for(task), root / task)
        if pl_module.crma is not None:
            save_crma(
                pl_module.crma,
                root / "crma",
                extra={"after_task": task, "strategy": pl_module.strategy, "tasks": list(pl_module.task_names)},
            )
