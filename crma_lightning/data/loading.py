"""Batches: padding, the sharded per-epoch sampler and the resumable training loader.

Batches are dicts of ``input_ids``, ``attention_mask``, ``labels`` (all ``(B, T)`` int64), padded to
the longest sequence in the batch; labels are NOT shifted and are ``IGNORE_INDEX`` on padding.
Each epoch's global permutation of a task's training set, from ``(seed, epoch)``, is cut into
batches, and rank ``r`` of ``W`` takes global batches ``r, r + W, r + 2W, ...``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Literal

import datasets
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Sampler

from crma_lightning.core.errors import ConfigError
from crma_lightning.core.losses import IGNORE_INDEX


def pad(
    rows: Sequence[Sequence[int]], value: int, side: Literal["left", "right"] = "right"
) -> tuple[Tensor, Tensor]:
    """``rows`` of token ids as one ``(B, T_max)`` int64 tensor padded with ``value`` on ``side``, and
    the ``(B, T_max)`` int64 mask of real tokens. The one padding routine of training, evaluation
    and generation (decoder-only generation pads on the left)."""
    length = max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(length - len(r), length) if side == "left" else slice(0, len(r))
        out[i, span] = torch.as_tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return out, mask


class PadCollator:
    """Stack examples into a right-padded batch, padded to the longest example in the batch."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[Mapping[str, list[int]]]) -> dict[str, Tensor]:
        input_ids, attention_mask = pad([ex["input_ids"] for ex in examples], self.pad_id)
        labels, _ = pad([ex["labels"] for ex in examples], IGNORE_INDEX)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


class ShardedBatchSampler(Sampler[list[int]]):
    """One rank's batches of one epoch: every ``world_size``-th batch of a seeded global permutation.

    The permutation of ``range(num_examples)`` comes from ``(seed, epoch)``, is tiled to a multiple
    of ``batch_size * world_size`` (the first examples of the epoch repeat), and is cut into batches
    of ``batch_size``; this rank takes batches ``rank, rank + world_size, ...``. ``start`` skips that
    many of this rank's batches without producing their indices; it is read when iteration begins.

    Deliberately not a ``BatchSampler`` and without ``drop_last``: with
    ``use_distributed_sampler=True`` Lightning then refuses to inject its own sampler, loudly.
    """

    def __init__(
        self, num_examples: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if num_examples < 1 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ConfigError(
                f"need num_examples >= 1, batch_size >= 1, 0 <= rank < world_size; "
                f"got {num_examples}, {batch_size}, rank {rank} of {world_size}"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.start = 0

    def __len__(self) -> int:
        return math.ceil(self.num_examples / (self.batch_size * self.world_size))

    def rank_batches(self) -> np.ndarray:
        """All of this rank's batches this epoch, ``(len(self), batch_size)`` example indices."""
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_examples)
        order = np.resize(perm, len(self) * self.world_size * self.batch_size)  # wraps around
        return order.reshape(-1, self.batch_size)[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        # Materialised now, not lazily, so a later change of `start` cannot affect this iteration.
        return iter(self.rank_batches()[self.start :].tolist())


class ResumableDataLoader(DataLoader):
    """DataLoader over one task's training set that can resume mid-epoch.

    Lightning saves ``state_dict()`` in checkpoints and calls ``load_state_dict()`` on resume
    (it checks ``isinstance(loader, lightning.fabric.utilities.types._Stateful)``). Batches are
    counted in the main process as they are handed out, so the count is exact with workers too.
    After ``load_state_dict`` the next iteration starts ``batches_yielded`` batches into the epoch;
    the skipped batches are never loaded.
    """

    batch_sampler: ShardedBatchSampler

    def __init__(
        self,
        dataset: datasets.Dataset,
        batch_sampler: ShardedBatchSampler,
        collate_fn: PadCollator,
        task: str,
        num_workers: int = 0,
        replay_buffer: list[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=num_workers)
        self.task = task
        self.replay_buffer = replay_buffer  # (task index, example index) pairs mixed in, if any
        self._batches_yielded = 0
        self._resume_at = 0

    @property
    def epoch(self) -> int:
        return self.batch_sampler.epoch

    def state_dict(self) -> dict[str, Any]:
        state = {"task": self.task, "epoch": self.epoch, "batches_yielded": self._batches_yielded}
        if self.replay_buffer is not None:
            state["replay_buffer"] = [list(pair) for pair in self.replay_buffer]
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["epoch"] != self.epoch:
            # The checkpoint's position belongs to an epoch that is over: start this one afresh.
            self._resume_at = 0
            return
        if state_dict["task"] != self.task:
            raise ConfigError(
                f"the checkpoint was taken in epoch {self.epoch} on task '{state_dict['task']}', but the "
                f"data config now trains '{self.task}' in that epoch; resume with the same data.tasks order "
                "and data.epochs_per_task"
            )
        saved = state_dict.get("replay_buffer")
        mine = None if self.replay_buffer is None else [list(pair) for pair in self.replay_buffer]
        if saved != mine:
            raise ConfigError(
                "the checkpoint's replay buffer differs from the one these data settings give (data.replay, "
                "data.seed, data.train_size or the data changed); resume with the run's own config"
            )
        self._resume_at = int(state_dict["batches_yielded"])

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        start, self._resume_at = self._resume_at, 0
        self.batch_sampler.start = min(start, len(self.batch_sampler))
        self._batches_yielded = self.batch_sampler.start
        return self._count(super().__iter__())

    def _count(self, batches: Iterator[dict[str, Tensor]]) -> Iterator[dict[str, Tensor]]:
        for batch in batches:
            self._batches_yielded += 1
            yield batch


def _collate_rows(rows: dict[str, list], pad_token_id: int) -> dict[str, Tensor]:
    return PadCollator(pad_token_id)(
        [{"input_ids": a, "labels": b} for a, b in zip(rows["input_ids"], rows["labels"], strict=True)]
    )


def striped_batches(
    data: datasets.Dataset,
    batch_size: int,
    rank: int,
    world_size: int,
    pad_token_id: int,
    limit: int | None = None,
) -> list[dict[str, Tensor]]:
    """``data`` in its stored order cut into global batches of ``batch_size``, at most ``limit`` of
    them, and batches ``rank::world_size`` for this rank: the same batches, whole, whatever the
    number of ranks (a per-batch statistic such as EWC's Fisher then sums to the same value)."""
    if limit is not None:
        data = data.select(range(min(len(data), limit * batch_size)))
    return [
        _collate_rows(data[lo : min(lo + batch_size, len(data))], pad_token_id)
        for lo in range(0, len(data), batch_size)
    ][rank::world_size]


def sharded_batches(
    data: datasets.Dataset,
    batch_size: int,
    rank: int,
    world_size: int,
    pad_token_id: int,
    by_length: bool = False,
) -> list[dict[str, Tensor]]:
    """Examples ``rank::world_size`` of ``data``, in order (``by_length``: of ``data`` ordered by
    length, longest first, ties in order), batched by ``batch_size``, each batch with
    ``example_weight`` ``(B,)`` float32 (and, for a classification task, ``target`` ``(B,)``
    int64, each example's label index): every example once over all ranks.

    Every rank gets the same number of batches with the same batch sizes (collectives inside a
    sharded forward, and all-gathers of per-example values, need that): ranks short of
    ``ceil(len(data) / world_size)`` examples repeat a real example with weight 0. Ordering by
    length puts examples of similar length in a batch, so little padding is computed.
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
    order = list(range(len(data)))
    if by_length:
        lengths = [len(ids) for ids in data["input_ids"]]
        order.sort(key=lambda i: -lengths[i])  # stable: equal lengths keep the data's order
    indices = order[rank::world_size]
    weights = [1.0] * len(indices)
    per_rank = math.ceil(len(data) / world_size)
    indices += [0] * (per_rank - len(indices))
    weights += [0.0] * (per_rank - len(weights))
    batches = []
    for lo in range(0, per_rank, batch_size):
        rows = data[indices[lo : lo + batch_size]]
        batch = _collate_rows(rows, pad_token_id)
        batch["example_weight"] = torch.tensor(weights[lo : lo + batch_size], dtype=torch.float32)
        if "target" in rows:  # a classification example's label index
            batch["target"] = torch.tensor(rows["target"], dtype=torch.long)
        batches.append(batch)
    return batches
