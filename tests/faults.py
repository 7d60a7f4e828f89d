"""Fault injection for the reliability tests: callbacks that SIGKILL their own process at a chosen
point. Loaded by the training subprocess through PYTHONPATH (tests/) and ``--trainer.callbacks+=``."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback

from callbacks.evaluation import ContinualEvaluation


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(Callback):
    """SIGKILL right after optimizer step ``step`` (mid-task)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            _die()


class KillAtEpochStart(Callback):
    """SIGKILL at the start of ``epoch``, after the callbacks listed before it ran (task-end work)."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            _die()


class KillDuringEvaluation(ContinualEvaluation):
    """ContinualEvaluation that dies after computing row ``row`` but before storing or writing it."""

    def __init__(self, row: int, **kwargs):
        super().__init__(**kwargs)
        self.row = row

    @property
    def state_key(self) -> str:
        return "ContinualEvaluation"  # the resumed run (plain ContinualEvaluation) reads this state

    def evaluate(self, trainer, pl_module):
        result = super().evaluate(trainer, pl_module)
        if len(self.loss_rows) == self.row:
            _die()
        return result
