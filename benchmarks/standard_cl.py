"""The standard continual-learning benchmark with SmolLM2: every method, with and without the task id, on test.

The O-LoRA text-classification tasks agnews -> amazon -> dbpedia (configs/cl_benchmark.yaml over
configs/smollm2.yaml, the offline copy in ../shared/cl_benchmark), one ``train.py fit`` per
(method, seed), each method a preset of configs/methods/ (or configs/methods/frozen.yaml for
per-task LoRAs). Every run evaluates with ``evaluation.task_id: both`` and writes test matrices; the
table reads ``continual/test/`` of each run:

- average accuracy after the last task (exact match of the greedy answer) and BWT, with the task
  id given and without it (per-task layouts routed by the run's routing statistics, summed LoRAs
  all active, a shared LoRA as it is), and the routing accuracy where examples are routed;
- the zero-shot base model (every run's ``base`` row; the same for every method of a seed);
- the evaluation share of each run (``evaluation_s`` over the run's wall time);
- the published T5-large numbers (O-LoRA's paper, another model and a four-task sequence) beside
  ours, labelled as such.

Writes ``<out>.md``, ``<out>.json`` and ``<out>.png``. The settings are the presets' defaults, the
same for every method; nothing here was tuned on the test split (validation matrices are written
beside the test ones for selection).

    python benchmarks/standard_cl.py --jobs 2 --threads 1                      # the committed table
    python benchmarks/standard_cl.py --methods naive,modular --seeds 0 -- --data.train_size 32

Arguments after ``--`` go to every ``train.py fit``. Finished runs under ``--runs-dir`` are reused
and an interrupted one resumes from its last checkpoint, if it was fitted with the same arguments and
config files; otherwise the script stops with one line (harness.resumable_fit).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from harness import (
    METHODS,
    machine_line,
    resumable_fit,
    run_all,
    run_commits,
    run_info,
    script_argv,
    write_report,
)

from crma_lightning.evaluation import metrics as clm
from crma_lightning.runs.rundir import ACCURACY_MATRIX, RunDir, init_args, matrix_name

BENCHMARK = "../shared/cl_benchmark"
#: The methods of this table, in its order (presets: harness.METHODS).
TABLE_METHODS = (
    "naive",
    "per_task_lora",
    "inc_lora",
    "replay",
    "olora",
    "modular",
    "modular_replay",
    "multitask",
)
#: Average accuracy after the last task, T5-large, dbpedia/amazon/yahoo/agnews in three orders
#: (O-LoRA, Wang et al. 2023, Table 1; ../shared/cl_benchmark/README.md).
PUBLISHED_T5_LARGE = {"naive": 43.7, "inc_lora": 66.4, "replay": 57.8, "olora": 75.8, "multitask": 80.0}
CONFIGS = ["configs/smollm2.yaml", "configs/cl_benchmark.yaml"]


def fit(
    method: str, seed: int, runs_dir: Path, extra: list[str], threads: int, adopt_legacy: bool = False
) -> tuple[RunDir, float]:
    args = [c for path in (*CONFIGS, *METHODS[method][1]) for c in ("--config", path)]
    args += ["--data.seed", str(seed), "--evaluation.task_id", "both", *extra]
    return resumable_fit(f"{method}_s{seed}", args, runs_dir, threads, adopt_legacy)


def scores(run: RunDir) -> dict:
    """What the table reads from one finished run (test split)."""
    summary = run.read_summary("test")
    acc = run.read_matrix(ACCURACY_MATRIX, "test")
    blind = summary.get("no_task_id", {})
    routing_file = run.matrix_file(matrix_name("routing_accuracy", no_task_id=True), "test")
    routing = None
    if routing_file.is_file():
        r = run.read_matrix(matrix_name("routing_accuracy", no_task_id=True), "test").values[-1]
        routing = float(np.nanmean(r))
    return {
        "avg_acc": summary["final_avg_accuracy"],
        "bwt": summary["bwt"],
        "avg_acc_no_task_id": blind.get("final_avg_accuracy"),
        "bwt_no_task_id": blind.get("bwt"),
        "no_task_id": blind.get("routing"),
        "routing_acc": routing,
        "base_acc": float(np.mean(acc.values[0])),
        "base_row": acc.values[0].tolist(),
        "final_row": acc.values[-1].tolist(),
        # The fit's own summary: test matrices rebuilt by `train.py test --run` do not time the fit.
        "evaluation_s": run.read_summary()["evaluation_s"],
        "router": blind.get("router"),
        "rebuilt": bool(summary.get("rebuilt_from_adapters")),
        # Validation: where a user of this table would choose settings.
        "val_avg_acc": run.read_summary()["final_avg_accuracy"],
    }


def collect(runs: dict[tuple[str, int], tuple[RunDir, float]], methods: list[str], seeds: list[int]) -> dict:
    res: dict = {"methods": {}, "seeds": seeds}
    for m in methods:
        per_seed = {s: scores(runs[(m, s)][0]) | {"wall_s": runs[(m, s)][1]} for s in seeds}
        res["methods"][m] = {"label": METHODS[m][0], "per_seed": per_seed}
    first = runs[(methods[0], seeds[0])][0]
    res["tasks"] = first.read_matrix(ACCURACY_MATRIX, "test").tasks
    res["base"] = {s: res["methods"][methods[0]]["per_seed"][s]["base_acc"] for s in seeds}
    return res


def stat(res: dict, method: str, key: str, scale: float = 100.0) -> tuple[float | None, float | None, list]:
    vals = [res["methods"][method]["per_seed"][s][key] for s in res["seeds"]]
    vals = [None if v is None else scale * v for v in vals]
    given = [v for v in vals if v is not None]
    if not given:
        return None, None, vals
    mean, sd = clm.mean_sd(given)
    return mean, sd, vals


def cell(res: dict, method: str, key: str, sign: bool = False) -> str:
    mean, sd, vals = stat(res, method, key)
    if mean is None:
        return "n/a"
    f = "{:+.1f}" if sign else "{:.1f}"
    per = " / ".join("–" if v is None else f.format(v) for v in vals)
    return (
        f.format(mean) + (f" ± {sd:.1f}" if sd is not None else "") + (f" ({per})" if len(vals) > 1 else "")
    )


def share(res: dict, method: str) -> str:
    ps = res["methods"][method]["per_seed"].values()
    return f"{np.mean([p['evaluation_s'] / p['wall_s'] for p in ps]) * 100:.0f} % of {np.mean([p['wall_s'] for p in ps]) / 60:.1f} min"


NO_TASK_ID = {"route": "routed", "sum": "all LoRAs summed", "shared": "the shared LoRA"}


def markdown(res: dict, protocol: dict) -> str:
    seeds = ", ".join(map(str, res["seeds"]))
    base_mean, base_sd = clm.mean_sd([100 * res["base"][s] for s in res["seeds"]])
    lines = [
        "# The standard CL benchmark (O-LoRA's text classification) with SmolLM2-135M",
        "",
        f"Produced by `{protocol['command']}` on {protocol['date']} ({protocol['machine']}): "
        f"{len(protocol['wall_s'])} runs, {sum(protocol['wall_s'].values()) / 60:.0f} min of run wall time in all "
        "(each run's own wall time below; finished runs are reused, so a report may gather runs of several invocations).",
        "",
        f"Tasks {' → '.join(res['tasks'])} (../shared/cl_benchmark: the O-LoRA repository's processed files, "
        f"subsampled), O-LoRA's prompt format, seeds {seeds}. Accuracy is exact match of the greedy-generated "
        "answer (trimmed, case-folded) on the **test** split, in %; average after the last task and BWT on it "
        "(mean ± sample SD over seeds, per seed in brackets). Every method runs the same protocol and the presets' "
        "default settings; none was tuned (the runs also wrote validation matrices, for selection).",
        "",
        "## Protocol",
        "",
        *[f"- {k}: {v}" for k, v in protocol["settings"].items()],
        "",
        "## Results",
        "",
        f"Zero-shot base model (row `base`): average accuracy {base_mean:.1f}"
        + (f" ± {base_sd:.1f}" if base_sd is not None else "")
        + "; it is the first row of every run's matrix.",
        "",
        f"With {protocol['test_size']} test examples per task, one example is {100 / protocol['test_size']:.1f} points "
        f"of a task's accuracy and {100 / protocol['test_size'] / len(res['tasks']):.1f} of the average: differences "
        "of a few points between methods are within one seed's noise.",
        "",
        "| method | avg acc (task id) | BWT (task id) | avg acc (no task id) | BWT (no task id) | without the id | routing acc | T5-large, published | eval share of the run |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in res["methods"].items():
        first = r["per_seed"][res["seeds"][0]]
        how = first["no_task_id"]
        how = NO_TASK_ID.get(how, how or "n/a") + (
            f" ({first['router']} router)" if how == "route" and first.get("router") else ""
        )
        pub = PUBLISHED_T5_LARGE.get(m)
        lines.append(
            f"| {r['label']} | {cell(res, m, 'avg_acc')} | {cell(res, m, 'bwt', True)} | "
            f"{cell(res, m, 'avg_acc_no_task_id')} | {cell(res, m, 'bwt_no_task_id', True)} | "
            f"{how} | {cell(res, m, 'routing_acc')} | "
            f"{'n/a' if pub is None else f'{pub:.1f}'} | {share(res, m)} |"
        )
    lines += [
        "",
        "The published column is **another model on another sequence**: T5-large (770M, encoder-decoder), "
        "dbpedia/amazon/yahoo/agnews averaged over three orders, full training sets (O-LoRA, Wang et al. 2023). "
        "It shows the ordering of methods in that paper, not a number ours should match.",
        "",
        "## Final test accuracy per task (mean over seeds, with the task id)",
        "",
        "| method | " + " | ".join(res["tasks"]) + " |",
        "|---|" + "---|" * len(res["tasks"]),
    ]
    for r in res["methods"].values():
        row = np.mean([r["per_seed"][s]["final_row"] for s in res["seeds"]], 0)
        lines.append(f"| {r['label']} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |")
    base_row = np.mean(
        [res["methods"][next(iter(res["methods"]))]["per_seed"][s]["base_row"] for s in res["seeds"]], 0
    )
    lines.append("| zero-shot base | " + " | ".join(f"{100 * v:.1f}" for v in base_row) + " |")
    rebuilt = [
        f"{m}_s{s}" for m, r in res["methods"].items() for s, p in r["per_seed"].items() if p.get("rebuilt")
    ]
    if rebuilt:
        lines += ["", f"Test matrices rebuilt from the runs' adapters by `train.py test --run <run> --task-id both` "
                  f"(what a fit writes, to 2e-5: tests/test_evaluation_tasks.py), after the fit: {', '.join(rebuilt)}. "
                  "Their evaluation share is the fit's own."]  # fmt: skip
    lines += ["", "## Validation split (where settings would be chosen)", "",
              f"Average accuracy after the last task with the task id, on {protocol['validation_size']} validation "
              "examples per task (the matrices of `fit`).", "", "| method | validation | test |", "|---|---|---|"]  # fmt: skip
    for m, r in res["methods"].items():
        lines.append(f"| {r['label']} | {cell(res, m, 'val_avg_acc')} | {cell(res, m, 'avg_acc')} |")
    lines += [
        "",
        "Wall time per run (s): " + ", ".join(f"{k} {v:.0f}" for k, v in protocol["wall_s"].items()),
        "",
    ]
    return "\n".join(lines)


def figure(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    methods = list(res["methods"])
    x = np.arange(len(methods))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, (key, title) in zip(
        axes, [("avg_acc", "average accuracy after the last task (%)"), ("bwt", "BWT (pp)")], strict=True
    ):
        for off, suffix, name in [(-0.2, "", "task id given"), (0.2, "_no_task_id", "no task id")]:
            means = [stat(res, m, key + suffix)[0] for m in methods]
            sds = [stat(res, m, key + suffix)[1] or 0.0 for m in methods]
            ax.bar(x + off, [np.nan if v is None else v for v in means], 0.4, yerr=sds, label=name, capsize=3)
        if key == "avg_acc":
            ax.axhline(
                100 * np.mean(list(res["base"].values())), color="k", ls="--", lw=1, label="zero-shot base"
            )
        ax.set_xticks(x, [res["methods"][m]["label"] for m in methods], rotation=30, ha="right")
        ax.set_title(title)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(
        f"SmolLM2-135M, {' → '.join(res['tasks'])}, test split, seeds {', '.join(map(str, res['seeds']))}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def protocol_settings(run: RunDir, extra: list[str]) -> dict:
    cfg = run.read_config()
    d, m = init_args(cfg["data"]), init_args(cfg["model"])
    lora = m["lora"]
    return {
        "model": run.read_summary()["base_model"],
        "examples per task": f"{d['train_size']} train / {d['holdout_size']} validation / {d['test_size']} test, "
        f"at most {d['max_length']} tokens (the sentence is cut, the instruction and options kept)",
        "training": f"batch {d['batch_size']}, {d['epochs_per_task']} epoch(s) per task, learning rates "
        + ", ".join(f"{k} {v}" for k, v in m["lr"].items()),
        "LoRA": f"r={lora['r']}, alpha={lora['alpha']}, targets {lora['target_modules']}",
        "replay (replay presets)": "25 % of each batch from a buffer of 32 examples per finished task",
        "O-LoRA": "λ1 = 0.5, λ2 = 0 (configs/methods/olora.yaml)",
        "extra train.py arguments": " ".join(extra) or "none",
    }


def main(argv: list[str] | None = None) -> None:
    argv, ours, extra, p = script_argv(__doc__, argv)
    p.add_argument("--methods", default=",".join(TABLE_METHODS))
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--runs-dir", default="runs/standard_cl", help="where the runs go (reused on a rerun)")
    p.add_argument(
        "--out", default="benchmarks/results/standard_cl.md", help="report; .json and .png beside it"
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="OMP threads per run")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs at a time (e.g. --jobs 2 --threads 1 on 2 cores)"
    )
    args = p.parse_args(ours)
    methods = [m.strip() for m in args.methods.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if unknown := sorted(set(methods) - set(METHODS)):
        p.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if not Path(BENCHMARK).is_dir():
        p.error(f"{BENCHMARK} is missing: this benchmark reads the offline copy of the CL benchmark")
    info = run_info(__file__, argv)
    runs_dir = Path(args.runs_dir).resolve()
    keys = [(m, s) for s in seeds for m in methods]
    start = time.perf_counter()
    done = run_all(lambda k: fit(*k, runs_dir, extra, args.threads, args.adopt_legacy_runs), keys, args.jobs)
    runs = dict(zip(keys, done, strict=True))
    res = collect(runs, methods, seeds)
    out = Path(args.out)
    protocol = {
        "command": info["command"],
        "date": info["date"],
        "machine": f"{machine_line(info['machine'])}; {args.threads} thread(s) per run, {args.jobs} at a time",
        "settings": protocol_settings(runs[keys[0]][0], extra),
        "test_size": init_args(runs[keys[0]][0].read_config()["data"])["test_size"],
        "validation_size": init_args(runs[keys[0]][0].read_config()["data"])["holdout_size"],
        "wall_s": {f"{m}_s{s}": w for (m, s), (_, w) in runs.items()},
        "invocation_wall_s": time.perf_counter() - start,  # this invocation's (reused runs count 0)
    }
    figure(res, out.with_suffix(".png"))
    md, js = write_report(out, markdown(res, protocol), {"protocol": protocol, "results": res},
                          run_commits(run for run, _ in runs.values()))  # fmt: skip
    print(f"wrote {md}, {js}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
