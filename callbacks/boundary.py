"""Task-boundary events for callbacks, robust to resume.

Callbacks that act at task ends (evaluate, save adapters) subclass :class:`TaskBoundaryCallback`
and implement :meth:`on_task_end`.
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from crma_lightning.core.clock import TaskClock
from crma_lightning.runs.rundir import RunDir


def run_dir(trainer: pl.Trainer) -> RunDir:
    """The run directory (the logger's log dir). A collective: ``Trainer.log_dir`` broadcasts from
    rank 0, so call it on every rank, never inside a rank-0-only branch (that deadlocks DDP)."""
    return RunDir(trainer.log_dir or trainer.default_root_dir)


class TaskBoundaryCallback(Callback):
    """Calls :meth:`on_task_end` once for every completed task; the progress is resumable state.

    A task is complete once the epoch after its last one has started (or training has ended after
    it). ``on_task_end`` runs once per completed task, in order, at the first train start, epoch start
    or train end that sees the task complete.
    """

    def __init__(self) -> None:
        self.tasks_done: list[str] = []

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task_index: int) -> None:
        raise NotImplementedError

    @staticmethod
    def completed_tasks(trainer: pl.Trainer) -> int:
        return TaskClock.of(trainer).completed(trainer.current_epoch)

    def _catch_up(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        names = trainer.datamodule.task_names
        for k in range(self.completed_tasks(trainer)):
            if names[k] not in self.tasks_done:
                self.on_task_end(trainer, pl_module, k)
                self.tasks_done.append(names[k])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._catch_up(trainer, pl_module)

    def state_dict(self) -> dict:
        return {"tasks_done": list(self.tasks_done)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.tasks_done = list(state_dict["tasks_done"])
