"""Holdout/train split of a task's examples, by source record and seeded.

A record cut into several blocks (``format: text``) lies wholly on one side, so no text of the
holdout set is ever trained on.
"""

from __future__ import annotations

import datasets
import numpy as np
from lightning.pytorch.utilities import rank_zero_warn

from crma_lightning.config import ConfigError


def split_by_record(
    examples: datasets.Dataset, holdout_size: int, train_size: int, seed: int, where: str
) -> tuple[datasets.Dataset, datasets.Dataset]:
    """Seeded split by source record: holdout = the first ``holdout_size`` examples of the shuffled
    records, train = up to ``train_size`` examples of the records after them.

    The rest of the record that completes the holdout is used for neither. ``where`` names the task
    in error messages.
    """
    n = len(examples)
    if n <= holdout_size:
        raise ConfigError(
            f"{where} has {n} examples after tokenisation, which leaves none for "
            f"training after data.holdout_size={holdout_size}; lower data.holdout_size or add data"
        )
    records = np.asarray(examples["record"]) if "record" in examples.column_names else np.arange(n)
    ids, dense = np.unique(records, return_inverse=True)
    rank = np.random.default_rng(seed).permutation(len(ids))[dense]  # shuffled position of each record
    order = np.lexsort((np.arange(n), rank))  # examples grouped by shuffled record, in-record order kept
    holdout = order[:holdout_size]
    rest = order[holdout_size:]
    rest = rest[rank[rest] != rank[holdout[-1]]]
    train = rest[:train_size]
    if len(train) == 0:
        raise ConfigError(
            f"{where}: no training example is left after data.holdout_size="
            f"{holdout_size} (the source has {len(ids)} records); lower data.holdout_size or add data"
        )
    if len(train) < train_size:
        rank_zero_warn(
            f"{where}: only {len(train)} training examples after the holdout, "
            f"fewer than data.train_size={train_size}; using all of them"
        )
    return examples.select(holdout), examples.select(train)
