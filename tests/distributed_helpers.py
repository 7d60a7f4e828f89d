"""Helpers for the multi-process tests: free ports, several train.py processes at once (each in its
own process group, all killed on timeout), run directories, and the invariants every distributed
run must keep (same matrices and adapters as one process, finished LoRAs frozen, ranks agreeing).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from subproc import REPO, run_dir_of, run_train

from crma_lightning.runs.record import read_record
from crma_lightning.runs.rundir import read_matrix_csv

#: Small runs: 64 training examples (4 global batches of 16 per epoch, 8 steps per task, 24 in
#: all; ModelCheckpoint every 10 steps leaves last.ckpt at step 20, inside task 3).
# With the task id and without it: per-task layouts then route every row's examples with the routing
# statistics (a sharded model runs the whole forward pass on every rank, in lockstep).
SMALL = [
    "--data.train_size",
    "64",
    "--data.holdout_size",
    "32",
    "--model.lr.lora",
    "0.02",
    "--evaluation.task_id",
    "both",
]

#: The single-process reference of a 2-rank run at 8 examples per rank: the same two micro-batches
#: of 8, summed by gradient accumulation (see test_distributed.single_run for why not batch 16).
MICRO_8X2 = ["--data.batch_size", "8", "--trainer.accumulate_grad_batches", "2"]
#: For a one-process reference of an FSDP2 run: the paths FSDP2 takes (the loss from the logits,
#: Adam's per-tensor loop). FSDP2's DTensors take neither the fused loss nor the fused Adam, whose
#: float order, compounded over a run, moved single adapter weights by up to 5e-4.
UNFUSED = [
    "--model.fused_loss",
    "false",
    "--model.optimizer",
    json.dumps({"class_path": "torch.optim.AdamW", "init_args": {"fused": False}}),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fit(save_dir: Path, *args: str, timeout: int = 420) -> Path:
    return run_dir_of(
        run_train("fit", *args, "--trainer.logger.init_args.save_dir", str(save_dir), timeout=timeout)
    )


_FITS: dict[tuple[str, ...], Path] = {}


def fit_once(tmp_path_factory: pytest.TempPathFactory, *args: str) -> Path:
    """``fit`` with these arguments once per test session (the single-process references are
    shared by the DDP and FSDP tests)."""
    if args not in _FITS:
        _FITS[args] = fit(tmp_path_factory.mktemp("ref"), *args)
    return _FITS[args]


def fit_nodes(save_dir: Path, num_nodes: int, *args: str, timeout: int = 420) -> Path:
    """One train.py per simulated node (NODE_RANK 0..num_nodes-1) on localhost, run concurrently.

    Output goes to files (no pipe can fill up); if one node fails, the others are killed at once
    instead of waiting for a rendezvous that never comes.
    """
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    cmd = [
        sys.executable,
        "train.py",
        "fit",
        *args,
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        "--trainer.num_nodes",
        str(num_nodes),
        "--trainer.devices",
        "1",
        "--record",
        str(save_dir / "record.json"),  # written by global rank 0, on node 0
    ]
    logs = save_dir / "node_logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs, files = [], []
    try:
        for r in range(num_nodes):
            out, err = open(logs / f"{r}.out", "w"), open(logs / f"{r}.err", "w")  # noqa: SIM115
            files += [out, err]
            procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=REPO,
                    env={**env, "NODE_RANK": str(r)},
                    stdout=out,
                    stderr=err,
                    text=True,
                    start_new_session=True,
                )
            )
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break  # a node failed: stop the rest
            if time.monotonic() > deadline:
                pytest.fail(f"the {num_nodes} node processes did not finish within {timeout} s (killed)")
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for f in files:
            f.close()
    results = [
        subprocess.CompletedProcess(
            cmd, p.returncode, (logs / f"{r}.out").read_text(), (logs / f"{r}.err").read_text()
        )
        for r, p in enumerate(procs)
    ]
    for r, res in enumerate(results):
        assert res.returncode == 0, f"node {r} (exit {res.returncode}): {res.stderr[-4000:]}"
    results[0].record = read_record(save_dir / "record.json")
    return run_dir_of(results[0])


def read_checkpoint_state(path: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The model state of a checkpoint: a file, or a sharded DCP folder (converted offline)."""
    if path.is_dir():
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        out = tmp / f"{path.parent.parent.name}_{path.name}.pt"
        dcp_to_torch_save(path, out)
        return torch.load(out, weights_only=True)["state_dict"]
    return torch.load(path, weights_only=True)["state_dict"]


def lora_from_checkpoint(state: dict[str, torch.Tensor], adapter: str) -> dict[str, torch.Tensor]:
    """The named LoRA's tensors from a ContinualLM state dict, keyed as in its PEFT file."""
    out = {}
    for k, v in state.items():
        parts = k.split(".")
        if len(parts) > 2 and parts[-2] == adapter and parts[-3].startswith("lora_"):
            # model.<hf path>.lora_A.<adapter>.weight -> base_model.model.<hf path>.lora_A.weight
            out["base_model.model." + ".".join(parts[1:-2] + parts[-1:])] = v
    return out


def assert_matches_single(dist_run: Path, single_run: Path, adapter_atol: float = 0.0) -> None:
    """Same matrices with and without the task id (loss 5e-6; accuracy, an argmax, one token of 992;
    routing accuracy one example of 32), adapters (bit-identical: the mean of two ranks' gradients is
    exactly the sum of two micro-batches' halves) and routing statistics as one process. Measured under
    DDP (3 strategies, 2 nodes, a combined method) and FSDP2: loss 5e-7 (a float32 ulp), the rest 0."""
    names = [("loss_matrix.csv", 5e-6), ("accuracy_matrix.csv", 1 / 992 + 1e-6)]
    names += [(n.replace(".csv", "_no_task_id.csv"), atol) for n, atol in names]
    if (single_run / "continual" / "routing_accuracy_matrix_no_task_id.csv").is_file():
        names.append(("routing_accuracy_matrix_no_task_id.csv", 1 / 32 + 1e-6))
    for name, atol in names:
        one, dist = (
            read_matrix_csv(single_run / "continual" / name),
            read_matrix_csv(dist_run / "continual" / name),
        )
        assert (one.rows, one.tasks) == (dist.rows, dist.tasks)
        np.testing.assert_allclose(dist.values, one.values, atol=atol, rtol=0, err_msg=name)
    tasks = json.loads((single_run / "continual" / "summary.json").read_text())["tasks"]
    files = [f"{t}/adapter_model.safetensors" for t in tasks]
    if (single_run / "adapters" / "crma").is_dir():
        files.append("crma/crma.safetensors")
    for f in files:
        a, b = load_file(single_run / "adapters" / f), load_file(dist_run / "adapters" / f)
        assert a.keys() == b.keys(), f
        for k in a:
            np.testing.assert_allclose(
                b[k].numpy(), a[k].numpy(), atol=adapter_atol, rtol=0, err_msg=f"{f}: {k}"
            )
    for task in tasks:
        # Every rank's float64 sums all-reduced: the single process's, up to the float32 rounding of
        # examples batched differently (each rank holds half of them).
        a, b = (load_file(run / "routing" / f"{task}.safetensors") for run in (single_run, dist_run))
        assert a.keys() == b.keys() == {"count", "total", "outer"}, task
        assert torch.equal(a["count"], b["count"]), task
        for k in ("total", "outer"):
            torch.testing.assert_close(
                b[k], a[k], rtol=1e-5, atol=1e-6 * float(a[k].abs().max()), msg=f"{task}: {k}"
            )


def assert_same_routing(dist_run: Path, single_run: Path) -> None:
    """The statistics router of both runs sends every task's holdout prompts (8 tokens) to the same
    task, with the same confidence (1e-5)."""
    from crma_lightning.serve import load_run

    runs = [load_run(d) for d in (single_run, dist_run)]
    dm = runs[0].info.datamodule()
    prompts = [
        ids[:8].tolist()
        for t in runs[0].tasks
        for ids in dm.holdout_batches(t, batch_size=1024)[0]["input_ids"]
    ]
    posteriors = [torch.softmax(run.stats_router().scores(run, prompts, 64), dim=1) for run in runs]
    assert torch.equal(posteriors[0].argmax(1), posteriors[1].argmax(1))
    torch.testing.assert_close(posteriors[1], posteriors[0], rtol=0, atol=1e-5)


def assert_ranks_agree(run: Path, world_size: int) -> None:
    """``adapters/ranks.json`` has one SHA-256 per rank for every task, all equal. (A run whose
    ranks differ stops before writing it: ``test_ranks_that_diverge_stop_the_run_at_the_next_task_end``
    proves that guard; this checks every rank took part in the exchange.)"""
    hashes = json.loads((run / "adapters" / "ranks.json").read_text())
    tasks = json.loads((run / "continual" / "summary.json").read_text())["tasks"]
    assert list(hashes) == tasks
    for task, per_rank in hashes.items():
        assert len(per_rank) == world_size and len(set(per_rank)) == 1, (task, per_rank)


def assert_finished_loras_frozen(run: Path, tmp: Path, finished: list[str]) -> None:
    """The LoRAs of tasks finished before the last checkpoint are bit-identical in it to what was
    saved at their task's end: nothing (no reducer, weight decay or momentum) moved them."""
    state = read_checkpoint_state(run / "checkpoints" / "last.ckpt", tmp)
    for task in finished:
        saved = load_file(run / "adapters" / task / "adapter_model.safetensors")
        now = lora_from_checkpoint(state, task)
        assert now.keys() == saved.keys() and saved, task
        for k in saved:
            assert torch.equal(now[k], saved[k]), f"LoRA {task} moved after its task ended: {k}"


def children(pid: int) -> list[int]:
    """Child process ids of ``pid`` (Lightning's launcher starts local ranks 1.. as children of rank 0)."""
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def kill_rank_mid_run(
    save_dir: Path, *args: str, sig: int = signal.SIGKILL, timeout: int = 300
) -> tuple[subprocess.CompletedProcess, float]:
    """Start a 2-rank ``train.py fit``, wait for its first complete checkpoint, send ``sig`` to rank 1
    and return rank 0's result and the seconds it lived after the signal. Everything left of the
    run is killed at the end."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    cmd = [sys.executable, "train.py", "fit", *args, "--trainer.logger.init_args.save_dir", str(save_dir)]
    save_dir.mkdir(parents=True, exist_ok=True)
    with open(save_dir / "rank0.out", "w") as out, open(save_dir / "rank0.err", "w") as err:
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=err, text=True, start_new_session=True
        )
        try:
            deadline = time.monotonic() + timeout
            ckpt = None
            while ckpt is None:
                found = [p for p in save_dir.glob("*/version_*/checkpoints/last.ckpt")]
                if found and (found[0].is_file() or (found[0] / "meta.pt").is_file()):
                    ckpt = found[0]
                elif proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(
                        "no checkpoint before the run ended or timed out: "
                        f"{(save_dir / 'rank0.err').read_text()[-3000:]}"
                    )
                time.sleep(0.2)
            victims = children(proc.pid)
            assert victims, "rank 1 was not found among rank 0's children"
            os.kill(victims[0], sig)
            start = time.monotonic()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pytest.fail(f"rank 0 did not exit within {timeout} s of losing rank 1")
            lived = time.monotonic() - start
        finally:
            with contextlib.suppress(ProcessLookupError):  # rank 1 too: it is in rank 0's process group
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result = subprocess.CompletedProcess(
        cmd, proc.returncode, (save_dir / "rank0.out").read_text(), (save_dir / "rank0.err").read_text()
    )
    return result, lived
