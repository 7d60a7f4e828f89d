"""FSDP2 on CPU (gloo): ``fully_shard`` per decoder layer through ModelParallelStrategy.

Two processes on one node and two simulated nodes (one process each, NODE_RANK 0/1 on localhost)
must give one process's matrices and adapters (same global batch), keep finished LoRAs
bit-identical, write adapter-only sharded checkpoints, and resume from one. Every ``train.py``
runs in its own process group with a timeout, killed on expiry.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_helpers import (
    MICRO_8X2,
    SMALL,
    UNFUSED,
    assert_finished_loras_frozen,
    assert_matches_single,
    assert_ranks_agree,
    fit,
    fit_nodes,
    fit_once,
    read_checkpoint_state,
)
from safetensors.torch import load_file
from subproc import REPO, run_train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from crma_lightning.runs.rundir import read_matrix_csv

FSDP2 = ["--config", "configs/distributed/fsdp2_cpu.yaml", *SMALL]


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    # configs/tiny.yaml in one process summing two micro-batches of 8 (fsdp2_cpu.yaml: 8 per rank
    # x 2), on the paths FSDP2 takes: the loss from the logits and Adam's per-tensor loop (FSDP2's
    # DTensors take neither the fused loss nor the fused Adam, whose float order differs by ~1e-7
    # a step and, compounded over a run, moved single adapter weights by up to 5e-4).
    return fit_once(
        tmp_path_factory,
        "--config",
        "configs/tiny.yaml",
        "--config",
        "configs/methods/modular.yaml",
        *SMALL,
        *MICRO_8X2,
        *UNFUSED,
    )


@pytest.fixture(scope="module")
def fsdp2(tmp_path_factory) -> Path:
    # The same fit as test_rank_loss's uninterrupted FSDP2 reference: one run when both files share a session.
    return fit_once(tmp_path_factory, *FSDP2)


@pytest.mark.e2e
@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process(fsdp2, single, tmp_path):
    # FSDP2 refuses the fused loss (the reference turned it off to take the same path).
    facts = {
        run: json.loads((run / "continual" / "summary.json").read_text())["fused_loss"]
        for run in (fsdp2, single)
    }
    assert facts[single] == "off: model.fused_loss is false"
    assert facts[fsdp2].startswith("off: sharded training"), facts[fsdp2]
    assert_matches_single(fsdp2, single)
    assert_ranks_agree(fsdp2, world_size=2)
    assert_finished_loras_frozen(fsdp2, tmp_path, finished=["alpha", "beta"])


@pytest.mark.slow
def test_fsdp2_checkpoint_is_sharded_and_holds_only_adapters(fsdp2, tmp_path):
    ckpt = fsdp2 / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir() and sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / "meta.pt").is_file()
    state = read_checkpoint_state(ckpt, tmp_path)
    assert state and all(".lora_" in k or ".crma." in k for k in state), sorted(state)[:5]


@pytest.mark.slow
def test_fsdp2_resumes_from_a_sharded_checkpoint(fsdp2, tmp_path):
    # Resume a copy of the finished run from its sharded last.ckpt (step 20 of 24, inside task 3):
    # the rest of task 3 must give the same final row and adapters.
    run = tmp_path / "fsdp2_cpu" / "version_0"
    shutil.copytree(fsdp2, run)
    resumed = fit(tmp_path, *FSDP2, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    assert resumed == run
    # It continued from step 20 (a restart from scratch would give the same numbers, so check):
    new_events = max(run.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    acc = EventAccumulator(str(new_events))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(20, 24))
    for name in ("loss_matrix.csv", "accuracy_matrix.csv"):
        before = read_matrix_csv(fsdp2 / "continual" / name).values
        after = read_matrix_csv(resumed / "continual" / name).values
        np.testing.assert_allclose(after, before, atol=1e-6, rtol=0, err_msg=name)
    for f in ("gamma/adapter_model.safetensors", "crma/crma.safetensors"):
        a, b = load_file(fsdp2 / "adapters" / f), load_file(resumed / "adapters" / f)
        for k in a:
            np.testing.assert_allclose(b[k].numpy(), a[k].numpy(), atol=1e-6, rtol=0, err_msg=f"{f}: {k}")


def _fit_killed(save_dir: Path, save: int) -> subprocess.CompletedProcess:
    fault = json.dumps(
        [
            {"class_path": "faults.KillInsideShardedSave", "init_args": {"save": save}},
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 10},
            },
        ]
    )
    return run_train(
        "fit",
        *FSDP2,
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        "--trainer.callbacks",
        fault,
        env={"PYTHONPATH": str(REPO / "tests")},
    )


@pytest.mark.e2e
@pytest.mark.slow
def test_a_kill_inside_a_sharded_save_leaves_the_previous_checkpoint(fsdp2, tmp_path):
    # Killed inside the second save (step 20): last.ckpt is still the complete step-10 checkpoint,
    # and --ckpt_path last resumes from it to the uninterrupted result.
    killed = _fit_killed(tmp_path, save=2)
    assert killed.returncode != 0
    run = tmp_path / "fsdp2_cpu" / "version_0"
    last = run / "checkpoints" / "last.ckpt"
    assert (last / "meta.pt").is_file() and torch.load(last / "meta.pt", weights_only=True)[
        "global_step"
    ] == 10
    resumed = fit(tmp_path, *FSDP2, "--ckpt_path", "last")
    assert resumed == run
    for name in ("loss_matrix.csv", "accuracy_matrix.csv"):
        np.testing.assert_allclose(
            read_matrix_csv(resumed / "continual" / name)[2],
            read_matrix_csv(fsdp2 / "continual" / name)[2],
            atol=1e-6,
            rtol=0,
            err_msg=name,
        )
    assert not (run / "checkpoints" / ".last.ckpt.partial").exists()

    # Killed inside the first save: there is no last.ckpt, and resuming says so in one line.
    first = tmp_path / "first"
    assert _fit_killed(first, save=1).returncode != 0
    assert not (first / "fsdp2_cpu" / "version_0" / "checkpoints" / "last.ckpt").exists()
    proc = run_train("fit", *FSDP2, "--trainer.logger.init_args.save_dir", str(first), "--ckpt_path", "last")
    assert proc.returncode == 2 and "has no complete checkpoint yet" in proc.stderr, proc.stderr[-2000:]


def _logged(save_dir: Path, prefix: str) -> dict[str, float]:
    """The ``<prefix>/<task>/{loss,accuracy}`` scalars of the one run under ``save_dir``."""
    events = next(save_dir.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events))
    acc.Reload()
    return {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"] if t.startswith(f"{prefix}/")}


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_validate_and_test_under_fsdp2_match_one_process(fsdp2, subcommand, tmp_path):
    # The sharded last.ckpt evaluated by 2 FSDP2 ranks, and the same weights (converted to one
    # file) by one process: every task's holdout loss and accuracy agree.
    ckpt = fsdp2 / "checkpoints" / "last.ckpt"
    sharded = run_train(
        subcommand,
        *FSDP2,
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "sharded"),
        "--ckpt_path",
        str(ckpt),
    )
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    single_ckpt = tmp_path / "single.ckpt"
    meta = torch.load(ckpt / "meta.pt", weights_only=True)
    torch.save({**meta, "state_dict": read_checkpoint_state(ckpt, tmp_path)}, single_ckpt)
    single = run_train(
        subcommand,
        "--config",
        "configs/tiny.yaml",
        *SMALL,
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "single"),
        "--ckpt_path",
        str(single_ckpt),
    )
    assert single.returncode == 0, single.stderr[-3000:]
    prefix = "val" if subcommand == "validate" else "test"
    got, expected = _logged(tmp_path / "sharded", prefix), _logged(tmp_path / "single", prefix)
    # Synthetic tasks: the task metric is token accuracy, logged under both names.
    metrics = ("loss", "accuracy", "token_accuracy")
    assert sorted(got) == sorted(f"{prefix}/{t}/{m}" for t in ("alpha", "beta", "gamma") for m in metrics)
    for k, v in expected.items():
        assert got[k] == pytest.approx(v, abs=1e-5), k


@pytest.mark.e2e
@pytest.mark.slow
def test_fsdp2_two_simulated_nodes_match_one_process(single, tmp_path):
    run = fit_nodes(tmp_path, 2, *FSDP2)
    assert_matches_single(run, single)
    assert_ranks_agree(run, world_size=2)
    assert_finished_loras_frozen(run, tmp_path, finished=["alpha", "beta"])
