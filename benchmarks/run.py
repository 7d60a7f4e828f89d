"""Run one experiment file: its fits (reused when finished, resumed when interrupted), its record and report.

    python benchmarks/run.py benchmarks/experiments/reproduction.yaml [--jobs 2 --threads 1]

An experiment file (benchmarks/experiments/*.yaml) is data: ``kind`` (reproduction, methods,
standard_cl, recipe), the base ``config`` file(s), the ``methods`` (presets configs/methods/<name>.yaml),
``seeds``, ``fit_args`` for every ``train.py fit`` (sizes, override files), ``task_id`` (``both``:
also evaluate without the task id), a knob ``grid`` (methods: every value at the first seed, the
lowest final average validation loss kept), ``reuse`` (methods: another experiment whose finished runs
of the same method and seed are taken), ``compare`` (reproduction: other records' MODULAR runs as a
variant), ``runs_dir`` and ``out`` (the record, ``.json``; benchmarks/report.py renders ``.md`` and
``.png`` beside it). A recipe experiment names other experiment files (``current``, ``settings``) and
runs each before setting them side by side.

Every fit is one ``train.py fit`` subprocess, run as ``<runs_dir>/<method>[_<knob>=<value>]_s<seed>``
by ``harness.resumable_fit``: a finished run is reused, an interrupted one resumes from its last
checkpoint, and a run fitted with other arguments or edited config files is refused with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from harness import (
    ADOPT_LEGACY,
    FIT_RECORD,
    REPO,
    checked_record,
    finished_run,
    machine_line,
    repo_relative,
    resumable_fit,
    run_all,
    run_commits,
    run_info,
    train_fit,
    write_record,
)
from report import KNOBS, METHODS, extra_of, render, summarise

from crma_lightning.evaluation import metrics as clm
from crma_lightning.runs.rundir import ACCURACY_MATRIX, LOSS_MATRIX, RunDir, init_args, matrix_name
from crma_lightning.serve import load_run

KINDS = ("reproduction", "methods", "standard_cl", "recipe")


def load_experiment(path: str | Path) -> dict:
    exp = yaml.safe_load(Path(path).read_text())
    if exp.get("kind") not in KINDS:
        raise SystemExit(f"{path}: kind must be one of {KINDS}, not {exp.get('kind')!r}")
    if exp["kind"] != "recipe":
        exp["config"] = [exp["config"]] if isinstance(exp["config"], str) else list(exp["config"])
        if unknown := sorted(set(exp["methods"]) - set(METHODS)):
            raise SystemExit(f"{path}: unknown methods {unknown}; the presets are {list(METHODS)}")
    return exp | {"path": repo_relative(path)}


# -- fits --------------------------------------------------------------------------------------
def setting_args(method: str, value: float | None) -> list[str]:
    """``train.py`` arguments that set ``method``'s knob to ``value`` on top of its preset."""
    if value is None:
        return []
    if KNOBS[method] == "ratio":
        return ["--data.replay.ratio", str(value)]
    (reg,) = yaml.safe_load((REPO / f"configs/methods/{method}.yaml").read_text())["model"]["regularizers"]
    reg = {**reg, "init_args": {**reg.get("init_args", {}), KNOBS[method]: value}}
    return ["--model.regularizers", json.dumps([reg])]


def fit_args(exp: dict, method: str, seed: int, value: float | None = None) -> list[str]:
    """The ``train.py fit`` arguments of one run (their digest decides whether a run is reused)."""
    args = [c for path in (*exp["config"], f"configs/methods/{method}.yaml") for c in ("--config", path)]
    args += ["--data.seed", str(seed)] + (
        ["--evaluation.task_id", exp["task_id"]] if exp.get("task_id") else []
    )
    return args + setting_args(method, value) + [str(a) for a in exp.get("fit_args", [])]


def run_name(method: str, value: float | None, seed: int) -> str:
    return f"{method}_s{seed}" if value is None else f"{method}_{KNOBS[method]}={value:g}_s{seed}"


class Runner:
    def __init__(self, exp: dict, args: argparse.Namespace) -> None:
        self.exp, self.args = exp, args
        self.runs_dir = (REPO / exp["runs_dir"]).resolve()
        self.reuse = load_experiment(REPO / exp["reuse"]) if exp.get("reuse") else None

    def fit(self, key: tuple[str, float | None, int]) -> tuple[RunDir, float]:
        method, value, seed = key
        if self.reuse and method in self.reuse["methods"] and value is None:
            src = (REPO / self.reuse["runs_dir"]).resolve() / f"{method}_s{seed}"
            # only a run fitted with this experiment's config files and fit_args is taken
            checked_record(
                f"{method}_s{seed}",
                src,
                fit_args({**self.exp, "task_id": None}, method, seed),
                self.args.adopt_legacy_runs,
                fix="point reuse at an experiment of these config files and fit_args, leave reuse out",
            )
            if (run := finished_run(src)) is not None:
                return self.with_blind_test(run), json.loads((src / "wall.json").read_text())["wall_s"]
        args = fit_args(self.exp, method, seed, value)
        return resumable_fit(
            run_name(*key), args, self.runs_dir, self.args.threads, self.args.adopt_legacy_runs
        )

    def with_blind_test(self, run: RunDir) -> RunDir:
        """A reused run, with its test matrices without the task id rebuilt from its adapters once."""
        if not run.matrix_file(matrix_name("loss", no_task_id=True), "test").is_file():
            print(f"[reuse] train.py test --run {run.path} --task-id both", flush=True)
            done = train_fit(
                ["--run", str(run.path), "--split", "test", "--task-id", "both"],
                command="test",
                threads=self.args.threads,
                log=run.path.parent / "test.log",
            )
            if done.rc != 0:
                raise SystemExit(f"train.py test --run {run.path} failed (exit {done.rc}):\n{done.tail}")
        return run

    def all(self, keys: list) -> dict:
        return dict(zip(keys, run_all(self.fit, keys, self.args.jobs), strict=True))


# -- the reproduction --------------------------------------------------------------------------
def collect(runs: dict[tuple[str, int], RunDir], conditions: list[str], seeds: list[int], split: str) -> dict:
    """The reproduction's numbers from the runs' loss matrices on ``split``."""
    loss = {key: run.read_matrix(split=split).values for key, run in runs.items()}
    first = runs[next(iter(runs))].read_matrix(split=split)
    res: dict = {
        "tasks": first.tasks,
        "seeds": seeds,
        "conditions": conditions,
        "split": split,
        "drift": {},
        "final_loss": {},
        "loss_matrix_mean": {},
        "grad_norm": {},
        "spectral": {},
    }
    for c in conditions:
        per_seed = [clm.drift_pct(loss[(c, s)]) for s in seeds]
        mean, sd = clm.mean_sd(per_seed)
        res["drift"][c] = {"mean": mean, "sd": sd, "per_seed": per_seed}
        mats = np.stack([loss[(c, s)] for s in seeds])
        res["loss_matrix_mean"][c] = {"rows": first.rows, "matrix": mats.mean(0).tolist()}
        res["final_loss"][c] = {"mean": mats[:, -1].mean(0).tolist(), "per_seed": mats[:, -1].tolist()}
        res["grad_norm"][c] = {s: runs[(c, s)].read_grad_norm() for s in seeds}
        if c == "modular":
            summaries = [runs[(c, s)].read_summary() for s in seeds]
            res["spectral"] = {
                "max_sigma": max(x["spectral_max_sigma"] for x in summaries),
                "max_row_col_err": max(x["spectral_max_row_col_err"] for x in summaries),
            }
    if {"frozen", "modular"} <= set(conditions):
        adv = [clm.modular_vs_frozen_pct(loss[("frozen", s)], loss[("modular", s)]) for s in seeds]
        mean, sd = clm.mean_sd(adv)
        f, m = (np.stack([loss[(c, s)][-1, :-1] for s in seeds]) for c in ("frozen", "modular"))
        res["modular_vs_frozen"] = {
            "mean": mean,
            "sd": sd,
            "per_seed": adv,
            "per_task_mean": (100 * (f - m) / f).mean(0).tolist(),
        }
    return res


def ablation(runs: dict[tuple[str, int], RunDir], seeds: list[int], split: str) -> dict:
    """Each MODULAR run as served (``serve.load_run``), every task's loss with CRMA on and off."""
    abl = {}
    for s in seeds:
        served = load_run(runs[("modular", s)].path)
        dm = served.info.datamodule()
        abl[s] = {
            mode: [served.holdout_loss(t, crma=mode == "on", dm=dm, split=split) for t in served.tasks]
            for mode in ("on", "off")
        }
    last = {s: runs[("modular", s)].read_matrix(split=split).values[-1] for s in seeds}
    return {
        "per_seed": abl,
        "on_mean": np.mean([abl[s]["on"] for s in seeds], 0).tolist(),
        "off_mean": np.mean([abl[s]["off"] for s in seeds], 0).tolist(),
        "max_diff_vs_run": float(max(np.max(np.abs(np.asarray(abl[s]["on"]) - last[s])) for s in seeds)),
    }


def compare_variant(label: str, path: str, res: dict) -> dict:
    """The MODULAR runs of another reproduction record, against this one's FROZEN, on common seeds."""
    other = json.loads((REPO / path).read_text())
    theirs = other["results"]
    res = res if theirs.get("split", "validation") == res["split"] else res["validation"]
    seeds = [s for s in res["seeds"] if s in theirs["seeds"]]
    if not seeds or "modular" not in theirs["conditions"] or "frozen" not in res["conditions"]:
        raise SystemExit(f"compare {label}: needs MODULAR runs there and FROZEN runs here for common seeds")

    def final(r: dict, c: str, s: int) -> np.ndarray:
        return np.asarray(r["final_loss"][c]["per_seed"][r["seeds"].index(s)])

    def adv(r: dict, s: int) -> float:
        f, m = final(res, "frozen", s)[:-1], final(r, "modular", s)[:-1]  # prior tasks only
        return float(100 * np.mean((f - m) / f))

    def drift(r: dict, s: int) -> float:
        return r["drift"]["modular"]["per_seed"][r["seeds"].index(s)]

    return {
        "source": Path(path).name,
        "extra": extra_of(other["protocol"]),
        "seeds": seeds,
        "split": res["split"],
        "drift": [drift(theirs, s) for s in seeds],
        "adv": [adv(theirs, s) for s in seeds],
        "base_drift": [drift(res, s) for s in seeds],
        "base_adv": [adv(res, s) for s in seeds],
    }


def settings(run: RunDir, exp: dict) -> dict:
    """The protocol as the record states it, read from a run's own config."""
    cfg = run.read_config()
    d, m, t = init_args(cfg["data"]), init_args(cfg["model"]), cfg["trainer"]
    extra = " ".join(map(str, exp.get("fit_args", []))) or "none"
    test = d["holdout_size"] if d.get("test_size") is None else d["test_size"]
    lrs = ", ".join(f"{k} {v}" for k, v in m["lr"].items())
    lora = m["lora"]
    if exp["kind"] == "methods":
        return {
            "model": run.read_summary()["base_model"],
            "examples per task": f"{d['train_size']} train / {d['holdout_size']} validation / {test} test "
            f"blocks of {d['max_length']} tokens",
            "training": f"batch {d['batch_size']}, {d['epochs_per_task']} epoch(s) per task, "
            f"learning rates {lrs}",
            "presets": "configs/methods/*.yaml (per-task LoRA: configs/methods/frozen.yaml); grids: "
            + "; ".join(f"{k} {KNOBS[k]} {v}" for k, v in exp.get("grid", {}).items()),
            "extra train.py arguments": extra,
        }
    if exp["kind"] == "standard_cl":
        return {
            "model": run.read_summary()["base_model"],
            "examples per task": f"{d['train_size']} train / {d['holdout_size']} validation / "
            f"{d['test_size']} test, "
            f"at most {d['max_length']} tokens (the sentence is cut, the instruction and options kept)",
            "training": f"batch {d['batch_size']}, {d['epochs_per_task']} epoch(s) per task, "
            f"learning rates {lrs}",
            "LoRA": f"r={lora['r']}, alpha={lora['alpha']}, targets {lora['target_modules']}",
            "replay (replay presets)": "25 % of each batch from a buffer of 32 examples per finished task",
            "O-LoRA": "λ1 = 0.5, λ2 = 0 (configs/methods/olora.yaml)",
            "extra train.py arguments": extra,
        }
    crma, sched = m["crma"], m["lr_schedule"]
    zclip = cfg.get("zclip") or {}
    return {
        "tasks": ", ".join(
            f"{x['name']} ({x.get('source', 'synthetic')})" for x in map(init_args, d["tasks"])
        ),
        "examples per task": f"{d['train_size']} train / {d['holdout_size']} validation / "
        f"{test} test blocks of {d['max_length']} tokens",
        "batch": f"{d['batch_size']} x {t.get('accumulate_grad_batches', 1)} accumulation, "
        f"{d['epochs_per_task']} epoch(s) per task",
        "LoRA": f"r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, "
        f"targets {lora['target_modules']}",
        "CRMA (MODULAR)": f"n={crma['streams']}, form {crma['form']}, {crma['projection']} "
        f"({crma['sinkhorn_iters']} iterations)",
        "learning rates": lrs,
        "schedule": f"{sched['class_path'].split('.')[-1]} {sched.get('init_args', {})}, restarted per task",
        "optimizer": str(
            m["optimizer"]["class_path"] if isinstance(m["optimizer"], dict) else m["optimizer"]
        ),
        "precision / clipping": f"{t['precision']}, gradient_clip_val {t.get('gradient_clip_val')}"
        + (f", ZClip {zclip}" if zclip.get("enabled") else ""),
        "base model": f"{m['backbone'].get('dtype', 'float32')}"
        + (f", linear layers {q}" if (q := m["backbone"].get("quantize", "none")) != "none" else ""),
        "CRMA init": crma.get("init", "orthogonal"),
        "extra train.py arguments": extra,
    }


def reproduction(exp: dict, runner: Runner, info: dict) -> tuple[dict, list[RunDir]]:
    conditions, seeds = list(exp["methods"]), list(exp["seeds"])
    keys = [(c, s) for s in seeds for c in conditions]  # seed-major: the first seed's runs finish first
    done = runner.all([(c, None, s) for c, s in keys])
    runs = {(c, s): run for (c, _, s), (run, _) in done.items()}
    res = collect(runs, conditions, seeds, "test")
    # where the settings (the CRMA learning rates: compare) were chosen; test is reported
    val = collect(runs, conditions, seeds, "validation")
    res["validation"] = {k: v for k, v in val.items() if k != "grad_norm"}
    if "modular" in conditions:
        res["ablation"] = ablation(runs, seeds, "test")
    for label, path in (exp.get("compare") or {}).items():
        res.setdefault("variants", {})[label] = compare_variant(label, path, res)
    first = runs[("modular" if "modular" in conditions else conditions[0], seeds[0])]  # every setting in use
    protocol = {
        "command": info["command"],
        "date": info["date"],
        "extra": [str(a) for a in exp.get("fit_args", [])],
        "machine": f"{machine_line(info['machine'])}; {runner.args.threads} thread(s) per run",
        "model": first.read_summary()["base_model"],
        "settings": settings(first, exp),
        "wall_s": {run_name(c, v, s): w for (c, v, s), (_, w) in done.items()},
        # train.log gets Lightning's restore line whenever a run continued from a checkpoint
        "resumed": [
            f"{c}_s{s}"
            for c, s in keys
            if "Restored all states" in (runs[(c, s)].path.parent / "train.log").read_text(errors="replace")
        ],
        "figure": Path(exp["out"]).with_suffix(".png").name,
    }
    return {"protocol": protocol, "results": res}, list(runs.values())


# -- the methods table and the standard CL benchmark -------------------------------------------
def loss_numbers(run: RunDir, split: str, no_task_id: bool = False) -> dict | None:
    if not run.matrix_file(matrix_name("loss", no_task_id), split).is_file():
        return None
    L = run.read_matrix(matrix_name("loss", no_task_id), split).values
    # on the loss, BWT and forgetting with the accuracy's sign: negative BWT = earlier losses went up
    return {
        "final_avg_loss": clm.final_avg_loss(L),
        "drift_pct": clm.drift_pct(L),
        "bwt": clm.bwt(-L),
        "forgetting": clm.forgetting(-L),
        "final_row": L[-1].tolist(),
    }


def routing_acc(run: RunDir) -> float | None:
    f = run.matrix_file(matrix_name("routing_accuracy", no_task_id=True), "test")
    return float(np.nanmean(run.read_matrix(f.stem, "test").values[-1])) if f.is_file() else None


def loss_scores(run: RunDir, wall_s: float) -> dict:
    test = run.read_summary("test")
    return {
        "test": loss_numbers(run, "test"),
        "test_no_task_id": loss_numbers(run, "test", no_task_id=True),
        "validation": loss_numbers(run, "validation"),
        "no_task_id": test.get("no_task_id", {}).get("routing"),
        "routing_acc": routing_acc(run),
        "rebuilt": bool(test.get("rebuilt_from_adapters")),
        "wall_s": wall_s,
        "evaluation_s": run.read_summary()["evaluation_s"],
        "run": "/".join(run.path.parts[-3:]),
    }  # fmt: skip  (<runs dir>/<name>/version_N: no machine path)


def accuracy_scores(run: RunDir, wall_s: float) -> dict:
    summary, acc = run.read_summary("test"), run.read_matrix(ACCURACY_MATRIX, "test")
    blind = summary.get("no_task_id", {})
    return {
        "avg_acc": summary["final_avg_accuracy"],
        "bwt": summary["bwt"],
        "avg_acc_no_task_id": blind.get("final_avg_accuracy"),
        "bwt_no_task_id": blind.get("bwt"),
        "no_task_id": blind.get("routing"),
        "routing_acc": routing_acc(run),
        "base_acc": float(np.mean(acc.values[0])),
        "base_row": acc.values[0].tolist(),
        "final_row": acc.values[-1].tolist(),
        "evaluation_s": run.read_summary()["evaluation_s"],
        "router": blind.get("router"),
        "rebuilt": bool(summary.get("rebuilt_from_adapters")),
        "val_avg_acc": run.read_summary()["final_avg_accuracy"],
        "wall_s": wall_s,
    }


def methods_table(exp: dict, runner: Runner, info: dict) -> tuple[dict, list[RunDir]]:
    methods, seeds, grid = list(exp["methods"]), list(exp["seeds"]), exp.get("grid") or {}
    # the selection seed first (every grid value), then the other seeds at the kept values
    first = [(m, v, seeds[0]) for m in methods for v in grid.get(m, [None])]
    runs = runner.all(first)

    def kept(m: str) -> float | None:
        if m not in grid:
            return None
        val = [loss_numbers(runs[(m, v, seeds[0])][0], "validation")["final_avg_loss"] for v in grid[m]]
        return grid[m][int(np.argmin(val))]

    value = {m: kept(m) for m in methods}
    runs |= runner.all([(m, value[m], s) for s in seeds[1:] for m in methods])
    scores = accuracy_scores if exp["kind"] == "standard_cl" else loss_scores
    res: dict = {"seeds": seeds, "methods": {}}
    for m in methods:
        res["methods"][m] = {
            "per_seed": {s: scores(*runs[(m, value[m], s)]) for s in seeds},
        }
    any_run = runs[first[0]][0]
    at_a_time = f"{runner.args.threads} thread(s) per run, {runner.args.jobs} at a time"
    protocol = {
        "command": info["command"],
        "date": info["date"],
        "extra": [str(a) for a in exp.get("fit_args", [])],
        "machine": f"{machine_line(info['machine'])}; {at_a_time}",
        "settings": settings(any_run, exp),
        "wall_s": {run_name(*k): w for k, (_, w) in runs.items()},
    }
    if exp["kind"] == "standard_cl":
        d = init_args(any_run.read_config()["data"])
        res["tasks"] = any_run.read_matrix(ACCURACY_MATRIX, "test").tasks
        res["base"] = {s: res["methods"][methods[0]]["per_seed"][s]["base_acc"] for s in seeds}
        protocol |= {"test_size": d["test_size"], "validation_size": d["holdout_size"]}
    else:
        res |= {"select_seed": seeds[0], "tasks": any_run.read_matrix(LOSS_MATRIX, "test").tasks, "grid": {}}
        for m in methods:
            res["methods"][m]["value"] = value[m]
            if m in grid:
                res["grid"][m] = {str(v): loss_scores(*runs[(m, v, seeds[0])]) for v in grid[m]}
    return {"protocol": protocol, "results": res}, [run for run, _ in runs.values()]


# -- one experiment ----------------------------------------------------------------------------
def run_experiment(path: str | Path, args: argparse.Namespace, argv: list[str]) -> Path:
    """Fit (or reuse) an experiment's runs, write its record (``out``) and render its report."""
    exp = load_experiment(path)
    out = REPO / exp["out"]
    info = run_info(__file__, argv)
    if exp["kind"] == "recipe":
        reports = [
            (label, json.loads(run_experiment(REPO / p, args, argv).read_text()))
            for label, p in [("current recipe", exp["current"]), *exp["settings"].items()]
        ]
        record = {
            "experiment": exp["path"],
            "command": info["command"],
            "date": info["date"],
            "settings": [summarise(label, r, reports[0][1]) for label, r in reports],
        }
        commits: dict[str, list[str]] = {}
        for label, r in reports:
            for commit, names in r.get("code", {}).get("run_commits", {"unknown": ["its runs"]}).items():
                commits.setdefault(commit, []).extend(f"{label}: {n}" for n in names)
    else:
        if exp["kind"] == "standard_cl" and not (REPO / "../shared/cl_benchmark").is_dir():
            raise SystemExit(
                "../shared/cl_benchmark is missing: this benchmark reads the offline copy of the CL benchmark"
            )
        start, runner = time.perf_counter(), Runner(exp, args)
        data, runs = (reproduction if exp["kind"] == "reproduction" else methods_table)(exp, runner, info)
        if exp["kind"] != "reproduction":
            data["protocol"]["invocation_wall_s"] = time.perf_counter() - start  # reused runs count 0
        record, commits = {"experiment": exp["path"], **data}, run_commits(runs)
    write_record(out, record, commits)
    print(f"wrote {out}, {render(out)}")
    return out


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="an experiment file, e.g. benchmarks/experiments/reproduction.yaml")
    p.add_argument(
        "--jobs", type=int, default=1, help="fits at a time (e.g. --jobs 2 --threads 1 on 2 cores)"
    )
    p.add_argument("--threads", type=int, help="OMP threads per fit (default: cores / jobs)")
    p.add_argument(
        ADOPT_LEGACY,
        action="store_true",
        help=f"reuse finished runs that have no {FIT_RECORD} (made "
        "before runs recorded their arguments) as made with the experiment's arguments",
    )
    args = p.parse_args(argv)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    run_experiment(args.experiment, args, argv)


if __name__ == "__main__":
    main()
