"""Task metrics in a real fit: two classification tasks made in code, a tiny Llama, a real Trainer.

The evaluation callback writes the loss matrix, A (the task metric: exact match for
classification) and the other metrics' matrices on validation and, per row, on test; BWT/FWT on
A go to summary.json and TensorBoard; the base (zero-shot) row comes first.
"""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets
import lightning.pytorch as pl
import numpy as np
import pytest
from conftest import TINY_CONFIGS
from crma_lightning.callbacks.adapters import AdapterCheckpoint
from crma_lightning.callbacks.evaluation import ContinualEvaluation
from crma_lightning.callbacks.freezing import FreezingPolicy
from crma_lightning.callbacks.routing import RoutingStatistics
from keyword_tasks import KEYWORDS, write_task
from lightning.pytorch.loggers import TensorBoardLogger
from subproc import run_dir_of, run_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from crma_lightning.adapters.config import LoRAConfig
from crma_lightning.backbone.loading import BackboneConfig
from crma_lightning.core.errors import ConfigError
from crma_lightning.data import ContinualDataModule, TaskSpec
from crma_lightning.runs.rundir import RunDir
from crma_lightning.training.module import ContinualLM, GroupLR


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setattr(
        datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf_cache")
    )


def fit(
    tmp_path,
    test_matrices: bool = True,
    strategy: str = "frozen",
    task_id: str = "oracle",
    router: str = "stats",
    routing: bool = True,
):
    tasks = list(KEYWORDS)
    dm = ContinualDataModule(
        [
            TaskSpec(t, source=write_task(tmp_path, t), format="classification", text_field="sentence")
            for t in tasks
        ],
        tokenizer="tiny",
        max_length=64,
        train_size=64,
        holdout_size=12,
        test_size=10,
        batch_size=8,
        eval_batch_size=8,
        epochs_per_task=4,
    )
    # A wider init than the default 0.02: behind the final norm, LoRAs of a random model that small
    # cannot otherwise move the logits far enough to learn a label in a few steps.
    module = ContinualLM(
        BackboneConfig(
            config={
                **TINY_CONFIGS["llama"],
                "vocab_size": 512,
                "max_position_embeddings": 128,
                "initializer_range": 0.2,
            }
        ),
        tasks,
        strategy=strategy,
        lora=LoRAConfig(r=8, dropout=0.0, target_modules="all-linear"),
        lr=GroupLR(lora=1e-2),
        seed=0,
    )
    evaluation = ContinualEvaluation(
        print_table=False, test_matrices=test_matrices, task_id=task_id, router=router
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=dm.total_epochs,
        reload_dataloaders_every_n_epochs=1,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        logger=TensorBoardLogger(tmp_path / "runs", name="cls"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[
            FreezingPolicy(),
            *([RoutingStatistics()] if routing else []),
            evaluation,
            AdapterCheckpoint(),
        ],
    )
    trainer.fit(module, datamodule=dm)
    return RunDir(trainer.log_dir), evaluation


def test_classification_fit_writes_task_metric_matrices_on_validation_and_test(tmp_path):
    run, evaluation = fit(tmp_path)
    tasks = list(KEYWORDS)
    for split in ("validation", "test"):
        names = sorted(p.name for p in run.results_of(split).glob("*.csv"))
        assert names == [
            "accuracy_matrix.csv",
            "label_accuracy_matrix.csv",
            "loss_matrix.csv",
            "token_accuracy_matrix.csv",
        ], split
        acc, label, loss = (
            run.read_matrix(n, split) for n in ("accuracy_matrix", "label_accuracy_matrix", "loss_matrix")
        )
        assert acc.rows == ["base", *tasks] and acc.tasks == tasks
        assert ((acc.values >= 0) & (acc.values <= 1)).all() and (
            (label.values >= 0) & (label.values <= 1)
        ).all()
        # Learnt: on the task just trained, the label is chosen and generated right nearly always,
        # and its loss fell far below the zero-shot row's.
        for i in range(len(tasks)):
            assert label.values[i + 1, i] >= 0.9 and acc.values[i + 1, i] >= 0.9, (
                split,
                label.values,
                acc.values,
            )
            assert loss.values[i + 1, i] < loss.values[0, i] / 3
        # FROZEN keeps task 1's LoRA: its row after task 2 equals the row after task 1.
        np.testing.assert_allclose(acc.values[2, 0], acc.values[1, 0])
        summary = run.read_summary(split)
        assert summary["split"] == split and summary["task_metric"] == {t: "exact_match" for t in tasks}
        assert summary["bwt"] == pytest.approx(acc.values[2, 0] - acc.values[1, 0])
        assert summary["fwt"] == pytest.approx(acc.values[1, 1] - acc.values[0, 1])
        assert summary["final_avg_accuracy"] == pytest.approx(acc.values[-1].mean())
        assert summary["final_avg_label_accuracy"] == pytest.approx(label.values[-1].mean())
        assert summary["evaluation_s"] > 0
        # The final row's score of every example, for paired comparisons of runs: they average to
        # the final row exactly (the earlier tasks' cells were reused under FROZEN, examples too).
        examples = summary["final_examples"]["task_id"]
        sizes = {"validation": 12, "test": 10}
        for i, t in enumerate(tasks):
            assert len(examples[t]) == sizes[split] and set(examples[t]) <= {0.0, 1.0}
            assert np.mean(examples[t]) == pytest.approx(acc.values[-1, i], abs=1e-12)
            # and each example's loss sum and tokens: pooled, the final row's loss
            pooled = np.asarray(summary["final_losses"]["task_id"][t]).sum(0)
            assert len(summary["final_losses"]["task_id"][t]) == sizes[split]
            assert pooled[0] / pooled[1] == pytest.approx(loss.values[-1, i], rel=1e-6)
        assert summary["evaluation_reused_cells"] > 0
    # The test split is other examples than validation: the matrices are computed apart.
    assert (
        run.read_matrix("loss_matrix", "test").values.tolist()
        != run.read_matrix("loss_matrix").values.tolist()
    )
    assert evaluation.acc_rows == {
        r: list(v)
        for r, v in zip(["base", *tasks], run.read_matrix("accuracy_matrix").values.tolist(), strict=True)
    }

    events = EventAccumulator(str(run.path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "val/news/accuracy",
        "val/mood/label_accuracy",
        "test/news/accuracy",
        "cl/bwt",
        "cl_test/bwt",
        "cl_test/fwt",
    ):
        assert tag in tags, (tag, sorted(tags))
    assert [e.step for e in events.Scalars("test/mood/accuracy")] == [0, 1, 2]  # base + after each task
    assert events.Scalars("cl_test/bwt")[-1].value == pytest.approx(run.read_summary("test")["bwt"], rel=1e-5)


def test_test_matrices_can_be_turned_off_and_resume_state_round_trips(tmp_path):
    run, evaluation = fit(tmp_path, test_matrices=False)
    assert not run.results_of("test").exists()
    restored = ContinualEvaluation()
    restored.load_state_dict(evaluation.state_dict())
    assert restored.rows == evaluation.rows and restored.splits == ["validation"]  # no test rows to extend
    legacy = {k: v for k, v in evaluation.state_dict().items() if k not in ("rows", "evaluation_s")}
    legacy |= {"loss_rows": evaluation.loss_rows, "acc_rows": evaluation.acc_rows}
    old = ContinualEvaluation()
    old.load_state_dict(legacy)
    assert old.loss_rows == evaluation.loss_rows and old.splits == ["validation"]


@pytest.mark.parametrize(
    ("strategy", "router"), [("frozen", "stats"), ("frozen", "loss"), ("naive", "stats")]
)
def test_without_the_task_id_routes_per_task_loras_and_reuses_one_model_rows(strategy, router, tmp_path):
    run, evaluation = fit(tmp_path, test_matrices=False, strategy=strategy, task_id="both", router=router)
    tasks = list(KEYWORDS)
    oracle, blind = run.read_matrix("accuracy_matrix"), run.read_matrix("accuracy_matrix_no_task_id")
    assert blind.rows == ["base", *tasks]
    np.testing.assert_array_equal(blind.values[0], oracle.values[0])  # the base row: no adapter yet
    np.testing.assert_array_equal(
        run.read_matrix("loss_matrix_no_task_id").values[0], run.read_matrix("loss_matrix").values[0]
    )
    summary = run.read_summary()["no_task_id"]
    if strategy == "naive":  # one shared LoRA serves every input: the same numbers
        np.testing.assert_array_equal(blind.values, oracle.values)
        assert (
            summary["routing"] == "shared"
            and not (run.results / "routing_accuracy_matrix_no_task_id.csv").exists()
        )
        return
    routing = run.read_matrix("routing_accuracy_matrix_no_task_id")
    # After task 1 only its adapter exists: every news example goes to it; mood has no adapter yet.
    assert (
        routing.values[1, 0] == 1.0 and np.isnan(routing.values[1, 1]) and np.isnan(routing.values[0]).all()
    )
    # After task 2 the prompts ("The news?" / "The mood?") are told apart: by their features in the
    # frozen base (stats), or by their own adapters (loss).
    assert (routing.values[2] == 1.0).all(), routing.values  # measured with both routers
    assert summary["router"] == router
    np.testing.assert_array_equal(blind.values[1], oracle.values[1])  # one candidate: the oracle's row
    np.testing.assert_array_equal(blind.values[2], oracle.values[2])  # all routed right: the oracle's row
    loss = [run.read_matrix(n).values[2] for n in ("loss_matrix_no_task_id", "loss_matrix")]
    # Each example scored by the same adapter; the loss router keeps every prompt position's logits
    # (logits_to_keep=0), the oracle the last one's: equal to float32 rounding (measured 1e-7).
    np.testing.assert_allclose(*loss, rtol=1e-6)
    assert summary["routing"] == "route" and summary["final_avg_routing_accuracy"] == pytest.approx(
        routing.values[2].mean()
    )
    assert summary["final_avg_accuracy"] == pytest.approx(blind.values[2].mean())
    # routed, each example scored under the adapter it went to, in the oracle's example order
    examples = run.read_summary()["final_examples"]
    for i, t in enumerate(tasks):
        assert np.mean(examples["no_task_id"][t]) == pytest.approx(blind.values[2, i], abs=1e-12)
        assert examples["no_task_id"][t] == examples["task_id"][t]  # all routed right
    assert summary["bwt"] == pytest.approx(blind.values[2, 0] - blind.values[1, 0])
    events = EventAccumulator(str(run.path))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "val/news/routing_accuracy_no_task_id",
        "val/mood/accuracy_no_task_id",
        "cl_no_task_id/bwt",
    } <= tags


def test_routing_by_statistics_needs_the_routing_callback(tmp_path):
    with pytest.raises(ConfigError, match=r"routing.enabled: true, or evaluation.router: loss"):
        fit(tmp_path, test_matrices=False, task_id="none", routing=False)


def test_task_id_none_evaluates_only_without_the_task_id(tmp_path):
    """``task_id: none``: the matrices are what ``both`` writes as ``*_no_task_id`` (the same seeded
    fit), with one evaluation per row, and the summary says how they were made."""
    (tmp_path / "both").mkdir(), (tmp_path / "none").mkdir()
    both, _ = fit(tmp_path / "both", test_matrices=False, strategy="frozen", task_id="both")
    none, evaluation = fit(tmp_path / "none", test_matrices=False, strategy="frozen", task_id="none")
    for metric in ("loss", "accuracy", "label_accuracy", "routing_accuracy"):
        blind = both.read_matrix(f"{metric}_matrix_no_task_id")
        np.testing.assert_allclose(
            none.read_matrix(f"{metric}_matrix").values, blind.values, atol=1e-6, err_msg=metric
        )
    assert not list(none.results.glob("*_no_task_id.csv")) and list(evaluation.rows) == ["validation"]
    assert none.read_summary()["task_id"] == "none" and both.read_summary()["task_id"] == "given"
    assert none.read_summary()["bwt"] == pytest.approx(both.read_summary()["no_task_id"]["bwt"], abs=1e-6)


# Six train.py processes (75 s for modular): with the slow tests; the default suite checks the
# callback's matrices and task_id none in process.
@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["modular", "naive"])
def test_test_run_rebuilds_the_matrices_of_fit_from_the_adapters(strategy, tmp_path):
    """``train.py test --run`` after ``train.py fit``: every row rebuilt from adapters/ (CRMA history,
    per-task or shared LoRAs) scores the test split as the callback did during fit."""
    tasks = [
        {"name": t, "source": write_task(tmp_path, t), "format": "classification", "text_field": "sentence"}
        for t in KEYWORDS
    ]
    backbone = {
        **TINY_CONFIGS["llama"],
        "vocab_size": 512,
        "max_position_embeddings": 128,
        "initializer_range": 0.2,
    }
    args = [
        "--config",
        "configs/tiny.yaml",
        "--config",
        f"configs/methods/{strategy}.yaml",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "runs"),
        "--data.tasks",
        json.dumps(tasks),
        "--data.tokenizer",
        "tiny",
        "--data.max_length",
        "64",
        "--data.train_size",
        "32",
        "--data.holdout_size",
        "8",
        "--data.test_size",
        "6",
        "--data.epochs_per_task",
        "1",
        "--data.batch_size",
        "8",
        "--data.eval_batch_size",
        "4",
        "--model.backbone.config",
        json.dumps(backbone),
        "--evaluation.task_id",
        "both",
    ]
    proc = run_train("fit", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test task metric (exact_match)" in proc.stdout  # the final tables, test split included
    said = [line for line in proc.stdout.splitlines() if line.startswith("evaluated ")]  # one per row
    assert [line.split(":")[0] for line in said] == [
        "evaluated base model",
        "evaluated after news",
        "evaluated after mood",
    ]
    run = RunDir(run_dir_of(proc))
    names = ("loss_matrix", "accuracy_matrix", "label_accuracy_matrix", "token_accuracy_matrix")
    names += tuple(f"{n}_no_task_id" for n in names)
    if strategy == "modular":  # per-task LoRAs are routed; naive's one shared LoRA serves every input
        names += ("routing_accuracy_matrix_no_task_id",)
    during_fit = {n: run.read_matrix(n, "test") for n in names}
    loss = during_fit["loss_matrix"].values
    assert loss[1, 0] < loss[0, 0] - 0.5 and loss[2, 1] < loss[1, 1] - 0.5  # rows that differ: trained
    assert (run.crma_after("mood").is_dir()) == (strategy == "modular")

    proc = run_train("test", "--run", str(run.path), "--task-id", "both")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "test loss" in proc.stdout and "without the task id" in proc.stdout and "bwt=" in proc.stdout
    for name in names:
        rebuilt = run.read_matrix(name, "test")
        assert rebuilt.rows == ["base", *KEYWORDS] and rebuilt.tasks == list(KEYWORDS)
        np.testing.assert_array_equal(rebuilt.values, during_fit[name].values, err_msg=name)  # measured equal
    summary = run.read_summary("test")
    assert summary["rebuilt_from_adapters"] and summary["split"] == "test"
    assert summary["bwt"] == pytest.approx(
        during_fit["accuracy_matrix"].values[2, 0] - during_fit["accuracy_matrix"].values[1, 0], abs=1e-6
    )

    # LightningCLI's test on the last checkpoint (the state of the last row) reads the test split;
    # it logs token accuracy, and leaves "accuracy" (here exact match, generated) to the callback.
    last = str(run.path / "checkpoints" / "last.ckpt")
    proc = run_train(
        "test",
        *args,
        "--trainer.logger",
        "false",
        "--trainer.default_root_dir",
        str(tmp_path / "cli_test"),
        "--ckpt_path",
        last,
        env={"COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = {
        cells[1].strip(): float(cells[2].strip().rstrip("…"))
        for line in proc.stdout.splitlines()
        if len(cells := line.split("│")) > 3 and cells[1].strip().startswith("test/")
    }
    assert sorted(logged) == sorted(f"test/{t}/{m}" for t in KEYWORDS for m in ("loss", "token_accuracy")), (
        logged
    )
    for i, task in enumerate(KEYWORDS):  # measured 2.6e-7: Lightning's float32 mean vs the callback's sums
        assert logged[f"test/{task}/loss"] == pytest.approx(during_fit["loss_matrix"].values[-1, i], abs=2e-6)
        assert logged[f"test/{task}/token_accuracy"] == pytest.approx(
            during_fit["token_accuracy_matrix"].values[-1, i], abs=2e-6
        )

    proc = run_train("test", "--run", str(run.path), "--split", "validation")
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(
        run.read_matrix("loss_matrix").values[-1], run.read_matrix("loss_matrix", "validation").values[-1]
    )
    proc = run_train("test", "--run", str(run.path), "--task-id", "none")  # only without the task id
    assert proc.returncode == 0 and "without the task id" in proc.stdout, proc.stderr[-3000:]
    for name in ("loss_matrix", "accuracy_matrix"):
        blind = during_fit[f"{name}_no_task_id"].values
        np.testing.assert_array_equal(run.read_matrix(name, "test").values, blind, err_msg=name)
    assert run.read_summary("test")["task_id"] == "none"
    if strategy == "modular":  # the statistics router needs the run's routing statistics
        assert run.read_summary("test")["router"] == "stats"
        shutil.rmtree(run.path / "routing")
        proc = run_train("test", "--run", str(run.path), "--task-id", "none")
        assert proc.returncode == 2 and "--build-stats" in proc.stderr and "--router loss" in proc.stderr, (
            proc.stderr[-2000:]
        )
        proc = run_train("test", "--run", str(run.path), "--task-id", "none", "--router", "loss")
        assert proc.returncode == 0 and run.read_summary("test")["router"] == "loss", proc.stderr[-3000:]
    if strategy == "modular":  # a run made before the CRMA history: one clear line, nothing written
        shutil.rmtree(run.path / "adapters" / "crma_history")
        proc = run_train("test", "--run", str(run.path))
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[
            -2000:
        ]
        assert "crma_history" in errors[0] and "--ckpt_path" in errors[0]
