"""A layout, a regulariser and a callback defined outside the package
(tests/methods/extension_plugins.py, given by ``class_path``) train, evaluate with and without the
task id, serve, export, and rebuild their rows with ``test --run``, like the built-in ones."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from subproc import run_dir_of, run_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from crma_lightning.core.errors import ConfigError
from crma_lightning.runs.rundir import RunDir
from crma_lightning.serve import export_task, load_exported, load_run

pytestmark = pytest.mark.e2e  # every test here runs a fit through train.py's CLI

PLUGINS = Path(__file__).resolve().parent
ENV = {"PYTHONPATH": str(PLUGINS)}
SMALL = [
    "--data.train_size",
    "64",
    "--data.holdout_size",
    "16",
    "--data.test_size",
    "16",
    "--trainer.enable_progress_bar",
    "false",
]


def fit(tmp_path: Path, *args: str) -> RunDir:
    proc = run_train(
        "fit",
        "--config",
        "configs/tiny.yaml",
        *SMALL,
        *args,
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        env=ENV,
    )
    return RunDir(run_dir_of(proc))


def rebuilt_rows_equal_the_fit(run: RunDir, names: list[str]) -> None:
    """``test --run`` refuses the run without --allow-foreign-classes, and with it rebuilds the rows
    the fit wrote. Measured up to 1.0e-6 apart on losses near 4.5 (float order), as the built-in
    modular layout's rows are on this config (configs/tiny.yaml with SMALL)."""
    during_fit = {n: run.read_matrix(n, "test") for n in names}
    refused = run_train("test", "--run", str(run.path), "--task-id", "both", env=ENV)
    assert refused.returncode == 2 and "--allow-foreign-classes" in refused.stderr, refused.stderr[-2000:]
    proc = run_train("test", "--run", str(run.path), "--task-id", "both", "--allow-foreign-classes", env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert run.read_summary("test")["rebuilt_from_adapters"]
    for name in names:
        rebuilt = run.read_matrix(name, "test").values
        np.testing.assert_allclose(rebuilt, during_fit[name].values, rtol=0, atol=3e-6, err_msg=name)


@pytest.fixture
def plugins_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGINS))
    yield
    sys.modules.pop("extension_plugins", None)


@pytest.mark.slow
def test_a_layout_from_outside_the_package(tmp_path, plugins_importable):
    layout = json.dumps({"class_path": "extension_plugins.SharedLoRAWithCRMA"})
    run = fit(tmp_path, "--model.strategy", "null", "--model.layout", layout, "--evaluation.task_id", "both")
    summary = run.read_summary("test")
    assert summary["strategy"] == "naive_crma" and summary["no_task_id"]["routing"] == "shared"
    assert (run.crma_after("gamma")).is_dir() and run.adapter("gamma").is_dir()  # CRMA and the shared LoRA
    loss = run.read_matrix("loss_matrix", "test").values
    blind = run.read_matrix("loss_matrix_no_task_id", "test").values
    np.testing.assert_array_equal(blind, loss)  # one shared model: the task id changes nothing
    rebuilt_rows_equal_the_fit(run, ["loss_matrix", "accuracy_matrix", "loss_matrix_no_task_id"])

    with pytest.raises(ConfigError, match="allow-foreign-classes"):
        load_run(run.path)
    served = load_run(run.path, allow_foreign_classes=True)
    assert served.layout.name == "naive_crma" and served.route([[5, 6, 7, 8]]) == ["gamma"]
    assert served.generate([5, 6, 7], task="alpha", max_new_tokens=4) == served.generate(
        [5, 6, 7], task="gamma", max_new_tokens=4
    )  # every task is served by the same shared LoRA and CRMA
    exported = load_exported(export_task(served, "beta", tmp_path / "beta"))
    x = torch.tensor([[5, 9, 14, 20, 33, 41, 50, 7]])
    assert (exported.logits(x) - served.logits(x, task="beta")).abs().max() <= 2e-6


@pytest.mark.slow
def test_a_regularizer_and_a_callback_from_outside_the_package(tmp_path, plugins_importable):
    reg = json.dumps([{"class_path": "extension_plugins.L2ToTaskStart", "init_args": {"weight": 10.0}}])
    callback = json.dumps([{"class_path": "extension_plugins.TaskEndLog"}])
    run = fit(
        tmp_path,
        "--config",
        "configs/methods/naive.yaml",
        "--model.regularizers",
        reg,
        "--trainer.callbacks+",
        callback,
    )
    ends = (run.path / "task_ends.txt").read_text().split()
    assert ends[0::2] == ["alpha", "beta", "gamma"]  # once per task, in order
    events = EventAccumulator(str(run.path)).Reload()
    terms = [e.value for e in events.Scalars("train/reg/l2_start")]
    assert len(terms) > 0 and max(terms) > 0  # its penalty reached the loss from the second task on
    rebuilt_rows_equal_the_fit(run, ["loss_matrix", "accuracy_matrix"])
    served = load_run(run.path, allow_foreign_classes=True)
    assert served.strategy == "naive" and len(served.generate([5, 6, 7], task="beta", max_new_tokens=3)) == 3
