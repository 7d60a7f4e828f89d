"""Tests of the shipped multi-domain corpus: the real files, their licences, and ``corpus:<domain>`` tasks."""

import math
import os
import re
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import pytest

from crma_lightning.core.errors import ConfigError
from crma_lightning.corpus import DOMAINS, SUFFIX, domain_path, load_domain
from crma_lightning.data import ContinualDataModule

CORPUS_DIR = Path(domain_path(DOMAINS[0])).parent
BUDGET_BYTES = 2 * 2**20
"""The shipped files stay compact: all domains together under 2 MiB."""
TRAIN, HOLDOUT = 500, 100


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory, monkeypatch):
    # load_dataset caches local files under HF_DATASETS_CACHE; keep the tests out of ~/.cache.
    monkeypatch.setattr(
        datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache")
    )


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def test_at_least_five_domains_and_no_stray_files():
    assert len(DOMAINS) >= 5
    assert len(set(DOMAINS)) == len(DOMAINS)
    shipped = sorted(p.name for p in CORPUS_DIR.glob(f"*{SUFFIX}"))
    assert shipped == sorted(f"{d}{SUFFIX}" for d in DOMAINS)


@pytest.mark.parametrize("domain", DOMAINS)
def test_domain_ships_distinct_clean_examples(domain):
    texts = load_domain(domain)
    assert len(texts) >= TRAIN + HOLDOUT
    assert len(set(texts)) == len(texts)
    for text in texts:
        assert text == text.strip() and 400 <= len(text) <= 1200, text[:80]
        assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", text), text[:80]


def test_total_size_is_within_budget():
    total = sum(Path(domain_path(d)).stat().st_size for d in DOMAINS)
    assert total < BUDGET_BYTES


def test_licenses_cover_every_domain():
    licenses = (CORPUS_DIR / "LICENSES.md").read_text(encoding="utf-8")
    for domain in DOMAINS:
        assert f"\n## {domain}\n" in licenses
        assert f"\n| {domain} | " in licenses


def test_domains_are_distinct():
    """A bag-of-words naive Bayes fitted on each domain's first 500 texts names the domain of the rest."""
    texts = {d: load_domain(d) for d in DOMAINS}
    counts = {d: Counter(w for t in texts[d][:TRAIN] for w in _words(t)) for d in DOMAINS}
    vocab = len(set().union(*counts.values()))
    totals = {d: sum(c.values()) for d, c in counts.items()}

    def predict(text: str) -> str:
        return max(
            DOMAINS,
            key=lambda d: sum(math.log((counts[d][w] + 1) / (totals[d] + vocab)) for w in _words(text)),
        )

    accuracy = {d: sum(predict(t) == d for t in texts[d][TRAIN:]) / len(texts[d][TRAIN:]) for d in DOMAINS}
    assert min(accuracy.values()) >= 0.85, accuracy
    assert sum(accuracy.values()) / len(accuracy) >= 0.95, accuracy


def test_unknown_domain_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown corpus domain 'finance'.*medical"):
        domain_path("finance")
    tasks = [{"name": "a", "source": "corpus:medical"}, {"name": "b", "source": "corpus:finance"}]
    with pytest.raises(
        ConfigError, match=r"data\.tasks\[1\]\.source: unknown corpus domain 'finance'"
    ) as err:
        ContinualDataModule(tasks, tokenizer="tiny")
    assert all(f"corpus:{d}" in str(err.value) for d in DOMAINS)


def test_corpus_tasks_set_up_and_yield_batches():
    tasks = [{"name": "medical", "source": "corpus:medical"}, {"name": "code", "source": "corpus:code"}]
    dm = ContinualDataModule(
        tasks, tokenizer="tiny", max_length=128, train_size=TRAIN, holdout_size=HOLDOUT, batch_size=8
    )
    dm.setup("fit")
    tokenizer = dm.hf_tokenizer
    for epoch, task in enumerate(dm.task_names):
        assert dm.train_batches_per_epoch(epoch) == math.ceil(TRAIN / 8)
        holdout = dm.holdout_batches(task)
        assert sum(int(b["example_weight"].sum()) for b in holdout) == HOLDOUT
        batch = next(iter(dm.train_dataloader_for_epoch(epoch)))
        assert batch["input_ids"].shape[0] == 8 and batch["input_ids"].shape[1] <= 128
        real = batch["attention_mask"].bool()
        assert (batch["labels"][real] == batch["input_ids"][real]).all() and (
            batch["labels"][~real] == -100
        ).all()
        # The task reads its own domain: a block never spans records, so its text is part of one record.
        ids = batch["input_ids"][0][real[0]].tolist()
        eos = tokenizer.eos_token_id
        piece = tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids)
        assert any(piece in text for text in load_domain(task)), piece[:80]
