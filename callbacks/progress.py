"""A progress bar that says which task is running: ``task 2/5 legal (epoch 1/2)``."""

from __future__ import annotations

import sys
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf

from crma_lightning.core.clock import TaskClock


def task_description(trainer: pl.Trainer) -> str:
    clock = TaskClock.of(trainer)
    k = clock.task_index(trainer.current_epoch)
    desc = f"task {k + 1}/{clock.num_tasks} {clock.task_names[k]}"
    if clock.epochs_per_task > 1:
        desc += f" (epoch {clock.epoch_in_task(trainer.current_epoch) + 1}/{clock.epochs_per_task})"
    return desc


class TaskProgressBar(TQDMProgressBar):
    """TQDM progress bar named by the current task; it shows no Lightning epoch or logger version."""

    def __init__(self, refresh_rate: int = 1, process_position: int = 0, leave: bool = False):
        super().__init__(refresh_rate, process_position, leave)
        self._description = "training"

    @property
    def train_description(self) -> str:
        return self._description

    def init_train_tqdm(self) -> Tqdm:
        # As Lightning's, with the task's length, so the bar is never drawn as "0/?".
        return Tqdm(
            desc=self.train_description,
            total=convert_inf(self.total_train_batches),
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_start(self, trainer: pl.Trainer, *_: Any) -> None:
        # Named here too: a run resumed mid-epoch gets no on_train_epoch_start for that epoch.
        self._description = task_description(trainer)
        self.train_progress_bar = self.init_train_tqdm()

    def on_train_epoch_start(self, trainer: pl.Trainer, *_: Any) -> None:
        self._description = task_description(trainer)
        if self._leave:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.set_description(self._description, refresh=False)
        bar.reset(convert_inf(self.total_train_batches))
        bar.initial = 0

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, int | str | float]:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)  # the run dir is printed at the end
        return items
