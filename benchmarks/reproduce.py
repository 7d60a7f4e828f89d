"""Reproduce the paper's headline table (docs/method.md §3): NAIVE, FROZEN and MODULAR over several seeds.

Every (condition, seed) is one ``train.py fit`` of the same config, run as a subprocess (one
failure cannot poison the next, and a killed reproduction resumes: finished runs are reused and an
unfinished one continues from its last checkpoint, if fitted with the same arguments and config files:
``harness.resumable_fit``). From the runs' own files it then computes

- loss-relative drift per condition, mean ± sample SD over seeds and per seed;
- the MODULAR-vs-FROZEN prior-task loss advantage, per seed (paired by seed);
- per-task final losses (mean over seeds);
- the inference ablation: each finished MODULAR run loaded as served (``serve.load_run``) and
  evaluated per task with CRMA on and off (``TrainedRun.holdout_loss``);

all on the test split (``continual/test/``), which no setting was chosen on; drift and the advantage
on the validation split, where the CRMA learning rates were chosen (``--compare``), are beside them;
- peak and mean gradient norm per task and parameter group (``continual/grad_norm.json``): the LoRA
  norm across NAIVE, FROZEN and MODULAR, CRMA's norm apart, the total, and ZClip's clipped steps;
- the spectral bound over all MODULAR steps;

and writes ``<out>.md`` (the paper's numbers beside ours and the exact protocol), ``<out>.json`` and
``<out>.png`` (drift per condition and seed, the mean loss matrices, peak gradient norms).

Run (the committed results; ~1 h on 2 CPU cores):
    .venv/bin/python benchmarks/reproduce.py --config configs/smollm2.yaml
Quick look on the toy model:
    .venv/bin/python benchmarks/reproduce.py --config configs/tiny.yaml --seeds 0,1 --out /tmp/repro.md
Arguments after ``--`` go to every ``train.py fit`` (e.g. ``-- --data.train_size 48``).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import torch
from harness import machine_line, resumable_fit, run_all, run_commits, run_info, script_argv, write_report
from reproduce_report import figure, markdown

from crma_lightning.evaluation import metrics as clm
from crma_lightning.runs.rundir import RunDir, init_args
from crma_lightning.serve import load_run

CONDITIONS = ("naive", "frozen", "modular")


#: The paper's numbers (Mistral-7B, 5 domains, 500/100 examples, seeds 0/42/1234; docs/method.md §3).
# -- running -----------------------------------------------------------------------------------
def run_name(condition: str, seed: int) -> str:
    return f"{condition}_s{seed}"


def fit_args(config: str, condition: str, seed: int, extra: list[str]) -> list[str]:
    """The ``train.py fit`` arguments of one condition x seed (methods.py checks a reused run against them)."""
    return [
        "--config",
        config,
        "--config",
        f"configs/methods/{condition}.yaml",
        "--data.seed",
        str(seed),
        *extra,
    ]


def train(
    config: str,
    condition: str,
    seed: int,
    runs_dir: Path,
    extra: list[str],
    threads: int,
    adopt_legacy: bool = False,
) -> tuple[RunDir, float]:
    """Run (or finish) one condition x seed; returns its run dir and its training wall time."""
    args = fit_args(config, condition, seed, extra)
    return resumable_fit(run_name(condition, seed), args, runs_dir, threads, adopt_legacy)


def crma_ablation(run: RunDir, split: str) -> dict[str, list[float]]:
    """Loss per task on ``split`` of a finished MODULAR run as served, with CRMA on and off (same weights).

    ``load_run`` rebuilds the run from its config and adapters (checked against the base model);
    task i is served with LoRA_i, as the run's last loss-matrix row was evaluated.
    """
    served = load_run(run.path)
    dm = served.info.datamodule()
    return {
        mode: [served.holdout_loss(t, crma=mode == "on", dm=dm, split=split) for t in served.tasks]
        for mode in ("on", "off")
    }


# -- aggregation -------------------------------------------------------------------------------
def collect(runs: dict[tuple[str, int], RunDir], conditions: list[str], seeds: list[int], split: str) -> dict:
    """The report's numbers from the runs' loss matrices on ``split``."""
    loss = {key: run.read_matrix(split=split).values for key, run in runs.items()}
    first = runs[next(iter(runs))].read_matrix(split=split)
    tasks = first.tasks
    res: dict = {"tasks": tasks, "seeds": seeds, "conditions": conditions, "split": split, "drift": {},
                 "final_loss": {}, "loss_matrix_mean": {}, "grad_norm": {}, "spectral": {}}  # fmt: skip
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
        # Per prior task: the sign is mixed per task in the paper too.
        f, m = (np.stack([loss[(c, s)][-1, :-1] for s in seeds]) for c in ("frozen", "modular"))
        res["modular_vs_frozen"] = {"mean": mean, "sd": sd, "per_seed": adv,
                                    "per_task_mean": (100 * (f - m) / f).mean(0).tolist()}  # fmt: skip
    return res


def ablation(runs: dict[tuple[str, int], RunDir], seeds: list[int], split: str) -> dict:
    abl = {s: crma_ablation(runs[("modular", s)], split) for s in seeds}
    last = {s: runs[("modular", s)].read_matrix(split=split).values[-1] for s in seeds}
    return {
        "per_seed": abl,
        "on_mean": np.mean([abl[s]["on"] for s in seeds], 0).tolist(),
        "off_mean": np.mean([abl[s]["off"] for s in seeds], 0).tolist(),
        "max_diff_vs_run": float(max(np.max(np.abs(np.asarray(abl[s]["on"]) - last[s])) for s in seeds)),
    }


def protocol_settings(run: RunDir, extra: list[str]) -> dict:
    cfg = run.read_config()
    d, m, t = init_args(cfg["data"]), init_args(cfg["model"]), cfg["trainer"]
    lora, crma, sched = m["lora"], m["crma"], m["lr_schedule"]
    return {
        "tasks": ", ".join(
            f"{x['name']} ({x.get('source', 'synthetic')})" for x in map(init_args, d["tasks"])
        ),
        "examples per task": f"{d['train_size']} train / {d['holdout_size']} validation / "
        f"{d['holdout_size'] if d.get('test_size') is None else d['test_size']} test blocks of {d['max_length']} tokens",
        "batch": f"{d['batch_size']} x {t.get('accumulate_grad_batches', 1)} accumulation, {d['epochs_per_task']} epoch(s) per task",
        "LoRA": f"r={lora['r']}, alpha={lora['alpha']}, dropout={lora['dropout']}, targets {lora['target_modules']}",
        "CRMA (MODULAR)": f"n={crma['streams']}, form {crma['form']}, {crma['projection']} ({crma['sinkhorn_iters']} iterations)",
        "learning rates": ", ".join(f"{k} {v}" for k, v in m["lr"].items()),
        "schedule": f"{sched['class_path'].split('.')[-1]} {sched.get('init_args', {})}, restarted per task",
        "optimizer": str(
            m["optimizer"]["class_path"] if isinstance(m["optimizer"], dict) else m["optimizer"]
        ),
        "precision / clipping": f"{t['precision']}, gradient_clip_val {t.get('gradient_clip_val')}"
        + (f", ZClip {zclip}" if (zclip := cfg.get("zclip") or {}).get("enabled") else ""),
        "base model": f"{m['backbone'].get('dtype', 'float32')}"
        + (f", linear layers {q}" if (q := m["backbone"].get("quantize", "none")) != "none" else ""),
        "CRMA init": crma.get("init", "orthogonal"),
        "extra train.py arguments": " ".join(extra) or "none",
    }


def compare_variant(spec: str, res: dict) -> dict:
    """``LABEL=path.json``: the MODULAR runs of another reproduce.py report, against this one's FROZEN.

    Only seeds present in both count. The advantage needs only the final rows, which both JSONs hold.
    """
    label, _, path = spec.partition("=")
    other = json.loads(Path(path).read_text())
    theirs = other["results"]
    # Compared on the other report's split (reports before test sets existed: validation).
    res = res if theirs.get("split", "validation") == res["split"] else res["validation"]
    seeds = [s for s in res["seeds"] if s in theirs["seeds"]]
    if not seeds or "modular" not in theirs["conditions"] or "frozen" not in res["conditions"]:
        raise SystemExit(f"--compare {spec}: needs MODULAR runs there and FROZEN runs here for common seeds")

    def final(r: dict, c: str, s: int) -> np.ndarray:
        return np.asarray(r["final_loss"][c]["per_seed"][r["seeds"].index(s)])

    def adv(r: dict, s: int) -> float:
        f, m = final(res, "frozen", s)[:-1], final(r, "modular", s)[:-1]  # prior tasks only
        return float(100 * np.mean((f - m) / f))

    def drift(r: dict, s: int) -> float:
        return r["drift"]["modular"]["per_seed"][r["seeds"].index(s)]

    extra = shlex.split(other["protocol"]["command"].partition(" -- ")[2])
    return {label: {"source": Path(path).name, "extra": extra, "seeds": seeds, "split": res["split"],
                    "drift": [drift(theirs, s) for s in seeds], "adv": [adv(theirs, s) for s in seeds],
                    "base_drift": [drift(res, s) for s in seeds], "base_adv": [adv(res, s) for s in seeds]}}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    argv, ours, extra, p = script_argv(__doc__, argv)
    p.add_argument("--config", default="configs/smollm2.yaml")
    p.add_argument("--seeds", default="0,42,1234")
    p.add_argument("--conditions", default=",".join(CONDITIONS))
    p.add_argument("--runs-dir", default="runs/reproduction", help="where the runs go (reused on a rerun)")
    p.add_argument(
        "--out", default="benchmarks/results/reproduction.md", help="report; .json and .png beside it"
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="OMP threads per run")
    p.add_argument(
        "--jobs", type=int, default=1, help="runs at a time (e.g. --jobs 2 --threads 1 on 2 cores)"
    )
    p.add_argument("--compare", action="append", default=[], metavar="LABEL=JSON",
                   help="add another report's MODULAR runs (e.g. other CRMA learning rates) as a variant")  # fmt: skip
    args = p.parse_args(ours)
    seeds = [int(s) for s in args.seeds.split(",")]
    conditions = [c.strip() for c in args.conditions.split(",")]
    unknown = sorted(set(conditions) - set(CONDITIONS))
    if unknown or not seeds:
        p.error(
            f"conditions must be among {CONDITIONS} (got {unknown}) and at least 1 seed given (2 for an SD)"
        )
    info = run_info(__file__, argv)
    runs_dir = Path(args.runs_dir).resolve()
    keys = [(c, s) for s in seeds for c in conditions]  # seed-major: the first seed's runs finish first
    done = run_all(
        lambda k: train(args.config, *k, runs_dir, extra, args.threads, args.adopt_legacy_runs),
        keys,
        args.jobs,
    )
    runs = {k: run for k, (run, _) in zip(keys, done, strict=True)}
    res = collect(runs, conditions, seeds, "test")
    # Where the settings (the CRMA learning rates: --compare) were chosen; test is reported.
    res["validation"] = {
        k: v for k, v in collect(runs, conditions, seeds, "validation").items() if k != "grad_norm"
    }
    if "modular" in conditions:
        res["ablation"] = ablation(runs, seeds, "test")
    for spec in args.compare:
        res.setdefault("variants", {}).update(compare_variant(spec, res))
    out = Path(args.out)
    first = runs[
        ("modular" if "modular" in conditions else conditions[0], seeds[0])
    ]  # shows every setting in use
    protocol = {
        "command": info["command"],
        "date": info["date"],
        "machine": f"{machine_line(info['machine'])}; {args.threads} thread(s) per run",
        "model": first.read_summary()["base_model"],
        "settings": protocol_settings(first, extra),
        "wall_s": {run_name(*k): w for k, (_, w) in zip(keys, done, strict=True)},
        # train.log gets Lightning's restore line whenever a run continued from a checkpoint
        "resumed": [
            run_name(*k)
            for k in keys
            if "Restored all states" in (runs[k].path.parent / "train.log").read_text(errors="replace")
        ],  # fmt: skip
        "figure": out.with_suffix(".png").name,
    }
    figure(res, out.with_suffix(".png"))
    md, js = write_report(
        out, markdown(res, protocol), {"protocol": protocol, "results": res}, run_commits(runs.values())
    )
    print(f"wrote {md}, {js}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
