"""Per-task learning-rate schedules: every task restarts its warm-up and decay.

A schedule is a pure function of (optimizer step within the task, steps in the task), wrapped by
:func:`per_task_lambda` into a ``LambdaLR`` over the global step, so it resumes exactly from any
checkpoint without extra state. Select one in YAML with
``class_path: crma_lightning.training.schedules.WarmupCosine``.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence


class TaskSchedule:
    """Learning-rate multiplier as a function of the step within the current task."""

    def factor(self, step: int, total: int) -> float:
        raise NotImplementedError


class Constant(TaskSchedule):
    """The base learning rate throughout, after an optional linear warm-up."""

    def __init__(self, warmup_steps: int = 0):
        """
        Args:
            warmup_steps: optimizer steps of linear warm-up at the start of every task.
        """
        self.warmup_steps = warmup_steps

    def factor(self, step: int, total: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        return 1.0


class _WarmupDecay(TaskSchedule):
    """Linear warm-up over ``warmup_ratio`` of each task, then :meth:`decay` from 1 to ``min_ratio``."""

    def __init__(self, warmup_ratio: float, min_ratio: float):
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"model.lr_schedule.warmup_ratio must lie in [0, 1), got {warmup_ratio}")
        if not 0 <= min_ratio <= 1:
            raise ValueError(f"model.lr_schedule.min_ratio must lie in [0, 1], got {min_ratio}")
        self.warmup_ratio = warmup_ratio
        self.min_ratio = min_ratio

    def decay(self, progress: float) -> float:
        """Fraction of the way from 1 (progress 0) to 0 (progress 1) still left."""
        raise NotImplementedError

    def factor(self, step: int, total: int) -> float:
        warmup = int(self.warmup_ratio * total)
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return self.min_ratio + (1 - self.min_ratio) * self.decay(progress)


class WarmupCosine(_WarmupDecay):
    """Linear warm-up, then cosine decay to ``min_ratio`` of the base rate, restarted per task."""

    def __init__(self, warmup_ratio: float = 0.1, min_ratio: float = 0.1):
        """
        Args:
            warmup_ratio: fraction of each task's optimizer steps spent warming up (0 <= x < 1).
            min_ratio: final learning rate of each task as a fraction of the base rate.
        """
        super().__init__(warmup_ratio, min_ratio)

    def decay(self, progress: float) -> float:
        return 0.5 * (1 + math.cos(math.pi * progress))


class WarmupLinear(_WarmupDecay):
    """Linear warm-up, then linear decay to ``min_ratio``, restarted per task."""

    def __init__(self, warmup_ratio: float = 0.1, min_ratio: float = 0.0):
        """
        Args:
            warmup_ratio: fraction of each task's optimizer steps spent warming up (0 <= x < 1).
            min_ratio: final learning rate of each task as a fraction of the base rate.
        """
        super().__init__(warmup_ratio, min_ratio)

    def decay(self, progress: float) -> float:
        return 1.0 - progress


def task_starts(task_steps: Sequence[int]) -> list[int]:
    """Global step at which each task starts, plus the total as a last entry."""
    starts = [0]
    for n in task_steps:
        starts.append(starts[-1] + n)
    return starts


def per_task_lambda(schedule: TaskSchedule, task_steps: Sequence[int]) -> Callable[[int], float]:
    """``LambdaLR`` multiplier over the global step for tasks of the given lengths (in steps).

    A plain function on purpose: ``LambdaLR.state_dict`` pickles callable *objects* into the
    checkpoint, which a ``weights_only=True`` load would then refuse.
    """
    starts = task_starts(task_steps)

    def multiplier(step: int) -> float:
        k = min(bisect.bisect_right(starts, step) - 1, len(starts) - 2)
        return schedule.factor(step - starts[k], starts[k + 1] - starts[k])

    return multiplier
