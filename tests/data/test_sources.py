"""Task sources (crma_lightning.data.sources): the built-ins' claiming order, a registered source
and one given as ``data.sources`` claiming before them, an unknown source falling back to the hub
with its old error, and end to end a source defined in the test tree (plugin_source.py): ``fit``
trains on it and ``test --run`` rebuilds the run's rows with ``--allow-foreign-classes``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/: subproc.py

from plugin_source import ReversedLines
from subproc import run_dir_of, run_train

from crma_lightning.core.errors import ConfigError
from crma_lightning.data import ContinualDataModule, TaskSpec
from crma_lightning.data.sources import (
    FileSource,
    HubSource,
    TaskSource,
    find_source,
    load_records,
    register,
    source_from_config,
    source_kind,
    unregister,
)
from crma_lightning.runs.rundir import RunDir
from crma_lightning.runs.runinfo import read_run
from crma_lightning.serve import export_task, load_exported, load_run

HERE = Path(__file__).resolve().parent
LINES = [
    f"line {i}: the {w} sat on mat number {i * 7 % 13}" for i, w in enumerate(["cat", "dog", "owl"] * 16)
]


@pytest.fixture
def lines(tmp_path) -> Path:
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    return path


def test_the_builtins_claim_in_order_and_the_hub_is_the_fallback(tmp_path, lines):
    (tmp_path / "folder").mkdir()
    assert source_kind("synthetic") == "synthetic"
    assert source_kind("corpus:medical") == "corpus"
    assert source_kind(str(lines)) == source_kind("missing.jsonl") == source_kind("./missing") == "file"
    assert source_kind(str(tmp_path / "folder")) == "folder"
    assert source_kind("owner/dataset") == source_kind("reversed:lines") == "hub"


def test_an_unknown_source_still_gives_the_old_errors(lines):
    """Without its source class, ``reversed:<file>.txt`` is a missing file, ``reversed:<name>`` a hub
    name (offline: not found), as before task sources were classes."""
    with pytest.raises(
        ConfigError, match=r"data\.tasks\[0\]\.source: file 'reversed:.*lines\.txt' does not exist"
    ):
        ContinualDataModule([TaskSpec("r", source=f"reversed:{lines}")], tokenizer="tiny")
    dm = ContinualDataModule([TaskSpec("r", source="reversed:lines")], tokenizer="tiny")
    assert isinstance(dm.source_of(dm.tasks[0]), HubSource)
    dm.prepare_data()  # offline: nothing to download
    with pytest.raises(ConfigError) as info:
        dm.setup()
    message = str(info.value)
    assert "task 'r' (data.tasks[0].source)" in message
    assert "looked up as a hub dataset" in message and "offline" in message and "local file" in message


class Shouted(TaskSource):
    """``*.shout.txt`` files (which the built-in file source would claim), read upper-cased."""

    kind = "shout"

    def claims(self, source: str) -> bool:
        return source.endswith(".shout.txt")

    def load(self, index: int, task: TaskSpec, location: str) -> datasets.Dataset:
        lines = Path(location).read_text(encoding="utf-8").splitlines()
        return datasets.Dataset.from_dict({"text": [line.upper() for line in lines]})


@pytest.fixture
def shouted():
    register(Shouted)
    register(Shouted)  # twice: still one
    yield Shouted
    unregister(Shouted)


def test_a_registered_source_is_chosen_over_the_builtins(tmp_path, shouted):
    path = tmp_path / "a.shout.txt"
    path.write_text("\n".join(LINES), encoding="utf-8")
    assert source_kind(str(path)) == "shout"
    assert isinstance(find_source(str(tmp_path / "a.txt")), FileSource)  # other files: still the built-in
    dm = ContinualDataModule(
        [TaskSpec("s", source=str(path))], tokenizer="tiny", max_length=16, train_size=8, holdout_size=4
    )
    source = dm.source_of(dm.tasks[0])
    assert isinstance(source, Shouted)
    assert load_records(0, dm.tasks[0], source)["text"] == [line.upper() for line in LINES]
    dm.setup()
    assert dm.num_train_examples("s") == 8
    unregister(Shouted)
    assert isinstance(find_source(str(path)), FileSource)


def test_data_sources_claim_first_and_report_their_problems(tmp_path, lines, shouted):
    task = TaskSpec("r", source=f"reversed:{lines}")
    dm = ContinualDataModule(
        [task], tokenizer="tiny", max_length=16, train_size=8, holdout_size=4, sources=[ReversedLines()]
    )
    source = dm.source_of(dm.tasks[0])
    assert isinstance(source, ReversedLines)
    assert load_records(0, dm.tasks[0], source)["text"] == [line[::-1] for line in LINES]
    # Given first, a source claims even what a registered one would.
    path = tmp_path / "a.shout.txt"
    path.write_text("x\n", encoding="utf-8")
    anything = ContinualDataModule(
        [TaskSpec("x", source=str(path))], tokenizer="tiny", sources=[ReversedLines(prefix="")]
    )
    assert isinstance(anything.source_of(anything.tasks[0]), ReversedLines)
    with pytest.raises(ConfigError, match=r"data\.tasks\[0\]\.source: file '.*nowhere\.txt' does not exist"):
        ContinualDataModule(
            [TaskSpec("r", source=f"reversed:{tmp_path}/nowhere.txt")],
            tokenizer="tiny",
            sources=[ReversedLines()],
        )
    with pytest.raises(ConfigError, match=r"data\.sources must be"):
        ContinualDataModule([task], tokenizer="tiny", sources=["plugin_source.ReversedLines"])


def test_sources_of_a_saved_config_are_rebuilt_or_refused_clearly():
    assert isinstance(source_from_config({"class_path": "plugin_source.ReversedLines"}), ReversedLines)
    rebuilt = source_from_config(
        {"class_path": "plugin_source.ReversedLines", "init_args": {"prefix": "rev:"}}
    )
    assert rebuilt.prefix == "rev:"
    with pytest.raises(ConfigError, match="cannot import 'no_such_module.Source'.*PYTHONPATH"):
        source_from_config({"class_path": "no_such_module.Source"})
    with pytest.raises(ConfigError, match="is not a TaskSource subclass"):
        source_from_config({"class_path": "pathlib.Path"})


@pytest.mark.e2e
def test_a_source_from_the_test_tree_trains_and_the_run_rebuilds(tmp_path, lines):
    """``fit`` with a task source named in data.sources (imported from PYTHONPATH), then ``test --run``:
    refused without --allow-foreign-classes, and with it every row rebuilt as fit measured it."""
    tasks = [{"name": "plain", "source": str(lines)}, {"name": "reversed", "source": f"reversed:{lines}"}]
    backbone = yaml.safe_load((HERE.parents[1] / "configs" / "tiny.yaml").read_text())["model"]["backbone"][
        "config"
    ]
    env = {"PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    proc = run_train(
        "fit",
        "--config",
        "configs/tiny.yaml",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--data.tasks",
        json.dumps(tasks),
        "--data.sources",
        json.dumps([{"class_path": "plugin_source.ReversedLines"}]),
        "--data.tokenizer",
        "tiny",
        "--model.backbone.config",
        json.dumps({**backbone, "vocab_size": 512}),
        "--data.max_length",
        "32",
        "--data.train_size",
        "24",
        "--data.holdout_size",
        "8",
        "--data.test_size",
        "8",
        "--data.epochs_per_task",
        "1",
        "--data.batch_size",
        "8",
        "--data.eval_batch_size",
        "8",
        "--evaluation.task_id",
        "both",
        env=env,
    )
    run = RunDir(run_dir_of(proc))
    saved = yaml.safe_load(run.config_file.read_text())["data"]["sources"]
    assert [s["class_path"] for s in saved] == ["plugin_source.ReversedLines"]
    during_fit = run.read_matrix("loss_matrix", "test")

    with pytest.raises(ConfigError, match=r"plugin_source\.ReversedLines.*--allow-foreign-classes"):
        load_run(run.path)  # what `test --run` without the flag does first
    with pytest.raises(ConfigError, match="names task sources from outside crma-lightning"):
        read_run(run.path).datamodule()  # reading a run's data imports none of its classes unasked

    blind = run.read_matrix("loss_matrix_no_task_id", "test")  # evaluated without the task id too
    proc = run_train("test", "--run", str(run.path), "--allow-foreign-classes", "--task-id", "both", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rebuilt = run.read_matrix("loss_matrix", "test")
    assert rebuilt.rows == ["base", "plain", "reversed"] and rebuilt.tasks == ["plain", "reversed"]
    np.testing.assert_allclose(rebuilt.values, during_fit.values, rtol=1e-6)  # same data, same adapters
    np.testing.assert_allclose(
        run.read_matrix("loss_matrix_no_task_id", "test").values, blind.values, rtol=1e-6
    )

    # the run serves and exports like any other (the source is needed only to read data)
    served = load_run(run.path, allow_foreign_classes=True)  # plugin_source is importable here
    text = served.generate("the cat", task="reversed", max_new_tokens=4)
    assert isinstance(text, str) and served.route(["the cat sat"])[0] in ("plain", "reversed")
    exported = load_exported(export_task(served, "reversed", tmp_path / "exported"))
    x = torch.tensor([[5, 9, 14, 20, 33, 41]])
    assert (exported.logits(x) - served.logits(x, task="reversed")).abs().max() <= 2e-6
