"""A task's validation, train and test sets, by source record and seeded.

A record cut into several blocks (``format: text``) lies wholly on one side. Cut from one pool, the
shuffled records give, in order, ``[validation | train | test]``; a split given as its own data (a
file, a hub split) is instead the first examples of its seeded record order (:func:`take`).
"""

from __future__ import annotations

import functools
from typing import Any

import datasets
import numpy as np
from lightning.pytorch.utilities import rank_zero_warn

from crma_lightning.core.errors import ConfigError
from crma_lightning.data.sources import load_records
from crma_lightning.data.spec import TaskSpec
from crma_lightning.data.tokenize import resolve_labels, synthetic_examples, tokenize_records


def record_order(examples: datasets.Dataset, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Example indices grouped by shuffled record (in-record order kept), and each index's record rank."""
    n = len(examples)
    records = np.asarray(examples["record"]) if "record" in examples.column_names else np.arange(n)
    ids, dense = np.unique(records, return_inverse=True)
    rank = np.random.default_rng(seed).permutation(len(ids))[dense]  # shuffled position of each record
    return np.lexsort((np.arange(n), rank)), rank


def split_by_record(
    examples: datasets.Dataset,
    holdout_size: int,
    train_size: int,
    seed: int,
    where: str,
    test_size: int = 0,
    cut_holdout: bool = True,
) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset]:
    """Seeded split by source record: holdout = the first ``holdout_size`` examples of the shuffled
    records (none with ``cut_holdout=False``: the validation data is given apart), train = up to
    ``train_size`` examples of the records after them, test = up to ``test_size`` examples of the
    records after the training ones.

    The rest of a record that completes one set is used for no later one. ``where`` names the task
    in error messages. Returns ``(holdout, train, test)``.
    """
    n = len(examples)
    held = holdout_size if cut_holdout else 0
    if n <= held:
        raise ConfigError(
            f"{where} has {n} examples after tokenisation, which leaves none for "
            f"training after data.holdout_size={holdout_size}; lower data.holdout_size or add data"
        )
    order, rank = record_order(examples, seed)
    holdout = order[:held]
    rest = order[held:]
    if held:
        rest = rest[rank[rest] != rank[holdout[-1]]]
    train = rest[:train_size]
    if len(train) == 0:
        raise ConfigError(
            f"{where}: no training example is left after data.holdout_size={holdout_size} (the source has "
            f"{len(np.unique(rank))} records); lower data.holdout_size or add data"
        )
    if len(train) < train_size:
        rank_zero_warn(
            f"{where}: only {len(train)} training examples after the holdout, "
            f"fewer than data.train_size={train_size}; using all of them"
        )
    test = rest[train_size:]
    test = test[rank[test] != rank[train[-1]]][:test_size]
    if len(test) < test_size:
        rank_zero_warn(
            f"{where}: only {len(test)} test examples are left after the training ones, fewer than "
            f"data.test_size={test_size}; lower data.train_size, give a test file (data.tasks[].splits) "
            "or set data.test_size: 0"
        )
    return examples.select(holdout), examples.select(train), examples.select(test)


def take(examples: datasets.Dataset, size: int, seed: int, where: str) -> datasets.Dataset:
    """The first ``size`` examples of a given split (a validation or test file) in its seeded record
    order; all of them, with a warning, if it has fewer."""
    if len(examples) < size:
        rank_zero_warn(
            f"{where}: has {len(examples)} examples, fewer than the {size} asked for; using all of them"
        )
    order, _ = record_order(examples, seed)
    return examples.select(order[:size])


def task_sets(
    dm: Any, index: int, task: TaskSpec
) -> tuple[TaskSpec, datasets.Dataset, datasets.Dataset, datasets.Dataset]:
    """Task ``index``'s ``(spec, validation, train, test)`` sets for the DataModule ``dm`` (its sizes,
    seed, tokenizer, synthetic settings and ``source_of``): split files where the task gives them,
    else cut from its one source by :func:`split_by_record`. A classification spec comes back with
    its label set resolved from the data."""
    where = f"task '{task.name}' ({task.source})"
    source = dm.source_of(task)
    if source.synthetic:
        make = functools.partial(
            synthetic_examples,
            task,
            seed=dm.seed,
            max_length=dm.max_length,
            vocab=dm.synthetic_vocab,
            jump=dm.synthetic_jump,
            tokenizer=dm.hf_tokenizer,
        )
        pool = make(count=dm.train_size + dm.holdout_size)
        holdout, train, _ = split_by_record(pool, dm.holdout_size, dm.train_size, dm.seed, where)
        test = make(count=dm.test_count, stream=1)  # its own generator: stream 0's sets unchanged
        return task, holdout, train, test
    raws = {split: load_records(index, task, source, split) for split in source.splits(task)}
    if task.format == "classification":
        for raw in raws.values():  # every split's label values must be in the set
            task = resolve_labels(task, raw, index)
    given = {
        split: tokenize_records(raw, task, dm.hf_tokenizer, dm.max_length) for split, raw in raws.items()
    }
    holdout, train, test = split_by_record(
        given.pop("train"),
        dm.holdout_size,
        dm.train_size,
        dm.seed,
        where,
        test_size=0 if "test" in given else dm.test_count,
        cut_holdout="validation" not in given,
    )
    if "validation" in given:
        holdout = take(given["validation"], dm.holdout_size, dm.seed, f"{where} validation data")
    if "test" in given:
        test = take(given["test"], dm.test_count, dm.seed, f"{where} test data")
    return task, holdout, train, test
