"""Experience replay: examples of finished tasks mixed into later tasks' batches (``data.replay``).

The buffer after k finished tasks (``per_task`` examples of each, or a ``memory`` filled evenly or
by reservoir sampling) is a pure function of the seed, the tasks' training-set sizes and the
settings; each batch of task k > 0 holds ``round(ratio * batch_size)`` buffer examples, drawn per
global batch from ``(seed, epoch, batch)`` (docs/baselines.md, "What each part does, exactly").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from crma_lightning.core.errors import type_problems
from crma_lightning.data.loading import ShardedBatchSampler


@dataclass
class Replay:
    """Replay of finished tasks' training examples (``data.replay``)."""

    ratio: float = 0.25
    """Share of every training batch (after the first task) drawn from the buffer, in [0, 1)."""
    per_task: int | None = 32
    """Examples kept from each finished task (set ``memory`` instead for a total size)."""
    memory: int | None = None
    """Total buffer size over all finished tasks (instead of ``per_task``)."""
    sampling: Literal["uniform", "reservoir"] = "uniform"
    """How a ``memory``-sized buffer is filled: ``uniform``, split evenly over the finished tasks
    (each task's share a prefix of a seeded permutation, so shares only shrink as tasks are added);
    ``reservoir``, reservoir sampling (Vitter's algorithm R) over the finished tasks' examples in
    task order, each task's in a seeded order, so every example seen so far is equally likely kept."""

    def problems(self, prefix: str = "data.replay") -> list[str]:
        p = type_problems(self, prefix)
        if p:
            return p
        if not 0.0 <= self.ratio < 1.0:
            p.append(
                f"{prefix}.ratio must lie in [0, 1) (got {self.ratio}); it is the buffer's share of a batch"
            )
        if (self.per_task is None) == (self.memory is None):
            p.append(f"{prefix}: set exactly one of per_task and memory (got {self.per_task}, {self.memory})")
        for name in ("per_task", "memory"):
            value = getattr(self, name)
            if value is not None and value < 1:
                p.append(f"{prefix}.{name} must be >= 1 (got {value})")
        if self.sampling not in ("uniform", "reservoir"):
            p.append(f"{prefix}.sampling must be 'uniform' or 'reservoir' (got {self.sampling!r})")
        return p

    def replayed(self, batch_size: int) -> int:
        """Buffer examples in a batch of ``batch_size``."""
        return round(self.ratio * batch_size)


def buffer(replay: Replay, sizes: Sequence[int], seed: int) -> list[tuple[int, int]]:
    """``(task index, example index)`` pairs kept after the tasks of ``sizes`` (training-set sizes,
    in task order) have finished."""
    orders = [np.random.default_rng([seed, 7_717, k]).permutation(n) for k, n in enumerate(sizes)]
    if replay.per_task is not None:
        return [(k, int(i)) for k, order in enumerate(orders) for i in order[: replay.per_task]]
    if replay.sampling == "uniform":
        share = replay.memory // max(len(sizes), 1)
        return [(k, int(i)) for k, order in enumerate(orders) for i in order[:share]]
    rng = np.random.default_rng([seed, 7_717, 1_000_003])
    kept: list[tuple[int, int]] = []
    seen = 0
    for k, order in enumerate(orders):
        for i in order:
            if len(kept) < replay.memory:
                kept.append((k, int(i)))
            else:
                j = int(rng.integers(0, seen + 1))
                if j < replay.memory:
                    kept[j] = (k, int(i))
            seen += 1
    return kept


class ReplayBatchSampler(ShardedBatchSampler):
    """A :class:`ShardedBatchSampler` over the current task with ``replayed`` buffer examples added
    to every batch: indices ``>= num_examples`` address the buffer (``num_examples + j``)."""

    def __init__(
        self,
        num_examples: int,
        batch_size: int,
        buffer_size: int,
        replayed: int,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(num_examples, batch_size - replayed, seed, epoch, rank, world_size)
        self.buffer_size = buffer_size
        self.replayed = replayed

    def rank_batches(self) -> np.ndarray:
        new = super().rank_batches()  # (batches, batch_size - replayed)
        if not self.replayed or not self.buffer_size:
            return new
        rep = np.empty((len(new), self.replayed), dtype=np.int64)
        for i in range(len(new)):
            g = self.rank + i * self.world_size  # the global batch index
            rng = np.random.default_rng([self.seed, self.epoch, g, 5_003])
            rep[i] = rng.choice(self.buffer_size, self.replayed, replace=self.buffer_size < self.replayed)
        return np.concatenate([new, self.num_examples + rep], axis=1)


class MixedRows:
    """The current task's rows followed by ``(task index, example index)`` pairs of other tasks' rows
    (the replay buffer; with no current rows, a joint multi-task slice), as one indexable dataset."""

    def __init__(self, current: Any, tasks: Mapping[int, Any], kept: Sequence[tuple[int, int]]) -> None:
        self.current = current
        self.tasks = tasks
        self.kept = list(kept)

    def __len__(self) -> int:
        return len(self.current) + len(self.kept)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i < len(self.current):
            return self.current[i]
        k, j = self.kept[i - len(self.current)]
        return self.tasks[k][j]


def replay_problems(replay: Any, batch_size: int) -> list[str]:
    """Every problem with ``data.replay`` given the batch size it mixes into."""
    if not isinstance(replay, Replay):
        return [f"data.replay must be a Replay (ratio, per_task or memory, sampling), got {replay!r}"]
    p = replay.problems()
    if not p:
        n = replay.replayed(batch_size)
        if replay.ratio > 0 and n == 0:
            p.append(
                f"data.replay.ratio {replay.ratio} of data.batch_size {batch_size} rounds to 0 examples; "
                "raise either"
            )
        if n >= batch_size:
            p.append(f"data.replay.ratio {replay.ratio} leaves no new example in a batch of {batch_size}")
    return p


def joint_slice(sizes: Sequence[int], stage: int, seed: int) -> list[tuple[int, int]]:
    """``data.multitask``: the ``(task index, example index)`` pairs stage ``stage`` trains on. The
    training examples of all tasks (``sizes[k]`` of task k) pooled and shuffled once by ``seed``,
    then cut into ``len(sizes)`` equal slices, one per stage."""
    pool = [(k, i) for k, n in enumerate(sizes) for i in range(n)]
    order = np.random.default_rng([seed, 4_241]).permutation(len(pool))
    bounds = np.linspace(0, len(pool), len(sizes) + 1).round().astype(int)
    return [pool[j] for j in order[bounds[stage] : bounds[stage + 1]]]
