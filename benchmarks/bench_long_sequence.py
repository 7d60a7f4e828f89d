"""Benchmark: a long task sequence (30 tasks of configs/tiny.yaml) and what grows with it.

The question: does a run keep anything per finished task beyond that task's LoRA weights (optimizer
state, graphs, evaluation buffers)? One ``train.py fit`` over ``--tasks`` synthetic tasks records,
per task (``crma_lightning.callbacks.resources.ResourceMonitor``): the median training-step time, resident memory
(now and peak), optimizer-state bytes and trainable parameters; a ModelCheckpoint after every task
gives the checkpoint size. Each series is fitted by least squares against the number of finished
tasks k, linearly (slope) and quadratically (the k^2 coefficient, which would show growth faster
than linear), and the report says how far each is from flat or linear. Per-task LoRAs are all
created when the run starts, so the checkpoint holds every task's LoRA from step 0; what may grow
per task is the evaluation callback's matrices (one row per task) and small per-task records.

Run:  .venv/bin/python benchmarks/bench_long_sequence.py [--tasks 30] [--out benchmarks/results/long_sequence]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
from harness import REPO, machine_line, run_info, train_fit, write_report

from crma_lightning.evaluation.report import pyplot, save_figure
from crma_lightning.runs.rundir import RunDir

SERIES = {
    "step_s_median": "median step time, s",
    "step_cpu_s_median": "median step CPU time, s",
    "rss_mb": "resident memory at task end, MiB",
    "held_anon_mb": "held anonymous memory (after malloc_trim), MiB",
    "peak_rss_mb": "peak resident memory, MiB",
    "optimizer_state_mb": "optimizer state, MiB",
    "checkpoint_mb": "checkpoint after the task, MiB",
}


def fit_args(tasks: int, save_dir: Path) -> list[str]:
    names = [{"name": f"t{i:02d}"} for i in range(tasks)]
    callbacks = [
        {"class_path": "crma_lightning.callbacks.resources.ResourceMonitor"},
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"every_n_epochs": 1, "save_top_k": -1, "filename": "after-{epoch:02d}"},
        },
    ]
    return [
        "--config",
        "configs/tiny.yaml",
        "--data.tasks",
        json.dumps(names),
        "--data.epochs_per_task",
        "1",
        "--data.train_size",
        "96",
        "--data.holdout_size",
        "16",
        "--evaluation.print_table",
        "false",
        # What grows with the task count is measured on the validation matrices alone: test
        # matrices would double the evaluation (30 x 31 task scorings) and add nothing here.
        "--evaluation.test_matrices",
        "false",
        "--trainer.callbacks",
        json.dumps(callbacks),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
    ]


def growth(y: list[float]) -> dict[str, float]:
    """Least-squares fits of ``y`` against k = 1..n: slope, the quadratic coefficient, and the
    largest residual of the linear fit relative to the mean."""
    k = np.arange(1, len(y) + 1, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    slope, intercept = np.polyfit(k, y, 1)
    quad = np.polyfit(k, y, 2)[0]
    resid = np.abs(y - (slope * k + intercept)).max()
    return {
        "first": float(y[0]),
        "last": float(y[-1]),
        "slope_per_task": float(slope),
        "quadratic_coef": float(quad),
        "max_linear_residual_rel": float(resid / max(abs(y.mean()), 1e-12)),
    }


def collect(run: RunDir, tasks: int) -> dict:
    per_task = json.loads(run.resources_file.read_text())
    names = [f"t{i:02d}" for i in range(tasks)]
    ckpts = sorted(run.checkpoints.glob("after-epoch=*.ckpt"))
    series: dict[str, list[float]] = {
        k: [per_task[t][k] for t in names] for k in SERIES if k != "checkpoint_mb"
    }
    series["checkpoint_mb"] = [p.stat().st_size / 2**20 for p in ckpts]
    return {
        "tasks": names,
        "series": series,
        "growth": {k: growth(v) for k, v in series.items()},
        "trainable_params": [per_task[t]["trainable_params"] for t in names],
    }


def figure(res: dict, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(SERIES), figsize=(4 * len(SERIES), 3.2))
    for ax, (key, label) in zip(axes, SERIES.items(), strict=True):
        y = res["series"][key]
        k = np.arange(1, len(y) + 1)
        g = res["growth"][key]
        ax.plot(k, y, "o-", ms=3)
        ax.plot(
            k,
            g["slope_per_task"] * k + (np.mean(y) - g["slope_per_task"] * k.mean()),
            "--",
            lw=1,
            label="linear fit",
        )
        ax.set_xlabel("finished tasks")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"{len(res['tasks'])} tasks of configs/tiny.yaml, one run")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def markdown(res: dict, info: dict, wall: float) -> str:
    g = res["growth"]
    rows = [
        f"| {SERIES[k]} | {g['first']:.4g} | {g['last']:.4g} | {g['slope_per_task']:+.3g} | {g['quadratic_coef']:+.2g} "
        f"| {100 * g['max_linear_residual_rel']:.2f} % |"
        for k, g in res["growth"].items()
    ]
    return "\n".join(
        [
            "# A long task sequence: what grows with the number of finished tasks",
            "",
            f"`{info['command']}` ({info['date']}; {machine_line(info['machine'])}; one run, {wall:.0f} s wall).",
            "",
            f"{len(res['tasks'])} synthetic tasks of configs/tiny.yaml (96 training examples, 6 steps and 16 holdout "
            "examples each; every task evaluated after every task). Per finished task k, fitted against k:",
            "",
            "| series | after task 1 | after the last | slope per task | k² coefficient | largest residual of the linear fit |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            f"Trainable parameters during every task: {sorted(set(res['trainable_params']))} (the current LoRA and CRMA).",
            "",
            "Reading it: the optimizer state is the same every task (only the current task's LoRA and CRMA have "
            "moments; finished tasks' are cleared at the boundary). The checkpoint grows by "
            f"{1024 * g['checkpoint_mb']['slope_per_task']:.2f} KiB per task, linearly: every task's LoRA exists from "
            "step 0, and what is added per task is the evaluation matrices' row and small per-task records. The "
            f"memory the process holds grows by {g['held_anon_mb']['slope_per_task']:.2f} MiB per task (k² coefficient "
            f"{g['held_anon_mb']['quadratic_coef']:+.1g}: linear); resident and peak memory grow faster "
            f"({g['rss_mb']['slope_per_task']:.1f} and {g['peak_rss_mb']['slope_per_task']:.1f} MiB per task) because the "
            "allocator keeps freed pages and each task end renders two heatmaps with one more row (a (k+1) x N "
            "picture, twice: PNG and TensorBoard). The step's CPU time has no trend; its wall time also measures "
            "what other processes took.",
            "",
            "![per-task step time, memory, optimizer state and checkpoint size](long_sequence.png)",
        ]
    )


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", type=int, default=30)
    ap.add_argument(
        "--out",
        default=str(REPO / "benchmarks" / "results" / "long_sequence"),
        help="report path without suffix",
    )
    ap.add_argument("--timeout", type=int, default=1200)
    args = ap.parse_args(argv)
    info = run_info("benchmarks/bench_long_sequence.py", sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        fit = train_fit(
            fit_args(args.tasks, Path(tmp)), threads=1, env={"HF_HUB_OFFLINE": "1"}, timeout=args.timeout
        )
        if fit.rc != 0 or fit.run_dir is None:
            raise SystemExit(f"train.py fit failed (exit {fit.rc}):\n{fit.tail}")
        res = collect(RunDir(fit.run_dir), args.tasks)
    res |= {"info": info, "wall_s": fit.wall_s}
    out = Path(args.out)
    write_report(out, markdown(res, info, fit.wall_s), res)
    figure(res, out.with_suffix(".png"))
    print(markdown(res, info, fit.wall_s))
    return res


if __name__ == "__main__":
    main()
