"""Benchmark: DDP with 2 CPU processes (gloo) against 1 process, on configs/tiny.yaml.

The issue's question: what does data parallelism buy on this machine? Every variant is the real
entry point (``train.py fit``, a subprocess in its own process group, killed with it on timeout),
run in interleaved rounds (harness.py: a different variant first each round):

1. ``1proc_1thread``  one process, batch 16, OMP/torch threads 1 (one core);
2. ``1proc_2threads`` one process, batch 16, threads 2 (both cores, intra-op parallel);
3. ``ddp2_same``      DDP, 2 processes x 1 thread, batch 8 each: the same global batch of 16
                      (strong scaling; the same optimisation trajectory as 1 and 2);
4. ``ddp2_double``    DDP, 2 processes x 1 thread, batch 16 each: global batch 32 (weak scaling,
                      half the steps per epoch).

Per run: wall time of the whole command (start-up, evaluations, checkpoints included) and the
median interval between consecutive ``train/loss`` events in the TensorBoard file (one optimizer
step, evaluation at task boundaries excluded by the median), hence training examples/s. The
machine is shared: each run records the CPU that other processes used meanwhile (harness
``NeighbourMeter``: /proc/stat minus our process group's CPU), and the table shows it.

Run:  .venv/bin/python benchmarks/bench_ddp.py [--rounds 2] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from harness import REPO, interleave, run_info, train_fit, write_report

from crma_lightning.runs.rundir import RunDir

DDP = ["--trainer.devices", "2", "--trainer.strategy", "ddp_find_unused_parameters_true"]
VARIANTS = {
    "1proc_1thread": dict(threads=1, args=["--data.batch_size", "16"], global_batch=16),
    "1proc_2threads": dict(threads=2, args=["--data.batch_size", "16"], global_batch=16),
    "ddp2_same": dict(threads=1, args=["--data.batch_size", "8", *DDP], global_batch=16),
    "ddp2_double": dict(threads=1, args=["--data.batch_size", "16", *DDP], global_batch=32),
}


def step_seconds(run_dir: Path) -> list[float]:
    """Intervals between consecutive ``train/loss`` events of the run's TensorBoard file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    times = [e.wall_time for e in acc.Scalars("train/loss")]
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def run_variant(name: str, tmp: Path, timeout: int) -> dict:
    spec = VARIANTS[name]
    fit = train_fit(
        [
            "--config",
            "configs/tiny.yaml",
            "--trainer.logger.init_args.save_dir",
            str(tmp / name),
            "--trainer.enable_checkpointing",
            "true",
            *spec["args"],
        ],
        threads=spec["threads"],
        env={"HF_HUB_OFFLINE": "1"},
        timeout=timeout,
        meter=True,
    )
    if fit.rc is None:
        raise SystemExit(f"{name}: timed out after {timeout} s")
    if fit.rc != 0 or fit.run_dir is None:
        raise SystemExit(f"{name} failed (exit {fit.rc}):\n{fit.tail}")
    steps = step_seconds(fit.run_dir)
    step = statistics.median(steps)
    return {
        "variant": name,
        "wall_s": fit.wall_s,
        "step_s": step,
        "steps": len(steps) + 1,
        "examples_per_s": spec["global_batch"] / step,
        "our_cpu_s": fit.cpu_s,  # sampled every 0.2 s: misses at most the last 0.2 s of each process
        "others_cpu_s": fit.load.others_cpu_s,
        "final_avg_loss": RunDir(fit.run_dir).read_summary()["final_avg_loss"],
    }


def summarise(rows: list[dict], names: list[str]) -> dict:
    """Medians over rounds per variant."""
    table = {}
    for name in names:
        mine = [x for x in rows if x["variant"] == name]
        table[name] = {
            "wall_s": statistics.median(x["wall_s"] for x in mine),
            "step_s": statistics.median(x["step_s"] for x in mine),
            "examples_per_s": statistics.median(x["examples_per_s"] for x in mine),
            "steps": mine[0]["steps"],
            "others_cpu_s": statistics.median(x["others_cpu_s"] or 0.0 for x in mine),
            "cores_used": statistics.median(x["our_cpu_s"] / x["wall_s"] for x in mine),
            "cpu_ms_per_example": statistics.median(
                1e3 * x["our_cpu_s"] / (x["steps"] * VARIANTS[name]["global_batch"]) for x in mine
            ),
            "final_avg_loss": mine[0]["final_avg_loss"],
        }
    return table


def markdown(meta: dict, table: dict, rounds: int) -> str:
    base = table.get("1proc_1thread")
    lines = [
        "# DDP on CPU: 2 gloo processes vs 1 process (configs/tiny.yaml)",
        "",
        f"{meta['date']}, {meta['cpus']} CPU cores, Python {meta['python']}; medians of {rounds} interleaved rounds.",
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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument(
        "--out", type=Path, default=REPO / "benchmarks" / "results", help="folder for ddp.{md,json}"
    )
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown --variants {unknown}; choose from {list(VARIANTS)}")
    info = run_info(__file__, argv)
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_ddp_") as tmp:

        def variant(name: str):
            def run() -> dict:
                row = run_variant(name, Path(tmp), args.timeout) | {"round": len(rows) // len(names)}
                print(json.dumps(row), flush=True)
                rows.append(row)
                return row

            return run

        interleave({name: variant(name) for name in names}, args.rounds)
    table = summarise(rows, names)
    meta = {
        "date": info["date"],
        "cpus": info["machine"]["cores"],
        "python": info["machine"]["python"],
        "loadavg_at_end": os.getloadavg(),
        "command": info["command"],
        "machine": info["machine"],
    }
    md, js = write_report(
        args.out / "ddp", markdown(meta, table, args.rounds), {"meta": meta, "summary": table, "runs": rows}
    )
    print(md.read_text())


if __name__ == "__main__":
    main()
