"""Run one experiment file: its fits, one record per run, the experiment's record and report.

    python benchmarks/run.py benchmarks/experiments/reproduction.yaml [--jobs 2 --threads 1]

An experiment file (benchmarks/experiments/*.yaml) is data: ``kind`` (reproduction, methods,
standard_cl, recipe, growth), the base ``config`` file(s), the ``methods`` (presets
configs/methods/<name>.yaml), ``seeds``, ``fit_args`` for every ``train.py fit`` (sizes, override
files), ``task_id`` (``both``: also evaluate without the task id), a knob ``grid`` (every value at the
first seed, the best on validation kept; a reproduction's is MODULAR's ``crma_lr``), ``knobs_from``
(another experiment whose first-seed choice to take), ``compare`` (reproduction: other records'
MODULAR runs as a variant), ``runs_dir`` (run directories), ``records`` (one record per run; default
``runs/<experiment>`` beside ``out``) and ``out`` (the experiment's record, ``.json``;
benchmarks/report.py renders ``.md`` and ``.png`` beside it). A recipe experiment names other
experiment files (``current``, ``settings``), a growth experiment reproductions at several training
sizes (``sizes``, ``reference``); each runs them first.

Each run (``<method>[_<knob>=<value>]_s<seed>``) is fitted once. When it finishes, its compact record
(``crma_lightning.runs.record.compact``: every matrix and summary, the config, the digest of its
arguments and config files, the commits, wall time by phase) is written to ``records`` and committed;
from then on the run is read from its record, on any machine, and its run directory is not needed. An
interrupted fit resumes from its last checkpoint (``harness.resumable_fit``); a record or run made with
other arguments is refused with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from harness import (
    FIT_RECORD,
    REPO,
    fit_record,
    machine,
    machine_line,
    record_difference,
    repo_relative,
    resumable_fit,
    run_all,
    run_info,
    utc_now,
    write_record,
)
from report import KNOBS, METHODS, extra_of, render, summarise

from crma_lightning.core.atomic import atomic_write_json
from crma_lightning.evaluation import metrics as clm
from crma_lightning.runs.record import RecordedRun, compact
from crma_lightning.runs.rundir import ACCURACY_MATRIX, LOSS_MATRIX, RunDir, init_args, matrix_name
from crma_lightning.serve import load_run

KINDS = ("reproduction", "methods", "standard_cl", "recipe", "growth")


def load_experiment(path: str | Path) -> dict:
    exp = yaml.safe_load(Path(path).read_text())
    if exp.get("kind") not in KINDS:
        raise SystemExit(f"{path}: kind must be one of {KINDS}, not {exp.get('kind')!r}")
    if exp["kind"] not in ("recipe", "growth"):
        exp["config"] = [exp["config"]] if isinstance(exp["config"], str) else list(exp["config"])
        if unknown := sorted(set(exp["methods"]) - set(METHODS)):
            raise SystemExit(f"{path}: unknown methods {unknown}; the presets are {list(METHODS)}")
    # beside the experiment's record: benchmarks/results/runs/<experiment> for the committed experiments
    records = exp.get("records") or str(Path(exp["out"]).parent / "runs" / Path(path).stem)
    return exp | {"path": repo_relative(path), "records": records}


# -- fits --------------------------------------------------------------------------------------
def lora_lr(exp: dict) -> float:
    """The LoRA learning rate the experiment's runs train with (its config files, then ``fit_args``)."""
    lr = None
    for path in exp["config"]:
        lr = (yaml.safe_load((REPO / path).read_text()).get("model") or {}).get("lr", {}).get("lora", lr)
    fit = [str(a) for a in exp.get("fit_args", [])]
    lr = next((fit[i + 1] for i in range(len(fit) - 1) if fit[i] == "--model.lr.lora"), lr)
    if lr is None:
        raise SystemExit(f"{exp['path']}: a crma_lr grid needs model.lr.lora set in its config files")
    return float(lr)


def setting_args(method: str, value: float | None, exp: dict) -> list[str]:
    """``train.py`` arguments that set ``method``'s knob to ``value`` on top of its preset."""
    if value is None:
        return []
    if KNOBS[method] == "crma_lr":
        # CRMA's read/write rate = value x the LoRA rate; the mixing logits and the gate 10x that,
        # the ratio of configs/smollm2.yaml (docs/decisions.md)
        proj = value * lora_lr(exp)
        rates = {"crma_proj": proj, "crma_mix": 10 * proj, "crma_gate": 10 * proj}
        return [a for k, v in rates.items() for a in (f"--model.lr.{k}", f"{v:.6g}")]
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
    return args + setting_args(method, value, exp) + [str(a) for a in exp.get("fit_args", [])]


def run_name(method: str, value: float | None, seed: int) -> str:
    return f"{method}_s{seed}" if value is None else f"{method}_{KNOBS[method]}={value:g}_s{seed}"


class Runner:
    """Fits an experiment's runs, each once: a run whose record is in ``records`` is read from it, never
    fitted again; otherwise it is fitted (resumed when interrupted) and its record written, and
    committed when it lies in this repository (``--no-commit``: not)."""

    def __init__(self, exp: dict, args: argparse.Namespace) -> None:
        self.exp, self.args = exp, args
        self.runs_dir = (REPO / exp["runs_dir"]).resolve()
        self.records = (REPO / exp["records"]).resolve()
        self.fitted, self.lock = 0, threading.Lock()

    def fit(self, key: tuple[str, float | None, int]) -> RecordedRun | None:
        method, value, seed = key
        name, args = run_name(*key), fit_args(self.exp, method, seed, value)
        path, fitted = self.records / f"{name}.json", fit_record(args)
        if path.is_file():
            rec = RecordedRun.load(path)
            if rec.rec["fit"]["digest"] != fitted["digest"]:
                raise SystemExit(
                    f"[{name}] {repo_relative(path)} was fitted with other arguments "
                    f"({record_difference(rec.rec['fit'], fitted)}): delete the record to fit it again, "
                    "or give the experiment another `records` folder"
                )
            print(f"[{name}] recorded: {repo_relative(path)}", flush=True)
            return rec
        with self.lock:
            if self.args.fits is not None and self.fitted >= self.args.fits:
                print(f"[{name}] not fitted: --fits {self.args.fits} reached", flush=True)
                return None
            self.fitted += 1
        run, wall = resumable_fit(name, args, self.runs_dir, self.args.threads)
        summary = run.read_summary()
        extra = {
            "name": name,
            "experiment": self.exp["path"],
            "fit": fitted,
            "commits": json.loads((run.path.parent / FIT_RECORD).read_text())["commits"],
            "date": utc_now(),
            "machine": f"{machine_line(machine())}; {self.args.threads} thread(s) per run, "
            f"{self.args.jobs} at a time",
            # training is the rest: setup, steps, checkpoints
            "wall_s": {"total": wall, "evaluation": summary["evaluation_s"]},
            # train.log gets Lightning's restore line whenever a run continued from a checkpoint
            "resumed": "Restored all states" in (run.path.parent / "train.log").read_text(errors="replace"),
        }
        if self.exp["kind"] == "reproduction" and summary.get("spectral_max_sigma") is not None:
            extra["crma_ablation"] = crma_ablation(run, "test")
        atomic_write_json(path, compact(run, **extra))
        if path.is_relative_to(REPO) and not self.args.no_commit:
            commit_record(path, f"Run record {repo_relative(path)}: {name} fitted in {wall:.0f} s")
        return RecordedRun.load(path)

    def all(self, keys: list) -> dict:
        done = dict(zip(keys, run_all(self.fit, keys, self.args.jobs), strict=True))
        if left := [run_name(*k) for k, run in done.items() if run is None]:
            raise SystemExit(f"{len(left)} run(s) not fitted yet (--fits): {', '.join(left)}; rerun to go on")
        return done


COMMITS = threading.Lock()  # one git commit at a time in this process (runs finish on several threads)


def commit_record(path: Path, message: str, repo: Path = REPO, tries: int = 30) -> None:
    """Commit the record at ``path`` alone; another process's commit holding git's index lock is
    waited for (two runners may share a clone), any other failure raised."""
    with COMMITS:
        for attempt in range(tries):
            for cmd in (["add", "--", str(path)], ["commit", "-q", "-m", message, "--", str(path)]):
                out = subprocess.run(["git", "-C", str(repo), *cmd], capture_output=True, text=True)
                if out.returncode:
                    break
            else:
                return
            if "index.lock" not in out.stderr or attempt == tries - 1:
                raise SystemExit(f"committing {path} failed: {out.stderr.strip()}")
            time.sleep(1)


def crma_ablation(run: RunDir, split: str) -> dict[str, list[float]]:
    """The run as served (``serve.load_run``): every task's loss on ``split`` with CRMA on and off."""
    served = load_run(run.path)
    dm = served.info.datamodule()
    return {
        mode: [served.holdout_loss(t, crma=mode == "on", dm=dm, split=split) for t in served.tasks]
        for mode in ("on", "off")
    }


def record_commits(runs: list[RecordedRun]) -> dict[str, list[str]]:
    """Commit -> the runs fitted (or resumed) at it, for the experiment record's ``code`` line."""
    out: dict[str, list[str]] = {}
    for run in runs:
        for c in run.rec.get("commits") or ["unknown"]:
            out.setdefault(c, []).append(run.rec["name"])
    return out


# -- the reproduction --------------------------------------------------------------------------
def collect(
    runs: dict[tuple[str, int], RecordedRun], conditions: list[str], seeds: list[int], split: str
) -> dict:
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
        # on the loss with the accuracy's sign: negative = earlier tasks' losses went up since trained
        per_seed = [clm.bwt(-loss[(c, s)]) for s in seeds]
        mean, sd = clm.mean_sd(per_seed)
        res.setdefault("bwt", {})[c] = {"mean": mean, "sd": sd, "per_seed": per_seed}
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
            "interval": advantage_interval(runs, seeds, split),
        }
    return res


def advantage_interval(
    runs: dict[tuple[str, int], RecordedRun], seeds: list[int], split: str, resamples: int = 2000
) -> list[float] | None:
    """MODULAR vs FROZEN on prior tasks (%) with a 95 % percentile bootstrap interval over seeds and,
    within each seed and task, over the held-out examples, the same for both (paired): each task's
    loss is its examples' loss sum over their tokens, as in the matrices. None for runs recorded
    before the per-example losses were kept (``final_losses``)."""
    try:
        per = [
            [
                np.stack(
                    [
                        np.asarray(runs[(c, s)].read_summary(split)["final_losses"]["task_id"][t], float)
                        for c in ("frozen", "modular")
                    ]
                )  # (2, examples, [loss sum, tokens])
                for t in runs[("frozen", s)].read_matrix(split=split).tasks[:-1]
            ]
            for s in seeds
        ]
    except (KeyError, TypeError, ValueError):
        return None

    def advantage(cells: list[np.ndarray]) -> float:
        pooled = np.stack([x.sum(1) for x in cells])  # (tasks, 2, 2)
        loss = pooled[..., 0] / pooled[..., 1]
        return float(np.mean(100 * (loss[:, 0] - loss[:, 1]) / loss[:, 0]))

    rng = np.random.default_rng(0)
    boots = []
    for _ in range(resamples):
        drawn = [per[j] for j in rng.integers(0, len(per), len(per))]
        boots.append(
            np.mean([advantage([x[:, rng.integers(0, x.shape[1], x.shape[1])] for x in s]) for s in drawn])
        )
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return [float(np.mean([advantage(s) for s in per])), float(lo), float(hi)]


def ablation(runs: dict[tuple[str, int], RecordedRun], seeds: list[int], split: str) -> dict:
    """Each MODULAR run's recorded losses with CRMA on and off at inference (:func:`crma_ablation`)."""
    abl = {s: runs[("modular", s)].rec["crma_ablation"] for s in seeds}
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


def settings(run: RecordedRun, exp: dict) -> dict:
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


def crma_lr_choice(exp: dict, runs: dict, seed: int) -> dict:
    """MODULAR's CRMA rate among ``grid.modular``: the largest MODULAR-vs-FROZEN advantage on the
    validation split's prior tasks at ``seed`` (the issue's criterion; test is only reported)."""

    def loss(method: str, value: float | None) -> np.ndarray:
        return runs[(method, value, seed)].read_matrix(split="validation").values

    adv = {
        v: clm.modular_vs_frozen_pct(loss("frozen", None), loss("modular", v)) for v in exp["grid"]["modular"]
    }
    return {"seed": seed, "validation_vs_frozen": adv, "chosen": max(adv, key=adv.get)}


def first_seed(exp: dict, runner: Runner) -> tuple[dict, dict, dict]:
    """The first seed's runs (every grid value), the knob values kept and how they were chosen."""
    conditions, seed, grid = list(exp["methods"]), exp["seeds"][0], exp.get("grid") or {}
    if set(grid) - {"modular"} or ("modular" in grid and "frozen" not in conditions):
        raise SystemExit(f"{exp['path']}: a reproduction's grid is MODULAR's crma_lr, chosen against FROZEN")
    value = {c: None for c in conditions}
    if exp.get("knobs_from"):  # another experiment's choice, from its recorded first-seed runs
        other = load_experiment(REPO / exp["knobs_from"])
        quiet = argparse.Namespace(**{**vars(runner.args), "fits": 0})
        try:
            value |= first_seed(other, Runner(other, quiet))[1]
        except SystemExit as e:
            raise SystemExit(f"{exp['path']} takes its knobs from {exp['knobs_from']}: {e}") from None
    done = runner.all([(c, v, seed) for c in conditions for v in grid.get(c, [value[c]])])
    choice = {m: crma_lr_choice(exp, done, seed) for m in grid}
    return done, value | {m: ch["chosen"] for m, ch in choice.items()}, choice


def reproduction(exp: dict, runner: Runner, info: dict) -> tuple[dict, list[RecordedRun]]:
    conditions, seeds = list(exp["methods"]), list(exp["seeds"])
    done, value, choice = first_seed(exp, runner)
    done |= runner.all([(c, value[c], s) for s in seeds[1:] for c in conditions])
    runs = {(c, s): done[(c, value[c], s)] for s in seeds for c in conditions}
    res = collect(runs, conditions, seeds, "test")
    res["steps_per_task"] = steps_per_task(runs[(conditions[0], seeds[0])])
    if choice:
        res["grid"] = choice
    res["knobs"] = {c: v for c, v in value.items() if v is not None}
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
        "wall_s": {run.rec["name"]: run.rec["wall_s"]["total"] for run in runs.values()},
        "resumed": [run.rec["name"] for run in runs.values() if run.rec["resumed"]],
        "figure": Path(exp["out"]).with_suffix(".png").name,
    }
    return {"protocol": protocol, "results": res}, list(runs.values())


def steps_per_task(run: RecordedRun) -> int:
    """Optimizer steps of the first task, as the gradient-norm log counted them."""
    return next(iter(run.read_grad_norm().values()))["steps"]


# -- the methods table and the standard CL benchmark -------------------------------------------
def loss_numbers(run: RecordedRun, split: str, no_task_id: bool = False) -> dict | None:
    if not run.has_matrix(matrix_name("loss", no_task_id), split):
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


def routing_acc(run: RecordedRun) -> float | None:
    name = matrix_name("routing_accuracy", no_task_id=True)
    return (
        float(np.nanmean(run.read_matrix(name, "test").values[-1])) if run.has_matrix(name, "test") else None
    )


def loss_scores(run: RecordedRun) -> dict:
    test = run.read_summary("test")
    return {
        "test": loss_numbers(run, "test"),
        "test_no_task_id": loss_numbers(run, "test", no_task_id=True),
        "validation": loss_numbers(run, "validation"),
        "no_task_id": test.get("no_task_id", {}).get("routing"),
        "routing_acc": routing_acc(run),
        "rebuilt": bool(test.get("rebuilt_from_adapters")),
        "wall_s": run.rec["wall_s"]["total"],
        "evaluation_s": run.read_summary()["evaluation_s"],
        "run": run.rec["name"],
    }


def accuracy_scores(run: RecordedRun) -> dict:
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
        "wall_s": run.rec["wall_s"]["total"],
        "final_row_no_task_id": row_of(run, matrix_name("accuracy", no_task_id=True), -1),
        "general": summary.get("general_drift"),
        # the final row's per-example scores (``examples``: task -> 0/1 ...), for paired intervals
        "examples": summary.get("final_examples"),
    }


def row_of(run: RecordedRun, name: str, k: int) -> list[float] | None:
    return run.read_matrix(name, "test").values[k].tolist() if run.has_matrix(name, "test") else None


def methods_table(exp: dict, runner: Runner, info: dict) -> tuple[dict, list[RecordedRun]]:
    methods, seeds, grid = list(exp["methods"]), list(exp["seeds"]), exp.get("grid") or {}
    # the selection seed first (every grid value), then the other seeds at the kept values
    first = [(m, v, seeds[0]) for m in methods for v in grid.get(m, [None])]
    runs = runner.all(first)

    def kept(m: str) -> float | None:
        if m not in grid:
            return None
        cands = [runs[(m, v, seeds[0])] for v in grid[m]]
        if exp["kind"] == "standard_cl":  # the highest final average validation accuracy
            return grid[m][int(np.argmax([r.read_summary()["final_avg_accuracy"] for r in cands]))]
        return grid[m][int(np.argmin([loss_numbers(r, "validation")["final_avg_loss"] for r in cands]))]

    value = {m: kept(m) for m in methods}
    runs |= runner.all([(m, value[m], s) for s in seeds[1:] for m in methods])
    scores = accuracy_scores if exp["kind"] == "standard_cl" else loss_scores
    res: dict = {"seeds": seeds, "methods": {}}
    for m in methods:
        res["methods"][m] = {
            "per_seed": {s: scores(runs[(m, value[m], s)]) for s in seeds},
            "value": value[m],
        }
    any_run = runs[first[0]]
    at_a_time = f"{runner.args.threads} thread(s) per run, {runner.args.jobs} at a time"
    protocol = {
        "command": info["command"],
        "date": info["date"],
        "extra": [str(a) for a in exp.get("fit_args", [])],
        "machine": f"{machine_line(info['machine'])}; {at_a_time}",
        "settings": settings(any_run, exp),
        "wall_s": {run_name(*k): run.rec["wall_s"]["total"] for k, run in runs.items()},
    }
    if exp["kind"] == "standard_cl":
        d = init_args(any_run.read_config()["data"])
        res["tasks"] = any_run.read_matrix(ACCURACY_MATRIX, "test").tasks
        res["base"] = {s: res["methods"][methods[0]]["per_seed"][s]["base_acc"] for s in seeds}
        protocol |= {"test_size": d["test_size"], "validation_size": d["holdout_size"]}
    else:
        res |= {"select_seed": seeds[0], "tasks": any_run.read_matrix(LOSS_MATRIX, "test").tasks, "grid": {}}
        for m in methods:
            if m in grid:
                res["grid"][m] = {str(v): loss_scores(runs[(m, v, seeds[0])]) for v in grid[m]}
    return {"protocol": protocol, "results": res}, list(runs.values())


# -- growth with training length ---------------------------------------------------------------
def legacy_steps(protocol: dict) -> int:
    """Steps per task of a reproduction record written before records counted them, from its
    protocol's words ("64 train / ...", "4 x 1 accumulation, 1 epoch(s) per task")."""
    st = protocol["settings"]
    train = int(re.match(r"(\d+) train", st["examples per task"]).group(1))
    batch = re.match(r"(\d+) x (\d+) accumulation, (\d+) epoch", st["batch"])
    batch, accumulate, epochs = map(int, batch.groups())
    return -(-train // (batch * accumulate)) * epochs


def growth_point(label: str, record: dict, reference: bool = False) -> dict:
    """One training size of the growth figure: NAIVE's drift and MODULAR vs FROZEN per seed (test)."""
    res, protocol = record["results"], record["protocol"]
    return {
        "label": label,
        "experiment": record.get("experiment"),
        "steps_per_task": res.get("steps_per_task") or legacy_steps(protocol),
        "examples": protocol["settings"]["examples per task"],
        "seeds": res["seeds"],
        "naive_drift": res["drift"].get("naive", {}).get("per_seed"),
        "modular_drift": res["drift"].get("modular", {}).get("per_seed"),
        "modular_vs_frozen": res.get("modular_vs_frozen", {}).get("per_seed"),
        "knobs": res.get("knobs", {}),
        "reference": reference,
    }


def growth(exp: dict, args: argparse.Namespace, argv: list[str], info: dict) -> tuple[dict, dict]:
    """Each size (a reproduction experiment, run first, or a committed reproduction record) as a point;
    ``reference`` sizes follow another protocol (drawn apart)."""
    points, commits = [], {}
    sizes = [(k, v, False) for k, v in exp["sizes"].items()]
    for label, path, reference in sizes + [(k, v, True) for k, v in (exp.get("reference") or {}).items()]:
        out = run_experiment(REPO / path, args, argv) if path.endswith(".yaml") else REPO / path
        record = json.loads(out.read_text())
        points.append(growth_point(label, record, reference))
        for commit, names in record.get("code", {}).get("run_commits", {"unknown": ["its runs"]}).items():
            commits.setdefault(commit, []).extend(f"{label}: {n}" for n in names)
    points.sort(key=lambda p: p["steps_per_task"])
    record = {"experiment": exp["path"], "command": info["command"], "date": info["date"], "sizes": points}
    return record, commits


# -- one experiment ----------------------------------------------------------------------------
def run_experiment(path: str | Path, args: argparse.Namespace, argv: list[str]) -> Path:
    """Fit (or reuse) an experiment's runs, write its record (``out``) and render its report."""
    exp = load_experiment(path)
    out = REPO / exp["out"]
    info = run_info(__file__, argv)
    if exp["kind"] == "growth":
        record, commits = growth(exp, args, argv, info)
    elif exp["kind"] == "recipe":
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
        record, commits = {"experiment": exp["path"], **data}, record_commits(runs)
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
    p.add_argument("--no-commit", action="store_true", help="write the run records, do not commit them")
    p.add_argument(
        "--fits", type=int, help="fit at most this many unrecorded runs, then stop (a session's share)"
    )
    args = p.parse_args(argv)
    args.threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    run_experiment(args.experiment, args, argv)


if __name__ == "__main__":
    main()
