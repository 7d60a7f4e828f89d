"""Fault injection for the reliability tests: callbacks that SIGKILL their own process at a chosen
point. Loaded by the training subprocess through PYTHONPATH (tests/) and ``--trainer.callbacks``;
they run after the method's callbacks, which ``train.py`` adds first."""

from __future__ import annotations

import os
import signal

from lightning.pytorch.callbacks import Callback


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


class KillDuringEvaluation(Callback):
    """Makes the run's evaluation callback die after computing row ``row`` but before storing or
    writing it (its ``evaluate`` is wrapped at setup: a test-only patch of one instance)."""

    def __init__(self, row: int):
        self.row = row

    def setup(self, trainer, pl_module, stage: str) -> None:
        evaluation = next(c for c in trainer.callbacks if getattr(c, "role", None) == "evaluation")
        evaluate = evaluation.evaluate

        def dying_evaluate(trainer, pl_module):
            result = evaluate(trainer, pl_module)
            if len(evaluation.loss_rows) == self.row:
                _die()
            return result

        evaluation.evaluate = dying_evaluate


class NaNAt(Callback):
    """Makes the gradient (or, via a forward hook, the loss) non-finite at optimizer step ``step``."""

    def __init__(self, step: int, where: str):
        self.step, self.where, self.handle = step, where, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.where == "loss" and trainer.global_step == self.step:

            def poison(module, args, out):
                out.logits.mul_(float("nan"))

            self.handle = pl_module.model.register_forward_hook(poison)

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def on_after_backward(self, trainer, pl_module):
        if self.where == "grad" and trainer.global_step == self.step:
            next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(float("inf"))
