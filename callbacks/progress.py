"""A progress bar that says which task is running: ``task 2/5 legal``."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar


class TaskProgressBar(TQDMProgressBar):
    """TQDM progress bar whose training description names the current task."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        dm = trainer.datamodule
        k = dm.task_index_at_epoch(trainer.current_epoch)
        desc = f"task {k + 1}/{dm.num_tasks} {dm.task_names[k]}"
        if dm.epochs_per_task > 1:
            desc += f" (epoch {trainer.current_epoch % dm.epochs_per_task + 1}/{dm.epochs_per_task})"
        self.train_progress_bar.set_description(desc)
