"""Tests of the continual-learning data module: real tokenizer, real `datasets`, real files, real Trainer."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import numpy as np
import pytest
import torch
from lightning import LightningModule, Trainer
from lightning.fabric.utilities.types import _Stateful
from lightning.pytorch.callbacks import ModelCheckpoint
from transformers import AutoTokenizer

from crma_lightning.core.errors import ConfigError
from crma_lightning.data import (
    IGNORE_INDEX,
    ContinualDataModule,
    TaskSpec,
    tiny_tokenizer_path,
)
from crma_lightning.data.synthetic import FIRST_TOKEN, permutation_sequences, task_permutation


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory, monkeypatch):
    # load_dataset caches local files under HF_DATASETS_CACHE; keep the tests out of ~/.cache.
    monkeypatch.setattr(
        datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache")
    )


def _qa_records(n: int) -> list[dict[str, str]]:
    return [{"prompt": f"Q{i}: {i} plus {i}?", "response": f" {2 * i}"} for i in range(n)]


def _write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def _synthetic_dm(names=("a", "b", "c"), **kwargs) -> ContinualDataModule:
    config = {"max_length": 8, "train_size": 24, "holdout_size": 6, "batch_size": 4, "synthetic_vocab": 16}
    config["synthetic_jump"] = 0.0  # exact permutation chains, so _follows() can check every step
    return ContinualDataModule([TaskSpec(n) for n in names], **{**config, **kwargs})


def _follows(task: str, input_ids: torch.Tensor, seed: int = 0, vocab: int = 16) -> bool:
    perm = torch.as_tensor(task_permutation(seed, task, vocab))
    return bool((perm[input_ids[:, :-1] - FIRST_TOKEN] == input_ids[:, 1:]).all())


def _as_tuples(batches) -> list[tuple[int, ...]]:
    return [
        tuple(row[m.bool()].tolist())
        for b in batches
        for row, m in zip(b["input_ids"], b["attention_mask"], strict=True)
    ]


# ----------------------------------------------------------------------------- tokenizer


def test_tiny_tokenizer_is_small_real_and_resolves_by_name():
    folder = tiny_tokenizer_path()
    assert sorted(os.listdir(folder)) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) < 100_000
    tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    assert (len(tok), tok.pad_token_id, tok.eos_token_id) == (512, 0, 1)
    text = "def f(x):\n    return x + 1  # café"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text and len(ids) < len(text)
    dm = ContinualDataModule([TaskSpec("a")], tokenizer="tiny")
    assert dm.pad_token_id == 0 and dm.vocab_size == 512


# ----------------------------------------------------------------------------- synthetic data


def test_synthetic_sequences_follow_a_per_task_permutation():
    seqs = permutation_sequences(seed=3, name="a", num_examples=50, length=10, vocab=16)
    assert seqs.shape == (50, 10) and seqs.min() >= FIRST_TOKEN and seqs.max() < FIRST_TOKEN + 16
    perm = task_permutation(3, "a", 16)
    assert (perm[seqs[:, :-1] - FIRST_TOKEN] == seqs[:, 1:]).all()
    np.testing.assert_array_equal(seqs, permutation_sequences(3, "a", 50, 10, 16))
    # The permutation does not depend on how many examples are drawn, and differs per task and seed.
    assert (task_permutation(3, "a", 16) == task_permutation(3, "a", 16)).all()
    assert not (task_permutation(3, "b", 16) == perm).all()
    assert not (task_permutation(4, "a", 16) == perm).all()


def test_jumps_keep_holdout_sequences_out_of_training():
    dm = _synthetic_dm(
        names=("a",), train_size=200, holdout_size=50, synthetic_jump=0.2, max_length=32, synthetic_vocab=64
    )
    dm.setup()
    train = set(_as_tuples([dm.train_dataloader_for_epoch(0).collate_fn([e for e in dm._train["a"]])]))
    holdout = set(_as_tuples(dm.holdout_batches("a")))
    assert len(holdout) == 50 and not holdout & train
    seqs = permutation_sequences(0, "a", 200, 32, 64, jump_prob=0.2)
    follows = (task_permutation(0, "a", 64)[seqs[:, :-1] - FIRST_TOKEN] == seqs[:, 1:]).mean()
    assert 0.75 < follows < 0.85  # mostly the rule, sometimes a jump


def test_two_instances_build_identical_data():
    first, second = _synthetic_dm(), _synthetic_dm()
    first.setup()
    second.setup()
    for task in first.task_names:
        assert _as_tuples(first.holdout_batches(task)) == _as_tuples(second.holdout_batches(task))
    for epoch in range(3):
        a, b = first.train_dataloader_for_epoch(epoch), second.train_dataloader_for_epoch(epoch)
        assert _as_tuples(a) == _as_tuples(b)


# ----------------------------------------------------------------------------- split and schedule


def test_split_is_seeded_disjoint_and_sized(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", _qa_records(60))
    tasks = [TaskSpec("qa", source=path, format="prompt_response")]

    def split(seed):
        dm = ContinualDataModule(
            tasks, tokenizer="tiny", max_length=48, train_size=30, holdout_size=10, seed=seed
        )
        dm.setup()
        dm.setup()  # idempotent
        train = _as_tuples(dm.train_dataloader_for_epoch(0, world_size=1))
        return _as_tuples(dm.holdout_batches("qa")), train, dm

    holdout, train, dm = split(seed=0)
    assert len(holdout) == 10 and len(set(holdout)) == 10
    assert dm.train_batches_per_epoch(0) == 4  # ceil(30 / 8)
    assert len(set(train)) == 30 and not set(train) & set(holdout)
    again_holdout, again_train, _ = split(seed=0)
    assert holdout == again_holdout and set(train) == set(again_train)
    assert split(seed=1)[0] != holdout


def test_short_source_uses_every_remaining_example_and_warns(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", _qa_records(15))
    dm = ContinualDataModule(
        [TaskSpec("qa", source=path, format="prompt_response")],
        tokenizer="tiny",
        max_length=48,
        holdout_size=5,
    )
    with pytest.warns(UserWarning, match="only 10 training examples"):
        dm.setup()
    assert dm.train_batches_per_epoch(0) == 2  # 10 examples, batch 8


def test_task_index_at_epoch_and_total_epochs():
    dm = _synthetic_dm(epochs_per_task=2)
    assert (dm.task_names, dm.num_tasks, dm.total_epochs) == (["a", "b", "c"], 3, 6)
    assert [dm.task_index_at_epoch(e) for e in range(9)] == [0, 0, 1, 1, 2, 2, 2, 2, 2]


# ----------------------------------------------------------------------------- training loaders


class _Recorder(LightningModule):
    """Trains an embedding on nothing in particular and records every batch it is given."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, 4)
        self.seen: list[tuple[int, torch.Tensor]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["input_ids"].clone()))
        return self.emb(batch["input_ids"]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(root, max_epochs: int, callbacks=()) -> Trainer:
    return Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=bool(callbacks),
        callbacks=list(callbacks),
        reload_dataloaders_every_n_epochs=1,
        use_distributed_sampler=False,
        default_root_dir=str(root),
    )


def test_trainer_gets_the_current_epochs_task(tmp_path):
    dm = _synthetic_dm(epochs_per_task=2)
    model = _Recorder(dm.vocab_size)
    _trainer(tmp_path, max_epochs=dm.total_epochs).fit(model, datamodule=dm)
    epochs = [epoch for epoch, _ in model.seen]
    assert epochs == [e for e in range(6) for _ in range(dm.train_batches_per_epoch(e // 2))]
    for epoch, input_ids in model.seen:
        assert _follows(dm.task_names[epoch // 2], input_ids)
        assert input_ids.shape == (4, 8)
    # A new epoch on the same task reshuffles.
    first, second = (torch.cat([x for e, x in model.seen if e == k]) for k in (0, 1))
    assert not torch.equal(first, second)
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, second.tolist()))


def test_rank_shards_are_disjoint_cover_the_data_and_have_equal_lengths():
    dm = _synthetic_dm(train_size=50, holdout_size=4, batch_size=4)
    world = 3
    loaders = [dm.train_dataloader_for_epoch(epoch=2, rank=r, world_size=world) for r in range(world)]
    assert {len(dl) for dl in loaders} == {dm.train_batches_per_epoch(2, world_size=world)} == {5}
    shards = [dl.batch_sampler.rank_batches() for dl in loaders]  # (5, 4) indices each
    # Interleave the ranks back into the global order: step s uses global batches sW .. sW + W - 1.
    global_order = np.stack(shards, axis=1).reshape(-1)
    assert len(global_order) == 60 and sorted(global_order[:50]) == list(range(50))
    np.testing.assert_array_equal(global_order[50:], global_order[:10])  # documented wrap-around padding
    assert all(len(list(dl)) == 5 for dl in loaders)
    assert not np.array_equal(dm.train_dataloader_for_epoch(3).batch_sampler.rank_batches(), shards[0])


def test_holdout_batches_are_equal_across_ranks_and_weighted():
    dm = _synthetic_dm(holdout_size=10, eval_batch_size=2)
    world = 3
    per_rank = [dm.holdout_batches("b", rank=r, world_size=world) for r in range(world)]
    assert [len(b) for b in per_rank] == [2, 2, 2]  # ceil(ceil(10 / 3) / 2)
    for step in range(2):
        assert len({tuple(rank[step]["input_ids"].shape) for rank in per_rank}) == 1
    weights = torch.cat([b["example_weight"] for rank in per_rank for b in rank])
    assert weights.dtype == torch.float32 and weights.sum() == 10 and set(weights.tolist()) == {0.0, 1.0}
    real = [
        tuple(row.tolist())
        for rank in per_rank
        for b in rank
        for row, w in zip(b["input_ids"], b["example_weight"], strict=True)
        if w == 1
    ]
    assert sorted(real) == sorted(_as_tuples(dm.holdout_batches("b")))
    # Not shuffled: rank 0 holds holdout examples 0, 3, 6, 9 in order.
    whole = [tuple(r.tolist()) for b in dm.holdout_batches("b", batch_size=100) for r in b["input_ids"]]
    rank0 = [tuple(r.tolist()) for b in per_rank[0] for r in b["input_ids"]]
    assert rank0 == whole[0::3]
    more_ranks_than_examples = [dm.holdout_batches("b", rank=r, world_size=12) for r in (9, 11)]
    assert [[b["example_weight"].tolist() for b in rank] for rank in more_ranks_than_examples] == [
        [[1.0]],
        [[0.0]],
    ]
    batch = per_rank[2][1]
    assert {k: v.dtype for k, v in batch.items()} == {
        "input_ids": torch.long,
        "attention_mask": torch.long,
        "labels": torch.long,
        "example_weight": torch.float32,
    }


@pytest.mark.parametrize("num_workers", [0, 2])
def test_state_dict_resume_yields_exactly_the_remaining_batches(num_workers):
    dm = _synthetic_dm(num_workers=num_workers)
    loader = dm.train_dataloader_for_epoch(epoch=1, rank=1, world_size=2)
    assert isinstance(loader, _Stateful)
    full = list(dm.train_dataloader_for_epoch(epoch=1, rank=1, world_size=2))
    assert len(full) == 3  # ceil(24 / (4 * 2))
    it = iter(loader)
    next(it)
    state = loader.state_dict()  # counted in the main process: workers prefetch ahead of this
    assert state == {"task": "b", "epoch": 1, "batches_yielded": 1}
    resumed = _synthetic_dm(num_workers=num_workers).train_dataloader_for_epoch(epoch=1, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert len(rest) == 2 and all(
        torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(rest, full[1:], strict=True)
    )
    assert resumed.state_dict()["batches_yielded"] == 3
    assert len(list(resumed)) == 3  # the skip applies to one iteration only
    # A position from another epoch means that epoch is over: this one starts afresh.
    resumed.load_state_dict({"task": "b", "epoch": 0, "batches_yielded": 2})
    assert len(list(resumed)) == 3


@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_resume_from_lightning_checkpoints_mid_epoch_and_at_the_task_boundary(tmp_path):
    dm = _synthetic_dm(names=("a", "b"), train_size=16)  # 4 batches per epoch, 8 steps
    reference = _Recorder(dm.vocab_size)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    _trainer(tmp_path, max_epochs=2, callbacks=[checkpoints]).fit(reference, datamodule=dm)
    assert len(reference.seen) == 8
    for ckpt, done in (("epoch=0-step=2.ckpt", 2), ("epoch=0-step=4.ckpt", 4), ("epoch=1-step=6.ckpt", 6)):
        resumed = _Recorder(dm.vocab_size)
        again = ModelCheckpoint(dirpath=tmp_path / f"after_{done}", every_n_train_steps=2, save_top_k=-1)
        trainer = _trainer(tmp_path, max_epochs=2, callbacks=[again])
        trainer.fit(
            resumed,
            datamodule=_synthetic_dm(names=("a", "b"), train_size=16),
            ckpt_path=tmp_path / "ckpt" / ckpt,
        )
        assert [e for e, _ in resumed.seen] == [e for e, _ in reference.seen[done:]]
        assert all(
            torch.equal(a, b) for (_, a), (_, b) in zip(resumed.seen, reference.seen[done:], strict=True)
        )


def test_train_dataloader_takes_rank_and_world_size_from_the_trainer():
    dm = _synthetic_dm()
    # Constructing a DDP trainer launches nothing; it already knows its world size and rank.
    dm.trainer = Trainer(
        accelerator="cpu",
        strategy="ddp",
        devices=2,
        max_epochs=3,
        logger=False,
        enable_progress_bar=False,
        reload_dataloaders_every_n_epochs=1,
        use_distributed_sampler=False,
    )
    loader = dm.train_dataloader()
    assert (loader.batch_sampler.rank, loader.batch_sampler.world_size, loader.task) == (0, 2, "a")
    assert len(loader) == dm.train_batches_per_epoch(0, world_size=2) == 3
    dm.trainer = Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="reload_dataloaders_every_n_epochs must be 1"):
        dm.train_dataloader()


# ----------------------------------------------------------------------------- files and formats


def test_every_file_format_loads(tmp_path):
    lines = [f"line {i} of a small text file, with some words in it" for i in range(40)]
    (tmp_path / "a.txt").write_text("\n\n".join(lines) + "\n")  # blank lines are skipped
    _write_jsonl(tmp_path / "b.jsonl", [{"body": line} for line in lines])
    (tmp_path / "c.json").write_text(json.dumps(_qa_records(30)))
    (tmp_path / "d.csv").write_text(
        "prompt,response\n" + "".join(f"Q{i} twice?,{2 * i}\n" for i in range(30))
    )
    datasets.Dataset.from_dict({"text": lines}).to_parquet(str(tmp_path / "e.parquet"))
    tasks = [
        TaskSpec("txt", source=str(tmp_path / "a.txt")),
        TaskSpec("jsonl", source=str(tmp_path / "b.jsonl"), text_field="body"),
        TaskSpec("json", source=str(tmp_path / "c.json"), format="prompt_response"),
        TaskSpec("csv", source=str(tmp_path / "d.csv"), format="prompt_response"),
        TaskSpec("parquet", source=str(tmp_path / "e.parquet")),
        TaskSpec("synthetic"),
    ]
    dm = ContinualDataModule(
        tasks, tokenizer="tiny", max_length=32, train_size=20, holdout_size=4, batch_size=4
    )
    dm.setup()
    tok = dm.hf_tokenizer
    for epoch in range(dm.num_tasks):
        batch = next(iter(dm.train_dataloader_for_epoch(epoch)))
        assert batch["input_ids"].shape[0] == 4 and batch["input_ids"].shape[1] <= 32
        assert all(v.dtype == torch.long for v in batch.values())
    # Text: each record (+ eos) is cut into max_length blocks that never span records; blank lines
    # are gone; every real token is trained.
    block = dm.holdout_batches("txt")[0]
    real = block["attention_mask"].bool()
    assert torch.equal(block["labels"][real], block["input_ids"][real])
    for row, mask in zip(block["input_ids"], real, strict=True):
        text = tok.decode(row[mask])
        assert text.startswith("line ") and text.endswith("<|endoftext|>") and text.count("line ") == 1
    # The same lines from .txt and .parquet make the same blocks and, with the same seed, the same split.
    assert _as_tuples(dm.holdout_batches("txt")) == _as_tuples(dm.holdout_batches("parquet"))


def test_prompt_response_labels_only_the_response(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", _qa_records(20))
    dm = ContinualDataModule(
        [TaskSpec("qa", source=path, format="prompt_response")],
        tokenizer="tiny",
        max_length=48,
        train_size=10,
        holdout_size=10,
    )
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_path())
    (batch,) = dm.holdout_batches("qa", batch_size=10)
    records = {r["prompt"]: r["response"] for r in _qa_records(20)}
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        n = int(mask.sum())
        assert (ids[n:] == dm.pad_token_id).all() and (labels[n:] == IGNORE_INDEX).all() and mask[:n].all()
        n_prompt = int((labels[:n] == IGNORE_INDEX).sum())
        assert (labels[:n_prompt] == IGNORE_INDEX).all() and torch.equal(labels[n_prompt:n], ids[n_prompt:n])
        prompt = tok.decode(ids[:n_prompt])
        assert tok.decode(ids[n_prompt:n]) == records[prompt] + "<|endoftext|>"


def test_prompt_response_truncates_and_drops_examples_without_response(tmp_path):
    long_prompt = "a much longer prompt that fills the whole window " * 3
    records = _qa_records(12) + [{"prompt": long_prompt, "response": "lost"}] * 5
    path = _write_jsonl(tmp_path / "qa.jsonl", records)
    dm = ContinualDataModule(
        [TaskSpec("qa", source=path, format="prompt_response")],
        tokenizer="tiny",
        max_length=24,
        train_size=100,
        holdout_size=2,
    )
    with pytest.warns(UserWarning, match="only 10 training examples"):
        dm.setup()


# ----------------------------------------------------------------------------- clear errors


def _error(tasks, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        dm = ContinualDataModule(
            tasks, **{"tokenizer": "tiny", "max_length": 32, "holdout_size": 4, **kwargs}
        )
        dm.setup()
    return str(info.value)


def test_config_problems_are_reported_together():
    message = _error(
        [TaskSpec("a"), TaskSpec("a"), TaskSpec("b.c")], holdout_size=0, max_length=1, tokenizer=None
    )
    for expected in (
        "data.tasks[1].name",
        "used twice",
        "data.tasks[2].name",
        "data.holdout_size",
        "data.max_length",
    ):
        assert expected in message
    assert "data.tasks: is empty" in _error([])
    assert "data.tokenizer" in _error([TaskSpec("x", source="some/hub-name")], tokenizer=None)


def test_file_errors_name_the_task_file_and_fix(tmp_path):
    missing = str(tmp_path / "missing.jsonl")
    message = _error([TaskSpec("m", source=missing)])
    assert "data.tasks[0].source" in message and missing in message and "does not exist" in message

    (tmp_path / "empty.txt").write_text("")
    message = _error([TaskSpec("e", source=str(tmp_path / "empty.txt"))])
    assert "task 'e'" in message and "empty.txt" in message and "is empty" in message

    (tmp_path / "blank.txt").write_text("\n  \n\n")
    assert "blank" in _error([TaskSpec("e", source=str(tmp_path / "blank.txt"))])

    (tmp_path / "bad.jsonl").write_text('{"text": "unterminated\n')
    message = _error([TaskSpec("bad", source=str(tmp_path / "bad.jsonl"))])
    assert "bad.jsonl" in message and "could not be read as json" in message

    path = _write_jsonl(tmp_path / "qa.jsonl", _qa_records(20))
    message = _error([TaskSpec("qa", source=path, text_field="content")])
    assert (
        "'content'" in message
        and "['prompt', 'response']" in message
        and "data.tasks[0].text_field" in message
    )
    message = _error([TaskSpec("qa", source=path, format="prompt_response", response_field="answer")])
    assert "'answer'" in message and "data.tasks[0].response_field" in message

    txt = tmp_path / "lines.txt"
    txt.write_text("one\ntwo\n")
    message = _error([TaskSpec("t", source=str(txt), format="prompt_response")])
    assert "'prompt'" in message and "['text']" in message


def test_too_short_examples_and_too_large_holdout(tmp_path):
    path = _write_jsonl(tmp_path / "empty_pairs.jsonl", [{"prompt": "", "response": ""}] * 10)
    message = _error([TaskSpec("short", source=path, format="prompt_response")])
    assert "task 'short'" in message and "empty_pairs.jsonl" in message and "at least 2 tokens" in message

    path = _write_jsonl(tmp_path / "few.jsonl", _qa_records(4))
    message = _error([TaskSpec("few", source=path, format="prompt_response")], holdout_size=4)
    assert "task 'few'" in message and "few.jsonl" in message and "data.holdout_size=4" in message


def test_offline_hub_name_suggests_a_local_file():
    dm = ContinualDataModule([TaskSpec("hub", source="someone/not-cached-anywhere")], tokenizer="tiny")
    dm.prepare_data()  # offline: nothing to download, nothing to fail
    with pytest.raises(ValueError) as info:
        dm.setup()
    message = str(info.value)
    assert "task 'hub'" in message and "data.tasks[0].source" in message
    assert "offline" in message and "local file" in message


def test_split_is_by_record_so_no_record_is_on_both_sides(tmp_path):
    records = [{"text": f"record {i}: " + " ".join(f"w{i}x{j}" for j in range(40))} for i in range(30)]
    path = _write_jsonl(tmp_path / "long.jsonl", records)
    dm = ContinualDataModule(
        [TaskSpec("long", source=path)], tokenizer="tiny", max_length=32, train_size=200, holdout_size=7
    )
    dm.setup()
    holdout, train = dm._holdout["long"], dm._train["long"]
    assert len(holdout) == 7 and len(train) > 50
    assert len(set(holdout["record"]) & set(train["record"])) == 0
    assert max(holdout["record"].count(r) for r in set(holdout["record"])) > 1  # records really span blocks


def test_evaluation_only_tasks_are_held_out_sets_outside_the_task_clock():
    dm = ContinualDataModule(
        [TaskSpec("a"), TaskSpec("b")],
        eval_tasks=[TaskSpec("g")],
        max_length=8,
        train_size=8,
        holdout_size=4,
        test_size=3,
    )
    assert dm.task_names == ["a", "b"] and dm.num_tasks == 2 and dm.clock.task_names == ("a", "b")
    assert dm.eval_task_names == ["g"] and dm.evaluated_task_names == ["a", "b", "g"]
    assert dm.split_size("g") == 4 and dm.split_size("g", "test") == 3 and dm.spec("g").name == "g"
    assert len(dm.holdout_batches("g", batch_size=2)) == 2
    for bad, match in (
        ([TaskSpec("a")], r"data.eval_tasks: \['a'\] also in data.tasks"),
        ([TaskSpec("g"), TaskSpec("g")], r"data.eval_tasks"),
        ([{"name": "g", "format": "essay"}], r"data.eval_tasks\[0\].format"),
    ):
        with pytest.raises(ConfigError, match=match):
            ContinualDataModule([TaskSpec("a"), TaskSpec("b")], eval_tasks=bad)


def test_length_ordered_shards_keep_every_example_once_and_equal_batches_per_rank():
    from crma_lightning.data.loading import sharded_batches

    lengths = [9, 1, 8, 2, 7, 3, 6]
    data = datasets.Dataset.from_dict(
        {"input_ids": [[5] * n for n in lengths], "labels": [[5] * n for n in lengths]}
    )

    def padding(batches):
        return sum(int((b["attention_mask"] == 0).sum()) for b in batches)

    shards = [sharded_batches(data, 2, r, 2, 0, by_length=True) for r in range(2)]
    assert [len(s) for s in shards] == [2, 2]  # as many batches on every rank
    real = [
        int(m.sum())
        for s in shards
        for b in s
        for m, w in zip(b["attention_mask"], b["example_weight"], strict=True)
        if w
    ]
    assert sorted(real) == sorted(lengths)  # every example once (weight-0 fillers aside)
    # Longest first over all ranks: rank 0 gets 9, 7, 3, 1; rank 1 8, 6, 2 and a filler.
    assert [int(m.sum()) for m in shards[0][0]["attention_mask"]] == [9, 7]
    one = sharded_batches(data, 2, 0, 1, 0, by_length=True)
    assert padding(one) < padding(sharded_batches(data, 2, 0, 1, 0))  # 1 + 1 + 1 + 0 against 8 + 6 + 4 + 0
