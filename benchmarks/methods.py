"""Every continual-learning method beside CRMA on the five-domain sequence, by one command.

The methods of ``harness.METHODS`` (sequential LoRA, per-task LoRA, IncLoRA, replay, EWC, LwF,
O-LoRA, MODULAR, MODULAR + replay, MODULAR + EWC, multi-task) over configs/smollm2.yaml's five
domains, one ``train.py fit --evaluation.task_id both`` per (method, setting, seed), run and resumed
by the reproduction's machinery (``harness.resumable_fit``; reused on a rerun).

Settings are chosen on **validation**, never on the reported split: each method with a knob (replay
ratio, EWC λ, LwF weight, O-LoRA λ1; ``GRID``) runs every value of its grid at the first seed, the
value with the lowest final average *validation* loss (with the task id) is kept, and the other
seeds run only that value. The report reads the **test** matrices:

- final average loss, loss-relative drift, BWT and forgetting on the loss (``crma_lightning.evaluation.metrics``),
  with the task id given and without it (per-task layouts routed by the routing statistics, summed
  LoRAs all active, a shared LoRA as it is), and the routing accuracy where examples are routed;
- the grid: every value's validation and test numbers at the selection seed (so a reader sees how
  much the choice mattered, and that it was not made on test);
- each run's wall time and evaluation share.

``--reuse DIR`` takes finished runs of ``benchmarks/reproduce.py`` (the same config and seeds) for
the methods it has: sequential LoRA = NAIVE, per-task LoRA = FROZEN, MODULAR (a run there fitted with
another ``--config`` or other arguments after ``--``, by its ``fit_args.json``, stops the script). Those
ran with the task id only, so their test matrices without it are rebuilt from their adapters
(``train.py test --run RUN --task-id both``; what a fit writes, to 2e-5: tests/test_evaluation_tasks.py).

    python benchmarks/methods.py --seeds 0,42 --jobs 2 --threads 1 --reuse runs/reproduction   # the committed report
    python benchmarks/methods.py --config configs/tiny.yaml --seeds 0 --out /tmp/methods.md       # a quick look

Arguments after ``--`` go to every ``train.py fit``. Writes ``<out>.md``, ``<out>.json``, ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from harness import (
    METHODS,
    REPO,
    checked_record,
    finished_run,
    machine_line,
    resumable_fit,
    run_all,
    run_commits,
    run_info,
    script_argv,
    train_fit,
    write_report,
)
from reproduce import fit_args as reproduction_args

from crma_lightning.evaluation import metrics as clm
from crma_lightning.runs.rundir import LOSS_MATRIX, RunDir, init_args, matrix_name

#: method -> (setting, its grid). The first value is the preset's default.
GRID: dict[str, tuple[str, list[float]]] = {
    "replay": ("ratio", [0.25, 0.5]),
    "modular_replay": ("ratio", [0.25, 0.5]),
    "ewc": ("weight", [1000.0, 10000.0]),
    "modular_ewc": ("weight", [1000.0, 10000.0]),
    "lwf": ("weight", [1.0, 4.0]),
    "olora": ("l1", [0.5, 5.0]),
}
#: Methods a reproduction has, under its condition names.
REPRODUCTION = {"naive": "naive", "per_task_lora": "frozen", "modular": "modular"}


def setting_args(method: str, value: float | None) -> list[str]:
    """``train.py`` arguments that set ``method``'s knob to ``value`` on top of its preset."""
    if value is None:
        return []
    key, _ = GRID[method]
    if key == "ratio":
        return ["--data.replay.ratio", str(value)]
    # The preset's one regulariser, with the knob changed.
    (reg,) = yaml.safe_load((REPO / METHODS[method][1][-1]).read_text())["model"]["regularizers"]
    reg = {**reg, "init_args": {**reg.get("init_args", {}), key: value}}
    return ["--model.regularizers", json.dumps([reg])]


def run_name(method: str, value: float | None, seed: int) -> str:
    return f"{method}_s{seed}" if value is None else f"{method}_{GRID[method][0]}={value:g}_s{seed}"


def loss_numbers(run: RunDir, split: str, no_task_id: bool = False) -> dict[str, float | None] | None:
    f = run.matrix_file(matrix_name("loss", no_task_id), split)
    if not f.is_file():
        return None
    L = run.read_matrix(matrix_name("loss", no_task_id), split).values
    # On the loss, BWT and forgetting with the accuracy's sign: negative BWT / positive forgetting =
    # earlier tasks' losses went up (in nats).
    return {"final_avg_loss": clm.final_avg_loss(L), "drift_pct": clm.drift_pct(L), "bwt": clm.bwt(-L),
            "forgetting": clm.forgetting(-L), "final_row": L[-1].tolist()}  # fmt: skip


def scores(run: RunDir, wall_s: float) -> dict:
    routing = run.matrix_file(matrix_name("routing_accuracy", no_task_id=True), "test")
    test_summary = run.read_summary("test")
    return {
        "test": loss_numbers(run, "test"),
        "test_no_task_id": loss_numbers(run, "test", no_task_id=True),
        "validation": loss_numbers(run, "validation"),
        "no_task_id": test_summary.get("no_task_id", {}).get("routing"),
        "routing_acc": float(np.nanmean(run.read_matrix(routing.stem, "test").values[-1]))
        if routing.is_file()
        else None,  # fmt: skip
        "rebuilt": bool(test_summary.get("rebuilt_from_adapters")),
        "wall_s": wall_s,
        "evaluation_s": run.read_summary()["evaluation_s"],
        "run": "/".join(run.path.parts[-3:]),  # <runs dir>/<name>/version_N: no machine path in the report
    }


class Bench:
    def __init__(self, args: argparse.Namespace, extra: list[str]) -> None:
        self.args, self.extra = args, extra
        self.runs_dir = Path(args.runs_dir).resolve()
        self.reuse = Path(args.reuse).resolve() if args.reuse else None

    def fit(self, key: tuple[str, float | None, int]) -> tuple[RunDir, float]:
        method, value, seed = key
        if self.reuse and method in REPRODUCTION and value is None:
            name = f"{REPRODUCTION[method]}_s{seed}"
            src = self.reuse / name
            # Only a run reproduce.py fitted with this --config and these arguments after -- is taken.
            expected = reproduction_args(self.args.config, REPRODUCTION[method], seed, self.extra)
            checked_record(name, src, expected, self.args.adopt_legacy_runs,
                           fix="point --reuse at a reproduction of this --config and these arguments, leave --reuse out")  # fmt: skip
            if (run := finished_run(src)) is not None:
                return self.with_blind_test(run), json.loads((src / "wall.json").read_text())["wall_s"]
        args = [c for path in (self.args.config, *METHODS[method][1]) for c in ("--config", path)]
        args += [
            "--data.seed",
            str(seed),
            "--evaluation.task_id",
            "both",
            *setting_args(method, value),
            *self.extra,
        ]
        return resumable_fit(
            run_name(method, value, seed), args, self.runs_dir, self.args.threads, self.args.adopt_legacy_runs
        )

    def with_blind_test(self, run: RunDir) -> RunDir:
        """A reused run, with its test matrices without the task id rebuilt from its adapters once."""
        if not run.matrix_file(matrix_name("loss", no_task_id=True), "test").is_file():
            print(f"[reuse] train.py test --run {run.path} --task-id both", flush=True)
            done = train_fit(["--run", str(run.path), "--split", "test", "--task-id", "both"], command="test",
                             threads=self.args.threads, log=run.path.parent / "test.log")  # fmt: skip
            if done.rc != 0:
                raise SystemExit(f"train.py test --run {run.path} failed (exit {done.rc}):\n{done.tail}")
        return run


def select(runs: dict, method: str, seed: int) -> float | None:
    """The grid value of ``method`` with the lowest final average validation loss at ``seed``."""
    if method not in GRID:
        return None
    values = GRID[method][1]
    val = [loss_numbers(runs[(method, v, seed)][0], "validation")["final_avg_loss"] for v in values]
    return values[int(np.argmin(val))]


def stat(per_seed: dict, split: str, key: str) -> tuple[float | None, float | None, list]:
    vals = [None if p[split] is None else p[split][key] for p in per_seed.values()]
    given = [v for v in vals if v is not None]
    return (*clm.mean_sd(given), vals) if given else (None, None, vals)


def cell(per_seed: dict, split: str, key: str, fmt: str = "{:.4f}") -> str:
    mean, sd, vals = stat(per_seed, split, key)
    if mean is None:
        return "n/a"
    spread = "" if sd is None else " ± " + fmt.format(sd)
    return (
        fmt.format(mean)
        + spread
        + (" (" + " / ".join(fmt.format(v) for v in vals) + ")" if len(vals) > 1 else "")
    )


NO_TASK_ID = {"route": "routed", "sum": "all LoRAs summed", "shared": "the shared LoRA"}


def markdown(res: dict, protocol: dict) -> str:
    seeds = ", ".join(map(str, res["seeds"]))
    lines = [
        f"# Continual-learning methods on {len(res['tasks'])} tasks in sequence, {protocol['settings']['model']}",
        "",
        f"Produced by `{protocol['command']}` on {protocol['date']} ({protocol['machine']}): "
        f"{len(protocol['wall_s'])} runs, {sum(protocol['wall_s'].values()) / 60:.0f} min of run wall time in all "
        "(finished runs are reused, so a report may gather runs of several invocations).",
        "",
        f"Tasks {' → '.join(res['tasks'])}, seeds {seeds}. Loss is the mean next-token loss on the **test** "
        "split, which no setting was chosen on; every number is mean ± sample SD over seeds (per seed in brackets). "
        "Drift: % change of each earlier task's loss from just after it was trained to the end (positive = "
        "forgetting). BWT and forgetting on the loss, with the accuracy's sign: negative BWT and positive "
        "forgetting = earlier tasks' losses went up (nats). Lower final loss is better.",
        "",
        "## Protocol",
        "",
        *[f"- {k}: {v}" for k, v in protocol["settings"].items()],
        f"- selection: for each method with a knob, every value of its grid at seed {res['select_seed']}; kept: the "
        "lowest final average **validation** loss with the task id; the other seeds ran only that value",
        "",
        "## Results (test split)",
        "",
        "| method | setting | final avg loss (task id) | drift % (task id) | BWT | forgetting | "
        "final avg loss (no task id) | drift % (no task id) | without the id | routing acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in res["methods"].items():
        ps = r["per_seed"]
        first = next(iter(ps.values()))
        routing = "n/a" if first["routing_acc"] is None else cell(
            {s: {"x": {"r": 100 * p["routing_acc"]}} for s, p in ps.items()}, "x", "r", "{:.1f}") + " %"  # fmt: skip
        setting = "preset" if r["value"] is None else f"{GRID[m][0]} = {r['value']:g}"
        lines.append(
            f"| {r['label']} | {setting} | {cell(ps, 'test', 'final_avg_loss')} | {cell(ps, 'test', 'drift_pct', '{:+.2f}')} | "
            f"{cell(ps, 'test', 'bwt', '{:+.4f}')} | {cell(ps, 'test', 'forgetting')} | "
            f"{cell(ps, 'test_no_task_id', 'final_avg_loss')} | {cell(ps, 'test_no_task_id', 'drift_pct', '{:+.2f}')} | "
            f"{NO_TASK_ID.get(first['no_task_id'], first['no_task_id'] or 'n/a')} | {routing} |"
        )
    if "multitask" in res["methods"]:
        lines += ["", "Multi-task trains one LoRA on every task's data at once: its rows are evaluation points of one "
                  "run over the pooled data, so its drift is the change between those points, not forgetting; its "
                  "final loss is the reference the sequential methods are measured against."]  # fmt: skip
    lines += ["", "## Final test loss per task (mean over seeds, with the task id)", "",
              "| method | " + " | ".join(res["tasks"]) + " |", "|---|" + "---|" * len(res["tasks"])]  # fmt: skip
    for r in res["methods"].values():
        row = np.mean([p["test"]["final_row"] for p in r["per_seed"].values()], 0)
        lines.append(f"| {r['label']} | " + " | ".join(f"{v:.4f}" for v in row) + " |")
    lines += ["", f"## The selection (seed {res['select_seed']})", "",
              "Every grid value's final average loss and drift on validation (where the choice was made) and on "
              "test (reported only).", "",
              "| method | setting | validation loss | validation drift % | test loss | test drift % | kept |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for m, grid in res["grid"].items():
        for v, p in grid.items():
            lines.append(
                f"| {METHODS[m][0]} | {GRID[m][0]} = {float(v):g} | {p['validation']['final_avg_loss']:.4f} | "
                f"{p['validation']['drift_pct']:+.2f} | {p['test']['final_avg_loss']:.4f} | {p['test']['drift_pct']:+.2f} | "
                f"{'yes' if float(v) == res['methods'][m]['value'] else ''} |"
            )
    rebuilt = [
        p["run"].split("/")[1]
        for r in res["methods"].values()
        for p in r["per_seed"].values()
        if p["rebuilt"]
    ]
    if rebuilt:
        lines += ["", "Runs reused from the reproduction (`--reuse`), their test matrices rebuilt from their adapters by "
                  f"`train.py test --run <run> --task-id both`: {', '.join(rebuilt)}."]  # fmt: skip
    lines += [
        "",
        "Wall time per run (s): " + ", ".join(f"{k} {v:.0f}" for k, v in protocol["wall_s"].items()),
        "",
    ]
    return "\n".join(lines)


def figure(res: dict, path: Path, model: str) -> None:
    from crma_lightning.evaluation.report import pyplot, save_figure

    plt = pyplot()
    methods = list(res["methods"])
    x = np.arange(len(methods))
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.8))
    for ax, (key, title) in zip(axes, [("final_avg_loss", "final average test loss (lower is better)"),
                                        ("drift_pct", "drift of earlier tasks, % (lower is better)")], strict=True):  # fmt: skip
        for off, split, name in [(-0.2, "test", "task id given"), (0.2, "test_no_task_id", "no task id")]:
            st = [stat(res["methods"][m]["per_seed"], split, key) for m in methods]
            ax.bar(x + off, [np.nan if s[0] is None else s[0] for s in st], 0.4,
                   yerr=[s[1] or 0.0 for s in st], label=name, capsize=3)  # fmt: skip
        if key == "final_avg_loss":
            lo = min(
                s
                for m in methods
                for s in stat(res["methods"][m]["per_seed"], "test", key)[2]
                if s is not None
            )
            ax.set_ylim(0.97 * lo, None)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, [res["methods"][m]["label"] for m in methods], rotation=30, ha="right")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.suptitle(
        f"{model}, {' → '.join(res['tasks'])}, test split, seeds {', '.join(map(str, res['seeds']))}"
    )
    fig.tight_layout()
    save_figure(fig, path)


def protocol_settings(run: RunDir, extra: list[str]) -> dict:
    cfg = run.read_config()
    d, m = init_args(cfg["data"]), init_args(cfg["model"])
    test = d["holdout_size"] if d.get("test_size") is None else d["test_size"]
    return {
        "model": run.read_summary()["base_model"],
        "examples per task": f"{d['train_size']} train / {d['holdout_size']} validation / {test} test blocks of "
        f"{d['max_length']} tokens",
        "training": f"batch {d['batch_size']}, {d['epochs_per_task']} epoch(s) per task, learning rates "
        + ", ".join(f"{k} {v}" for k, v in m["lr"].items()),
        "presets": "configs/methods/*.yaml (per-task LoRA: configs/methods/frozen.yaml); grids: "
        + "; ".join(f"{k} {n} {v}" for k, (n, v) in GRID.items()),
        "extra train.py arguments": " ".join(extra) or "none",
    }


def main(argv: list[str] | None = None) -> None:
    argv, ours, extra, p = script_argv(__doc__, argv)
    p.add_argument("--config", default="configs/smollm2.yaml")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default="0,42,1234", help="the first one also selects the settings")
    p.add_argument("--runs-dir", default="runs/methods", help="where the runs go (reused on a rerun)")
    p.add_argument("--reuse", help="a reproduce.py runs dir whose NAIVE/FROZEN/MODULAR runs to take")
    p.add_argument("--out", default="benchmarks/results/methods.md", help="report; .json and .png beside it")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="OMP threads per run")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs at a time (e.g. --jobs 2 --threads 1 on 2 cores)"
    )
    args = p.parse_args(ours)
    methods = [m.strip() for m in args.methods.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if unknown := sorted(set(methods) - set(METHODS)):
        p.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    info, bench, start = run_info(__file__, argv), Bench(args, extra), time.perf_counter()
    # The selection seed first (every grid value), then the other seeds at the kept values.
    first = [(m, v, seeds[0]) for m in methods for v in GRID.get(m, (None, [None]))[1]]
    runs = dict(zip(first, run_all(bench.fit, first, args.jobs), strict=True))
    kept = {m: select(runs, m, seeds[0]) for m in methods}
    rest = [(m, kept[m], s) for s in seeds[1:] for m in methods]
    runs |= dict(zip(rest, run_all(bench.fit, rest, args.jobs), strict=True))

    res: dict = {"seeds": seeds, "select_seed": seeds[0], "methods": {}, "grid": {}}
    for m in methods:
        per_seed = {s: scores(*runs[(m, kept[m], s)]) for s in seeds}
        res["methods"][m] = {"label": METHODS[m][0], "value": kept[m], "per_seed": per_seed}
        if m in GRID:
            res["grid"][m] = {str(v): scores(*runs[(m, v, seeds[0])]) for v in GRID[m][1]}
    any_run = runs[first[0]][0]
    res["tasks"] = any_run.read_matrix(LOSS_MATRIX, "test").tasks
    out = Path(args.out)
    protocol = {
        "command": info["command"],
        "date": info["date"],
        "machine": f"{machine_line(info['machine'])}; {args.threads} thread(s) per run, {args.jobs} at a time",
        "settings": protocol_settings(any_run, extra),
        "wall_s": {run_name(*k): w for k, (_, w) in runs.items()},
        "invocation_wall_s": time.perf_counter() - start,  # this invocation's (reused runs count 0)
    }
    figure(res, out.with_suffix(".png"), protocol["settings"]["model"])
    md, js = write_report(out, markdown(res, protocol), {"protocol": protocol, "results": res},
                          run_commits(run for run, _ in runs.values()))  # fmt: skip
    print(f"wrote {md}, {js}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
