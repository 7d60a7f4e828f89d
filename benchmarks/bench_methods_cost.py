"""Benchmark: what each method costs per step and in memory, against FROZEN at the same batch.

The question (baselines issue): the methods of ``configs/methods/`` add work to a step (LwF: a
teacher forward; EWC, O-LoRA: a penalty; replay: fetching kept examples) or to a task end (EWC's
Fisher pass). Every variant is one ``train.py fit`` of the same base config at the same batch size
(``configs/methods/frozen.yaml`` is the reference), run in interleaved rounds (harness.py). Per
run, ``crma_lightning.callbacks.resources.ResourceMonitor`` gives the median step time of the tasks after the first
(where replay and the regularisers act) and the peak resident memory; the task-end passes of the
regularisers are timed by ``crma_lightning.callbacks.regularization.RegularizerHooks`` (TensorBoard
``regularization/task_end_s``). Per round, each method's step time is divided by FROZEN's
(harness.paired_ratio); the LwF teacher's share is LwF's step over SeqLoRA's, the Fisher pass's
the task-end seconds over the fit's wall time. Target: replay and EWC add at most 10 % to a step.

Run:  .venv/bin/python benchmarks/bench_methods_cost.py [--config configs/tiny.yaml] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import REPO, interleave, machine_line, paired_ratio, run_info, train_fit, verdict, write_report

from crma_lightning.runs.rundir import RunDir

METHODS = [
    "frozen",
    "naive",
    "inc_lora",
    "olora",
    "replay",
    "ewc",
    "lwf",
    "multitask",
    "modular",
    "modular_replay",
    "modular_ewc",
]


def config_of(method: str) -> str:
    return "configs/methods/frozen.yaml" if method == "frozen" else f"configs/methods/{method}.yaml"


def run(args: argparse.Namespace, method: str, tmp: Path) -> dict:
    callbacks = json.dumps([{"class_path": "crma_lightning.callbacks.resources.ResourceMonitor"}])
    fit = train_fit(
        [
            "--config",
            args.config,
            "--config",
            config_of(method),
            "--trainer.callbacks",
            callbacks,
            "--evaluation.print_table",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.logger.init_args.save_dir",
            str(tmp / method),
            *args.extra,
        ],
        threads=args.threads,
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        timeout=args.timeout,
        meter=True,
    )
    if fit.rc != 0 or fit.run_dir is None:
        raise SystemExit(f"{method}: train.py fit failed (exit {fit.rc}):\n{fit.tail}")
    rundir = RunDir(fit.run_dir)
    rows = list(json.loads(rundir.resources_file.read_text()).values())
    later = rows[1:] or rows
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(rundir.path))
    acc.Reload()
    task_end = "regularization/task_end_s" in acc.Tags()["scalars"]
    return {
        "step_s": statistics.median(r["step_s_median"] for r in later),
        "step_cpu_s": statistics.median(r["step_cpu_s_median"] for r in later),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
        "task_end_s": sum(e.value for e in acc.Scalars("regularization/task_end_s")) if task_end else 0.0,
        "wall_s": fit.wall_s,
        # Other processes' CPU during this fit (the fit's own process group excluded).
        "others_pct": fit.load.others_pct if fit.load else None,
    }


def markdown(res: dict, info: dict, args: argparse.Namespace) -> str:
    lines = [
        "# What each method costs, against FROZEN at the same batch",
        "",
        f"`{info['command']}` ({info['date']}; {machine_line(info['machine'])}; {args.threads} thread(s); "
        f"{args.rounds} interleaved rounds of one `train.py fit` per method on `{args.config}`; neighbours took "
        f"{res['others_pct_median']:.0f} % of the CPU (median over fits); {res['wall_s']:.0f} s in all).",
        "",
        "Step: median over the tasks after the first (where replay and the regularisers act). Ratios are per round "
        "against FROZEN's run of the same round, median and bootstrap 95 % CI. Task-end s: the regularisers' passes "
        "(EWC's Fisher), summed over the run.",
        "",
        "| method | step s | step / FROZEN (95 % CI) | step CPU / FROZEN | peak RSS MiB | peak / FROZEN | task-end s (share of fit) |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, s in res["summary"].items():
        ratio, cpu, mem = s["step_ratio"], s["cpu_ratio"], s["peak_ratio"]
        lines.append(
            f"| {m} | {s['step_s']:.4f} | {ratio['median']:.3f} [{ratio['ci95'][0]:.3f}, {ratio['ci95'][1]:.3f}] | "
            f"{cpu['median']:.3f} | {s['peak_rss_mb']:.0f} | {mem['median']:.3f} | {s['task_end_s']:.2f} "
            f"({100 * s['task_end_share']:.1f} %) |"
        )
    lwf = res["summary"].get("lwf", {}).get("lwf_vs_naive")
    lines += [
        "",
        "Targets: replay and EWC add at most 10 % to a step (the 95 % interval of step / FROZEN, and of the "
        "method against its own layout without it):",
        "",
    ]
    for m, base in (
        ("replay", "naive"),
        ("ewc", "naive"),
        ("modular_replay", "modular"),
        ("modular_ewc", "modular"),
    ):
        if m in res["summary"]:
            r = res["summary"][m][f"vs_{base}"]
            lines.append(
                f"- {m} / {base}: {r['median']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]: "
                f"{verdict(r['ci95'], 1.10)}"
            )
    if lwf:
        lines.append(
            f"- LwF's teacher forward: the LwF step is {lwf['median']:.3f}x SeqLoRA's "
            f"[{lwf['ci95'][0]:.3f}, {lwf['ci95'][1]:.3f}] (the extra is the teacher's forward)."
        )
    return "\n".join(lines)


def summarise(values: dict[str, list[dict]]) -> dict:
    def col(m: str, k: str) -> list[float]:
        return [r[k] for r in values[m]]

    out = {}
    for m in values:
        s = {k: statistics.median(col(m, k)) for k in values[m][0]}
        s["step_ratio"] = vars(paired_ratio(col(m, "step_s"), col("frozen", "step_s")))
        s["cpu_ratio"] = vars(paired_ratio(col(m, "step_cpu_s"), col("frozen", "step_cpu_s")))
        s["peak_ratio"] = vars(paired_ratio(col(m, "peak_rss_mb"), col("frozen", "peak_rss_mb")))
        s["task_end_share"] = s["task_end_s"] / s["wall_s"]
        for base in ("naive", "modular"):
            if base in values:
                s[f"vs_{base}"] = vars(paired_ratio(col(m, "step_s"), col(base, "step_s")))
        if m == "lwf" and "naive" in values:
            s["lwf_vs_naive"] = s["vs_naive"]
        out[m] = s
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "methods_cost"))
    ap.add_argument("extra", nargs="*", help="after --: more train.py fit arguments for every run")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    if "frozen" not in methods:
        raise SystemExit("--methods must include frozen (the reference)")
    if args.rounds < 2:
        raise SystemExit("--rounds must be >= 2 (ratios are paired by round)")
    info = run_info("benchmarks/bench_methods_cost.py", sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        rounds = interleave({m: (lambda m=m: run(args, m, Path(tmp))) for m in methods}, args.rounds)
    # Per fit, not per round: a round's meter would count the fits' own subprocesses as neighbours.
    others = [
        r["others_pct"] for per in rounds.values.values() for r in per if r.get("others_pct") is not None
    ]
    res = {
        "rounds": rounds.values,
        "info": info,
        "wall_s": time.perf_counter() - start,
        "others_pct_median": statistics.median(others or [0.0]),
    }
    res["summary"] = summarise(rounds.values)
    text = markdown(res, info, args)
    write_report(args.out, text, res)
    print(text)
    return res


if __name__ == "__main__":
    main()
