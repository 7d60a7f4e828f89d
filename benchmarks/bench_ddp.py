"""Benchmark: DDP with 2 CPU processes (gloo) against 1 process, on configs/tiny.yaml.

The issue's question: what does data parallelism buy on this machine? Every variant is the real
entry point (``train.py fit``, a subprocess, killed with its process group on timeout), run in
interleaved rounds (a different variant first each round):

1. ``1proc_1thread``  one process, batch 16, OMP/torch threads 1 (one core);
2. ``1proc_2threads`` one process, batch 16, threads 2 (both cores, intra-op parallel);
3. ``ddp2_same``      DDP, 2 processes x 1 thread, batch 8 each: the same global batch of 16
                      (strong scaling; the same optimisation trajectory as 1 and 2);
4. ``ddp2_double``    DDP, 2 processes x 1 thread, batch 16 each: global batch 32 (weak scaling,
                      half the steps per epoch).

Per run: wall time of the whole command (start-up, evaluations, checkpoints included) and the
median interval between consecutive ``train/loss`` events in the TensorBoard file (one optimizer
step, evaluation at task boundaries excluded by the median), hence training examples/s. The
machine is shared: each run records the CPU that other processes used meanwhile (/proc/stat minus
our process tree's getrusage), and the table shows it.

Run:  .venv/bin/python benchmarks/bench_ddp.py [--rounds 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "1proc_1thread": dict(threads=1, args=["--data.batch_size", "16"], global_batch=16),
    "1proc_2threads": dict(threads=2, args=["--data.batch_size", "16"], global_batch=16),
    "ddp2_same": dict(
        threads=1,
        args=[
            "--data.batch_size",
            "8",
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp_find_unused_parameters_true",
        ],
        global_batch=16,
    ),  # fmt: skip
    "ddp2_double": dict(
        threads=1,
        args=[
            "--data.batch_size",
            "16",
            "--trainer.devices",
            "2",
            "--trainer.strategy",
            "ddp_find_unused_parameters_true",
        ],
        global_batch=32,
    ),  # fmt: skip
}


def cpu_busy_jiffies() -> int:
    """Non-idle jiffies of the whole machine since boot (/proc/stat, first line)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields[:8]) - idle


def group_cpu_seconds(pgid: int, seen: dict[int, float]) -> None:
    """Update ``seen`` (pid -> CPU seconds) with every live process of process group ``pgid``: the
    launcher's rank processes included, which getrusage(RUSAGE_CHILDREN) would miss."""
    hz = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields after the command: state ppid pgrp ...; utime/stime at 11/12
            seen[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / hz


def step_seconds(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    times = [e.wall_time for e in acc.Scalars("train/loss")]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def run_variant(name: str, spec: dict, tmp: Path, timeout: int) -> dict:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(spec["threads"]),
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    save = tmp / name
    cmd = [sys.executable, "train.py", "fit", "--config", "configs/tiny.yaml", "--trainer.logger.init_args.save_dir",
           str(save), "--trainer.enable_checkpointing", "true", *spec["args"]]  # fmt: skip
    hz = os.sysconf("SC_CLK_TCK")
    before_busy = cpu_busy_jiffies()
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out_f, tempfile.TemporaryFile("w+") as err_f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out_f, stderr=err_f, text=True,
                                start_new_session=True)  # fmt: skip
        seen: dict[int, float] = {}
        while proc.poll() is None:
            group_cpu_seconds(proc.pid, seen)  # the group's id is the leader's pid
            if time.perf_counter() - t0 > timeout:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise SystemExit(f"{name}: timed out after {timeout} s")
            time.sleep(0.2)
        out_f.seek(0), err_f.seek(0)
        out, err = out_f.read(), err_f.read()
    wall = time.perf_counter() - t0
    ours = sum(seen.values())  # sampled every 0.2 s: misses at most the last 0.2 s of each process
    others = max(0.0, (cpu_busy_jiffies() - before_busy) / hz - ours)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{err[-3000:]}")
    run_dir = Path(
        next(line for line in out.splitlines() if line.startswith("run dir: ")).removeprefix("run dir: ")
    )
    steps = step_seconds(run_dir)
    step = statistics.median(steps)
    summary = json.loads((run_dir / "continual" / "summary.json").read_text())
    return {
        "variant": name,
        "wall_s": wall,
        "step_s": step,
        "steps": len(steps) + 1,
        "examples_per_s": spec["global_batch"] / step,
        "our_cpu_s": ours,
        "others_cpu_s": others,
        "final_avg_loss": summary["final_avg_loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    names = args.variants.split(",")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                row = run_variant(name, VARIANTS[name], Path(tmp), args.timeout) | {"round": r}
                print(json.dumps(row), flush=True)
                rows.append(row)
    table = {}
    for name in names:
        mine = [x for x in rows if x["variant"] == name]
        table[name] = {
            "wall_s": statistics.median(x["wall_s"] for x in mine),
            "step_s": statistics.median(x["step_s"] for x in mine),
            "examples_per_s": statistics.median(x["examples_per_s"] for x in mine),
            "steps": mine[0]["steps"],
            "others_cpu_s": statistics.median(x["others_cpu_s"] for x in mine),
            "cores_used": statistics.median(x["our_cpu_s"] / x["wall_s"] for x in mine),
            "cpu_ms_per_example": statistics.median(
                1e3 * x["our_cpu_s"] / (x["steps"] * VARIANTS[name]["global_batch"]) for x in mine
            ),
            "final_avg_loss": mine[0]["final_avg_loss"],
        }
    meta = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "loadavg_at_end": os.getloadavg(),
        "command": "python benchmarks/bench_ddp.py " + " ".join(sys.argv[1:]),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ddp.json").write_text(
        json.dumps({"meta": meta, "summary": table, "runs": rows}, indent=2) + "\n"
    )
    base = table.get("1proc_1thread")
    lines = [
        "# DDP on CPU: 2 gloo processes vs 1 process (configs/tiny.yaml)",
        "",
        f"{meta['date']}, {meta['cpus']} CPU cores, Python {meta['python']}; medians of {args.rounds} interleaved rounds.",
        f"Command: `{meta['command']}`. The whole `train.py fit` (96 steps at global batch 16, 3 tasks x 2 epochs,",
        "4 evaluations of 3 holdout sets, adapter saves, checkpoints every 10 steps).",
        "",
        "| variant | processes x threads | global batch | wall s | step s (median) | examples/s | vs 1 proc x 1 thread "
        "| cores we got | CPU ms / example | others' CPU s | final avg loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, t in table.items():
        spec = VARIANTS[name]
        procs = 2 if "--trainer.devices" in spec["args"] else 1
        speed = f"{t['examples_per_s'] / base['examples_per_s']:.2f}x" if base else "n/a"
        lines.append(
            f"| {name} | {procs} x {spec['threads']} | {spec['global_batch']} | {t['wall_s']:.1f} | {t['step_s']:.4f} | "
            f"{t['examples_per_s']:.0f} | {speed} | {t['cores_used']:.2f} | {t['cpu_ms_per_example']:.1f} | "
            f"{t['others_cpu_s']:.0f} | {t['final_avg_loss']:.4f} |"
        )
    (args.out / "ddp.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
