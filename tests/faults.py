"""Fault injection for the reliability tests: callbacks that SIGKILL their own process at a chosen
point. Loaded by the training subprocess through PYTHONPATH (tests/) and ``--trainer.callbacks``;
they run after the method's callbacks, which ``train.py`` adds first."""

from __future__ import annotations

import os
import signal

import torch
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

        def dying_evaluate(trainer, pl_module, *args, **kwargs):
            result = evaluate(trainer, pl_module, *args, **kwargs)
            if len(evaluation.loss_rows) == self.row:
                _die()
            return result

        evaluation.evaluate = dying_evaluate


class NaNAt(Callback):
    """Makes the gradient (or, via a forward hook, the loss) non-finite at optimizer step ``step``,
    on rank ``rank`` only (every rank when None)."""

    def __init__(self, step: int, where: str, rank: int | None = None):
        self.step, self.where, self.rank, self.handle = step, where, rank, None

    def _here(self, trainer) -> bool:
        return trainer.global_step == self.step and self.rank in (None, trainer.global_rank)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.where == "loss" and self._here(trainer):

            def poison(module, args, out):
                out.logits.mul_(float("nan"))

            self.handle = pl_module.model.register_forward_hook(poison)

    def on_train_batch_end(self, trainer, pl_module, *args):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def on_after_backward(self, trainer, pl_module):
        if self.where == "grad" and self._here(trainer):
            next(p for p in pl_module.parameters() if p.grad is not None).grad.fill_(float("inf"))


class KillInsideShardedSave(Callback):
    """SIGKILLs every rank inside sharded checkpoint save number ``save`` (1-based), after the DCP
    shards are written but before the save returns: a job killed while writing a checkpoint."""

    def __init__(self, save: int):
        self.save = save

    def setup(self, trainer, pl_module, stage: str) -> None:
        import lightning.pytorch.strategies.model_parallel as mp

        write, count = mp._distributed_checkpoint_save, [0]

        def dying_write(state, path):
            write(state, path)
            count[0] += 1
            if count[0] == self.save:
                _die()

        mp._distributed_checkpoint_save = dying_write


class PerturbOnRank(Callback):
    """After optimizer step ``step``, moves one trainable adapter weight on rank ``rank`` only: the
    replicas diverge, as they would if a parameter were left out of the gradient all-reduce."""

    def __init__(self, step: int, rank: int = 1):
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, pl_module, *args):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad).add_(1e-3)


class ExitCodeAtEnd(Callback):
    """On rank ``rank``, makes the process's final ``os._exit`` (``dist.end_distributed_run``, after
    a successful fit and the process group's shutdown) exit with ``code``: a rank that fails after
    every collective is done, which Lightning's launcher would not notice."""

    def __init__(self, rank: int = 1, code: int = 3):
        self.rank, self.code = rank, code

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if trainer.global_rank == self.rank:
            real_exit = os._exit
            os._exit = lambda _code: real_exit(self.code)
