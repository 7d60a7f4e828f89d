"""Classification tasks and the validation/test splits of every task: real tokenizer, real files."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from pathlib import Path

import datasets
import pytest
import yaml

from crma_lightning.data import IGNORE_INDEX, ContinualDataModule, TaskSpec
from crma_lightning.data.synthetic import permutation_sequences
from crma_lightning.data.tasks import OLORA_TEMPLATE, source_kind
from crma_lightning.evaluation.evaluator import answer_budget, label_targets

REPO = Path(__file__).resolve().parents[2]
CL_BENCHMARK = REPO / ".." / "shared" / "cl_benchmark"
LABELS = ["Sports", "Business", "Science or Technology"]
WORDS = {"Sports": "goals", "Business": "markets", "Science or Technology": "atoms"}


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(
        datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache")
    )


def news_records(n: int, offset: int = 0) -> list[dict[str, str]]:
    """A tiny topic-classification set: the label is readable from one word of the text."""
    out = []
    for i in range(offset, offset + n):
        label = LABELS[i % len(LABELS)]
        out.append({"sentence": f"story {i} about {WORDS[label]}", "label": label})
    return out


def write_jsonl(path: Path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def news_folder(root: Path, train: int = 40, validation: int | None = None, test: int | None = None) -> Path:
    """``root/news`` with train.jsonl (+ validation.jsonl, test.jsonl) and a task.json."""
    folder = root / "news"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", news_records(train))
    if validation is not None:
        write_jsonl(folder / "validation.jsonl", news_records(validation, offset=1000))
    if test is not None:
        write_jsonl(folder / "test.jsonl", news_records(test, offset=2000))
    (folder / "task.json").write_text(json.dumps({"instruction": "What is the topic?", "labels": LABELS}))
    return folder


def news_dm(source, **kwargs) -> ContinualDataModule:
    task = {"name": "news", "source": str(source), "format": "classification", "text_field": "sentence"}
    task |= kwargs.pop("task", {})
    config = {"tokenizer": "tiny", "max_length": 160, "train_size": 20, "holdout_size": 6, "test_size": 6}
    dm = ContinualDataModule([task], **{**config, **kwargs})
    dm.setup()
    return dm


def decoded(dm, batch, row: int) -> tuple[str, str]:
    """(the whole example, its scored part) of ``batch`` row ``row``, decoded."""
    tok = dm.hf_tokenizer
    ids = batch["input_ids"][row][batch["attention_mask"][row].bool()]
    labels = batch["labels"][row][: len(ids)]
    return tok.decode(ids), tok.decode(labels[labels != IGNORE_INDEX])


def _error(source, **kwargs) -> str:
    with pytest.raises(ValueError) as info:
        news_dm(source, **kwargs)
    return str(info.value)


# ----------------------------------------------------------------------------- classification


def test_classification_renders_the_olora_prompt_with_the_label_as_target(tmp_path):
    dm = news_dm(news_folder(tmp_path))
    spec = dm.spec("news")
    assert spec.labels == LABELS and spec.instruction == "What is the topic?"  # from task.json
    assert spec.template == OLORA_TEMPLATE and spec.task_metric == "exact_match"
    batch = dm.holdout_batches("news")[0]
    for row, target in enumerate(batch["target"].tolist()):
        whole, scored = decoded(dm, batch, row)
        label = LABELS[target]
        text = whole.split("\n")[2]
        assert WORDS[label] in text
        assert whole == (
            f"What is the topic?\nOption: Sports, Business, Science or Technology \n{text}\nAnswer: "
            f"{label}<|endoftext|>"
        )
        assert scored == f" {label}<|endoftext|>"  # the loss is on the answer only
    choices = label_targets(dm, "news")
    assert [dm.hf_tokenizer.decode(c) for c in choices] == [f" {x}<|endoftext|>" for x in LABELS]
    assert answer_budget(dm, "news") == max(len(c) for c in choices)


def test_entry_overrides_task_json_and_template_is_configurable(tmp_path):
    folder = news_folder(tmp_path)
    template = "Topic of: {text}\nOne of [{options}] ({instruction})\n=>"
    dm = news_dm(
        folder,
        task={"labels": LABELS[::-1], "instruction": "Pick.", "template": template, "answer_prefix": ""},
    )
    batch = dm.holdout_batches("news")[0]
    whole, scored = decoded(dm, batch, 0)
    label = LABELS[::-1][batch["target"][0]]
    assert whole.startswith("Topic of: story ") and WORDS[label] in whole
    assert whole.endswith(
        f"\nOne of [Science or Technology, Business, Sports] (Pick.)\n=>{label}<|endoftext|>"
    )
    assert scored == f"{label}<|endoftext|>"


def test_label_indices_and_a_file_source_with_labels_in_the_entry(tmp_path):
    records = [{"text": f"item {i} {WORDS[LABELS[i % 3]]}", "y": i % 3} for i in range(40)]
    path = write_jsonl(tmp_path / "ints.jsonl", records)
    dm = news_dm(path, task={"text_field": "text", "label_field": "y", "labels": LABELS})
    batch = dm.holdout_batches("news")[0]
    for row, target in enumerate(batch["target"].tolist()):
        whole, scored = decoded(dm, batch, row)
        assert WORDS[LABELS[target]] in whole and scored == f" {LABELS[target]}<|endoftext|>"
    assert dm.spec("news").instruction == "Choose one from the option."  # no task.json beside it


def test_long_text_is_cut_so_instruction_options_and_answer_survive(tmp_path):
    records = [{"sentence": "word " * 200 + WORDS[x], "label": x} for x in LABELS * 8]
    folder = tmp_path / "long"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", records)
    dm = news_dm(
        folder,
        task={"labels": LABELS, "instruction": "Topic?"},
        max_length=112,
        train_size=10,
        holdout_size=4,
    )
    batch = dm.holdout_batches("news")[0]
    assert batch["input_ids"].shape[1] <= 112
    whole, scored = decoded(dm, batch, 0)
    assert whole.startswith("Topic?\nOption: Sports, Business, Science or Technology \nword word")
    assert "\nAnswer: " in whole and scored == f" {LABELS[batch['target'][0]]}<|endoftext|>"


def test_classification_errors_name_the_field_and_the_fix(tmp_path):
    path = write_jsonl(tmp_path / "plain.jsonl", news_records(30))
    message = _error(path)
    assert "label set" in message and "data.tasks[0].labels" in message and "task.json" in message

    message = _error(path, task={"labels": ["Sports", "Business"]})
    assert (
        "'Science or Technology'" in message
        and "not in the label set" in message
        and "data.tasks[0].labels" in message
    )

    message = _error(path, task={"labels": LABELS, "template": "no text here"})
    assert "data.tasks[0].template" in message and "{text}" in message

    message = _error(path, task={"labels": LABELS, "label_field": "topic"})
    assert "'topic'" in message and "data.tasks[0].label_field" in message

    message = _error(path, task={"labels": LABELS, "metric": "rougeL"})
    assert "data.tasks[0].metric" in message and "'exact_match'" in message

    message = _error(path, task={"labels": LABELS, "template": "{instruction} {text} {missing}"})
    assert "'missing'" in message and "data.tasks[].template" in message

    folder = news_folder(tmp_path)
    (folder / "task.json").write_text("{not json")
    message = _error(folder)
    assert "task.json" in message and "data.tasks[0]" in message


# ----------------------------------------------------------------------------- splits


def test_split_files_give_validation_and_test(tmp_path):
    dm = news_dm(news_folder(tmp_path, train=30, validation=10, test=12), holdout_size=5, test_size=8)
    assert (dm.split_size("news"), dm.split_size("news", "test")) == (5, 8)
    ids = {split: set(dm.held_out("news", split)["record"]) for split in ("validation", "test")}

    def texts(split):
        return [
            decoded(dm, b, r)[0]
            for b in dm.holdout_batches("news", split=split)
            for r in range(len(b["target"]))
        ]

    assert all("story 10" in t for t in texts("validation"))  # records 1000.. from validation.jsonl
    assert all("story 20" in t for t in texts("test"))  # records 2000.. from test.jsonl
    assert len(ids["validation"]) == 5 and len(ids["test"]) == 8
    # The training set is the whole train file's first train_size records: nothing was cut from it.
    assert len(dm._train["news"]) == 20
    (tmp_path / "copy").mkdir()
    again = news_dm(news_folder(tmp_path / "copy", 30, 10, 12), holdout_size=5, test_size=8)
    assert again._test["news"]["input_ids"] == dm._test["news"]["input_ids"]  # seeded, deterministic


def test_test_split_is_cut_after_training_and_leaves_validation_and_train_unchanged(tmp_path):
    folder = news_folder(tmp_path, train=60)
    with_test = news_dm(folder, test_size=10)
    without = news_dm(folder, test_size=0)
    for split in ("_holdout", "_train"):
        assert getattr(with_test, split)["news"]["record"] == getattr(without, split)["news"]["record"]
    records = {s: set(getattr(with_test, s)["news"]["record"]) for s in ("_holdout", "_train", "_test")}
    assert len(records["_test"]) == 10 and without.split_size("news", "test") == 0
    assert not records["_test"] & (records["_holdout"] | records["_train"])
    assert news_dm(folder, test_size=10, seed=1)._test["news"]["record"] != with_test._test["news"]["record"]
    assert sum(len(b["target"]) for b in with_test.holdout_batches("news", split="test")) == 10
    assert without.holdout_batches("news", split="test") == []


def test_synthetic_test_set_is_its_own_stream_of_the_same_task():
    base = permutation_sequences(0, "a", 50, 8, 16, jump_prob=0.3)
    assert (permutation_sequences(0, "a", 50, 8, 16, jump_prob=0.3, stream=0) == base).all()
    other = permutation_sequences(0, "a", 50, 8, 16, jump_prob=0.3, stream=1)
    assert not (other == base).all()
    config = {
        "max_length": 8,
        "train_size": 24,
        "holdout_size": 6,
        "synthetic_vocab": 16,
        "synthetic_jump": 0.3,
    }
    dm = ContinualDataModule([TaskSpec("a")], test_size=5, **config)
    dm.setup()
    plain = ContinualDataModule([TaskSpec("a")], test_size=0, **config)
    plain.setup()
    assert dm._holdout["a"]["input_ids"] == plain._holdout["a"]["input_ids"]
    assert dm._train["a"]["input_ids"] == plain._train["a"]["input_ids"]
    assert dm.split_size("a", "test") == 5
    seen = {tuple(x) for x in dm._train["a"]["input_ids"]}
    assert not {tuple(x) for x in dm._test["a"]["input_ids"]} <= seen


def test_test_size_defaults_to_holdout_size_and_split_names_are_checked(tmp_path):
    dm = news_dm(news_folder(tmp_path), test_size=None)
    assert dm.split_size("news", "test") == dm.holdout_size == 6
    with pytest.raises(ValueError, match="split must be 'validation' or 'test'"):
        dm.holdout_batches("news", split="train")
    message = _error(tmp_path / "news", task={"splits": {"dev": "x.jsonl"}})
    assert "data.tasks[0].splits" in message and "'validation' and/or 'test'" in message
    message = _error(tmp_path / "news", task={"splits": {"test": str(tmp_path / "nope.jsonl")}})
    assert "data.tasks[0].splits.test" in message and "does not exist" in message


# ----------------------------------------------------------------------------- the offline benchmark copy


@pytest.mark.skipif(not CL_BENCHMARK.is_dir(), reason=f"the offline benchmark copy {CL_BENCHMARK} is absent")
def test_cl_benchmark_folder_loads_as_a_classification_task():
    source = os.path.relpath(CL_BENCHMARK / "agnews")
    dm = ContinualDataModule(
        [{"name": "agnews", "source": source, "format": "classification", "text_field": "sentence"}],
        tokenizer="tiny",
        max_length=256,
        train_size=16,
        holdout_size=8,
        test_size=8,
    )
    dm.setup()
    info = json.loads((CL_BENCHMARK / "agnews" / "task.json").read_text())
    assert dm.spec("agnews").labels == info["labels"] and dm.spec("agnews").instruction == info["instruction"]
    whole, scored = decoded(dm, dm.holdout_batches("agnews", split="test")[0], 0)
    assert whole.startswith(
        info["instruction"] + "\nOption: World, Sports, Business, Science or Technology \n"
    )
    assert "\nAnswer: " in whole and scored.strip().removesuffix("<|endoftext|>") in info["labels"]


# ----------------------------------------------------------------------------- the O-LoRA orders (hub)

#: O-LoRA (Wang et al. 2023), Table 7: the standard CL benchmark's three task orders.
OLORA_ORDERS = {
    1: ["dbpedia", "amazon", "yahoo", "agnews"],
    2: ["dbpedia", "amazon", "agnews", "yahoo"],
    3: ["yahoo", "amazon", "agnews", "dbpedia"],
}


def order_tasks(order: int) -> list[dict]:
    config = yaml.safe_load((REPO / "configs" / "cl_benchmark" / f"order{order}.yaml").read_text())
    return config["data"]["tasks"]


@pytest.mark.parametrize("order", sorted(OLORA_ORDERS))
def test_olora_order_configs_name_hub_datasets_in_the_papers_order(order):
    tasks = order_tasks(order)
    assert [t["name"] for t in tasks] == OLORA_ORDERS[order]
    dm = ContinualDataModule(tasks, tokenizer="tiny")  # validates every entry; loads nothing
    assert all(source_kind(t.source) == "hub" for t in dm.tasks)
    assert {t.name: len(t.labels) for t in dm.tasks} == {"dbpedia": 14, "amazon": 5, "yahoo": 10, "agnews": 4}
    if CL_BENCHMARK.is_dir():  # the same instruction and label words as the offline copy
        for t in dm.tasks:
            if (CL_BENCHMARK / t.name).is_dir():
                info = json.loads((CL_BENCHMARK / t.name / "task.json").read_text())
                assert (t.instruction, t.labels) == (info["instruction"], info["labels"])


def test_hub_task_entries_render_records_of_the_hub_schema(tmp_path):
    """Each hub entry of the orders, pointed at a local file with its dataset's fields and integer
    ClassLabel values (what ``load_dataset`` gives), renders the O-LoRA prompt with the right label."""
    schema = {
        "dbpedia": {"title": "T", "content": "a village in Poland", "label": 8},
        "amazon": {"id": "x", "text": "it broke on day one", "label": 0, "label_text": "0"},
        "yahoo": {
            "id": 1,
            "topic": 3,
            "question_title": "Why study?",
            "question_content": "Really.",
            "best_answer": "To learn.",
        },
        "agnews": {"text": "Stocks rallied today", "label": 2},
    }
    for entry in order_tasks(1):
        name = entry["name"]
        source = write_jsonl(tmp_path / f"{name}.jsonl", [schema[name]] * 12)
        local = {k: v for k, v in entry.items() if k not in ("splits", "hub_config")} | {"source": source}
        dm = ContinualDataModule(
            [local], tokenizer="tiny", max_length=512, train_size=4, holdout_size=2, test_size=2
        )
        dm.setup()
        whole, scored = decoded(dm, dm.holdout_batches(name)[0], 0)
        label = dm.spec(name).labels[schema[name].get("label", schema[name].get("topic"))]
        assert whole.startswith(entry["instruction"] + "\nOption: " + ", ".join(entry["labels"]) + " \n")
        assert scored.strip().removesuffix("<|endoftext|>") == label, (name, whole)
        if name == "yahoo":  # the template joins three of its fields
            assert "\nWhy study? Really. To learn.\nAnswer:" in whole
