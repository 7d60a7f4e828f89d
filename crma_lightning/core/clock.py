"""The task clock: which task an epoch trains, and how many tasks are complete. Task ``k`` trains
during epochs ``[k * epochs_per_task, (k + 1) * epochs_per_task)``; every module asks this class."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskClock:
    task_names: tuple[str, ...]
    epochs_per_task: int

    @classmethod
    def of(cls, trainer: Any) -> TaskClock:
        """The clock of a trainer's continual DataModule."""
        return trainer.datamodule.clock

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    def task_index(self, epoch: int) -> int:
        """The task trained during ``epoch`` (the last task for epochs past the end)."""
        return min(epoch // self.epochs_per_task, self.num_tasks - 1)

    def task(self, epoch: int) -> str:
        return self.task_names[self.task_index(epoch)]

    def completed(self, epoch: int) -> int:
        """Tasks complete once ``epoch`` has started (all of them after the last epoch)."""
        return min(epoch // self.epochs_per_task, self.num_tasks)

    def epoch_in_task(self, epoch: int) -> int:
        return epoch % self.epochs_per_task
