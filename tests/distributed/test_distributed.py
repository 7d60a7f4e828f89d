"""DDP on CPU (gloo): two processes give the same result as one process with the same global batch.

For every strategy: the loss matrix within 5e-6 of one process (the evaluation sums of both rank
shards are all-reduced: rank 0's half of the holdout alone would give another matrix), the saved
adapters bit-identical, the routing statistics within float rounding and the same routing
decisions, every rank holding bit-identical adapters at every task end, and each finished task's
LoRA bit-identical in the last checkpoint to its value at its task's end (so DDP neither skipped
nor moved a parameter whose trainability changed after the wrap). Also two simulated nodes (one
process each, NODE_RANK 0/1 on localhost).

``train.py fit`` runs as a subprocess in its own process group with a timeout; the group is
killed on timeout, so no rank outlives the test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from distributed_helpers import (
    MICRO_8X2,
    SMALL,
    assert_finished_loras_frozen,
    assert_matches_single,
    assert_ranks_agree,
    assert_same_routing,
    fit_nodes,
    fit_once,
    run_dir_of,
)
from safetensors.torch import load_file
from subproc import REPO, run_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from crma_lightning.runs.rundir import read_matrix_csv

pytestmark = pytest.mark.e2e  # every test here runs a fit through train.py's CLI

DDP = ["--trainer.strategy", "ddp_find_unused_parameters_true"]


def single_run(tmp_path_factory, strategy: str) -> Path:
    """One process summing the same two micro-batches of 8 as the two ranks (accumulate 2).

    A plain batch of 16 is not a reference that should agree: right after the per-task optimizer
    reset, Adam's first steps are about lr * sign(g), so near-zero gradient entries of a fresh
    LoRA flip sign with the float summation order (measured: up to 1.3e-3 on `beta`'s LoRA under
    MODULAR, 3e-2 on NAIVE's third row). DDP and 8 x 2 accumulation train bit-identical adapters.
    """
    args = [
        "--config",
        "configs/tiny.yaml",
        "--config",
        f"configs/methods/{strategy}.yaml",
        *SMALL,
        *MICRO_8X2,
    ]
    return fit_once(tmp_path_factory, *args)


def ddp_args(strategy: str) -> list[str]:
    # 8 per rank x 2 ranks = the single run's batch of 16
    return [
        "--config",
        "configs/tiny.yaml",
        "--config",
        f"configs/methods/{strategy}.yaml",
        *SMALL,
        *DDP,
        "--data.batch_size",
        "8",
    ]


@pytest.mark.parametrize(
    "strategy",
    [
        "modular",
        pytest.param("frozen", marks=pytest.mark.slow),
        pytest.param("naive", marks=pytest.mark.slow),
    ],
)
def test_ddp_two_ranks_match_one_process_with_the_same_global_batch(strategy, tmp_path, tmp_path_factory):
    single = single_run(tmp_path_factory, strategy)
    # Plain `ddp`, what most users type: the CLI turns on find_unused_parameters (each task trains
    # only its own adapters) and says so in one line.
    proc = run_train(
        "fit",
        *ddp_args(strategy),
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "ddp"),
    )
    ddp = run_dir_of(proc)
    assert (proc.stdout + proc.stderr).count("DDP: find_unused_parameters=True") == 1
    assert_matches_single(ddp, single)
    assert_ranks_agree(ddp, world_size=2)
    assert_same_routing(ddp, single)
    if strategy == "naive":
        # One shared LoRA trained on every task: it must have moved between task ends.
        a, b = (load_file(ddp / "adapters" / t / "adapter_model.safetensors") for t in ("alpha", "beta"))
        assert any(not a[k].equal(b[k]) for k in a)
    else:
        assert_finished_loras_frozen(ddp, tmp_path, finished=["alpha", "beta"])


@pytest.mark.slow
def test_ddp_two_simulated_nodes_match_one_process(tmp_path, tmp_path_factory):
    single = single_run(tmp_path_factory, "modular")
    run = fit_nodes(tmp_path / "nodes", 2, *ddp_args("modular"))
    assert_matches_single(run, single)
    assert_ranks_agree(run, world_size=2)
    assert_finished_loras_frozen(run, tmp_path, finished=["alpha", "beta"])


def _ddp_with(save_dir: Path, *callbacks: dict, extra: tuple[str, ...] = ()):
    listed = [
        *callbacks,
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 10},
        },
    ]
    return run_train(
        "fit",
        *ddp_args("modular"),
        "--trainer.devices",
        "2",
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        "--trainer.callbacks",
        json.dumps(listed),
        *extra,
        env={"PYTHONPATH": str(REPO / "tests")},
    )


@pytest.mark.slow
def test_ranks_that_diverge_stop_the_run_at_the_next_task_end(tmp_path):
    # One rank's adapter moved by 1e-3 mid-task: the hashes exchanged at the task end differ, and
    # the run stops there with one error line (exit 1) instead of training on with two models.
    proc = _ddp_with(tmp_path, {"class_path": "faults.PerturbOnRank", "init_args": {"step": 3, "rank": 1}})
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors and "after task 'alpha' the ranks hold different adapters" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "tiny" / "version_0" / "adapters" / "alpha").exists()  # nothing of it was written


@pytest.mark.slow
def test_a_nonfinite_loss_on_one_rank_is_skipped_on_every_rank(tmp_path):
    # NaN on rank 1 only, model.nonfinite: skip. The decision is all-reduced, so both ranks skip the
    # step: the run ends (diverged replicas would stop it at the task end) and counts one skip.
    proc = _ddp_with(
        tmp_path,
        {"class_path": "faults.NaNAt", "init_args": {"step": 5, "where": "loss", "rank": 1}},
        extra=("--model.nonfinite", "skip"),
    )
    run = run_dir_of(proc)
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert acc.Scalars("train/nonfinite_skipped")[-1].value == 1.0
    assert_ranks_agree(run, world_size=2)


@pytest.mark.slow
def test_ddp_task_metrics_with_and_without_the_task_id_match_one_process(tmp_path, tmp_path_factory):
    """Classification tasks under DDP: exact match of generated answers, label-set accuracy and
    routing without the task id are counted over every example of both ranks' shards, on validation
    and test sets whose sizes do not divide by the ranks (13 and 11: one rank pads with a
    zero-weight example), and agree with the single process's numbers.

    Every metric must be a whole number of examples out of 13 (11): rank 0's shard alone, or a
    padding example counted, would give sevenths or fourteenths. The one-process reference
    accumulates two micro-batches of 8 and labels score 4 or 7 tokens: both take the token mean over
    all 16 examples (a mean of micro-batch means was 6.5e-3 off in loss and one test example).
    """
    from conftest import TINY_CONFIGS
    from keyword_tasks import KEYWORDS, write_task

    sources = {
        t: write_task(tmp_path, t) for t in KEYWORDS
    }  # labels of 4 ("Sports") and 7 ("Business") tokens
    tasks = [
        {"name": t, "source": s, "format": "classification", "text_field": "sentence"}
        for t, s in sources.items()
    ]
    backbone = {
        **TINY_CONFIGS["llama"],
        "vocab_size": 512,
        "max_position_embeddings": 128,
        "initializer_range": 0.2,
    }
    common = [
        "--config",
        "configs/tiny.yaml",
        "--config",
        "configs/methods/frozen.yaml",
        "--data.tasks",
        json.dumps(tasks),
        "--data.tokenizer",
        "tiny",
        "--data.max_length",
        "64",
        "--data.train_size",
        "64",
        "--data.holdout_size",
        "13",
        "--data.test_size",
        "11",
        "--data.epochs_per_task",
        "4",
        "--model.lr.lora",
        "0.01",
        "--data.eval_batch_size",
        "4",
        "--model.backbone.config",
        json.dumps(backbone),
        "--evaluation.task_id",
        "both",
    ]
    single = fit_once(tmp_path_factory, *common, *MICRO_8X2)
    proc = run_train(
        "fit",
        *common,
        *DDP,
        "--data.batch_size",
        "8",
        "--trainer.devices",
        "2",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "ddp"),
    )
    ddp = run_dir_of(proc)
    names = ["loss_matrix", "accuracy_matrix", "label_accuracy_matrix"]
    names += [f"{n}_no_task_id" for n in names] + ["routing_accuracy_matrix_no_task_id"]
    for split, count in (("", 13), ("test/", 11)):
        for name in names:
            one = read_matrix_csv(single / "continual" / f"{split}{name}.csv")
            two = read_matrix_csv(ddp / "continual" / f"{split}{name}.csv")
            assert (one.rows, one.tasks) == (two.rows, two.tasks)
            m_1, m_2 = one.values, two.values
            if name.startswith("loss"):  # measured: 1e-7, the all-reduced sums' float32 rounding
                np.testing.assert_allclose(m_2, m_1, atol=1e-6, rtol=0, err_msg=split + name)
                continue
            real = ~np.isnan(m_2)
            assert np.array_equal(real, ~np.isnan(m_1)), split + name
            np.testing.assert_allclose(
                m_2[real] * count, np.round(m_2[real] * count), atol=1e-4, err_msg=split + name
            )
            np.testing.assert_array_equal(m_2, m_1, err_msg=split + name)
    accuracy = read_matrix_csv(single / "continual" / "test" / "accuracy_matrix.csv")[2]
    assert accuracy[-1].min() > accuracy[0].max()  # trained: the metrics compared are not all zero
