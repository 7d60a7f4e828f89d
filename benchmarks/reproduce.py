"""Reproduce the paper's headline table (docs/method.md §3): NAIVE, FROZEN and MODULAR over several seeds.

Every (condition, seed) is one ``train.py fit`` of the same config, run as a subprocess (one
failure cannot poison the next, and a killed reproduction resumes: finished runs are reused and an
unfinished one continues from its last checkpoint). From the runs' own files it then computes

- loss-relative drift per condition, mean ± sample SD over seeds and per seed;
- the MODULAR-vs-FROZEN prior-task holdout advantage, per seed (paired by seed);
- per-task final holdout losses (mean over seeds);
- the inference ablation: each finished MODULAR run loaded as served (``serve.load_run``) and
  evaluated per task with CRMA on and off (``TrainedRun.holdout_loss``);
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

import argparse
import json
import shlex
import signal
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from harness import machine_line, run_info, stop_fits, train_fit, write_report

from crma_lightning import metrics as clm
from crma_lightning.atomic import atomic_write_json
from crma_lightning.report import heatmap, pyplot, save_figure
from crma_lightning.rundir import RunDir, init_args, versions
from crma_lightning.serve import load_run

CONDITIONS = ("naive", "frozen", "modular")
#: The paper's numbers (Mistral-7B, 5 domains, 500/100 examples, seeds 0/42/1234; docs/method.md §3).
PAPER = {
    "model": "Mistral-7B, Medical→Legal→Financial→Code→Science, 500 train / 100 holdout per domain",
    "drift": {"naive": (42.96, 5.5, [38.1, 41.7, 49.0]), "modular": (-0.17, 0.17, None)},
    "modular_vs_frozen": (1.99, 0.54, [1.46, 1.97, 2.54]),
    "spectral": "||M||_2 = 1.0 within float32 over 867 logged steps (max deviation 1.2e-7)",
    "ablation": "Gemma-2-9B: 98/100 with CRMA vs 38/100 with only the CRMA injection toggled off",
    "grad": "plain LoRA grad-norm spike ~263 vs ~3 with CRMA (Mistral-7B); peak grad norm reduced 39-84 %",
}


# -- running -----------------------------------------------------------------------------------
def run_name(condition: str, seed: int) -> str:
    return f"{condition}_s{seed}"


def finished_run(root: Path) -> RunDir | None:
    """The newest ``version_N`` under ``root`` that evaluated every task, if any."""
    return next((r for r in reversed(versions(root)) if r.is_complete()), None)


def train(
    config: str, condition: str, seed: int, runs_dir: Path, extra: list[str], threads: int
) -> tuple[RunDir, float]:
    """Run (or finish) one condition x seed; returns its run dir and its training wall time."""
    name = run_name(condition, seed)
    root = runs_dir / name
    timing = root / "wall.json"  # training wall time, summed over interrupted attempts
    spent = json.loads(timing.read_text())["wall_s"] if timing.is_file() else 0.0
    done = finished_run(root)
    if done is not None:
        print(f"[{name}] already finished: {done.path}", flush=True)
        return done, spent
    args = ["--config", config, "--config", f"configs/strategy/{condition}.yaml", "--data.seed", str(seed),
            "--trainer.logger.init_args.save_dir", str(runs_dir), "--trainer.logger.init_args.name", name, *extra]  # fmt: skip
    if any(r.has_checkpoint() for r in versions(root)):
        args += ["--ckpt_path", "last"]  # an interrupted reproduction continues where it stopped
    root.mkdir(parents=True, exist_ok=True)
    log = root / "train.log"
    print(f"[{name}] train.py fit {shlex.join(args)}  (log: {log})", flush=True)
    fit = train_fit(args, threads=threads, log=log)
    wall = spent + fit.wall_s
    atomic_write_json(timing, {"wall_s": wall})
    run = finished_run(root)
    if fit.rc != 0 or run is None:
        raise SystemExit(f"[{name}] train.py failed (exit {fit.rc}); end of {log}:\n{fit.tail}")
    print(f"[{name}] done in {wall:.0f} s: {run.path}", flush=True)
    return run, wall


def crma_ablation(run: RunDir) -> dict[str, list[float]]:
    """Holdout loss per task of a finished MODULAR run as served, with CRMA on and off (same weights).

    ``load_run`` rebuilds the run from its config and adapters (checked against the base model);
    task i is served with LoRA_i, as the run's last loss-matrix row was evaluated.
    """
    served = load_run(run.path)
    dm = served.info.datamodule()
    return {
        mode: [served.holdout_loss(t, crma=mode == "on", dm=dm) for t in served.tasks]
        for mode in ("on", "off")
    }


# -- aggregation -------------------------------------------------------------------------------
def collect(runs: dict[tuple[str, int], RunDir], conditions: list[str], seeds: list[int]) -> dict:
    loss = {key: run.read_matrix().values for key, run in runs.items()}
    first = runs[next(iter(runs))].read_matrix()
    tasks = first.tasks
    res: dict = {"tasks": tasks, "seeds": seeds, "conditions": conditions, "drift": {}, "final_loss": {},
                 "loss_matrix_mean": {}, "grad_norm": {}, "spectral": {}}  # fmt: skip
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


def ablation(runs: dict[tuple[str, int], RunDir], seeds: list[int]) -> dict:
    abl = {s: crma_ablation(runs[("modular", s)]) for s in seeds}
    last = {s: runs[("modular", s)].read_matrix().values[-1] for s in seeds}
    return {
        "per_seed": abl,
        "on_mean": np.mean([abl[s]["on"] for s in seeds], 0).tolist(),
        "off_mean": np.mean([abl[s]["off"] for s in seeds], 0).tolist(),
        "max_diff_vs_run": float(max(np.max(np.abs(np.asarray(abl[s]["on"]) - last[s])) for s in seeds)),
    }


def grad_per_task(res: dict, condition: str, stat: str, group: str = "total") -> list[float] | None:
    """``stat`` (``max`` or ``mean``) of one gradient-norm group per task, averaged over seeds; None if
    a run lacks it. ``group``: ``total`` (all trainable adapters), ``lora`` or ``crma``
    (``callbacks.gradnorm``). A run without CRMA has LoRA gradients only, so there its total is its
    LoRA norm (also in files written before the groups were recorded)."""
    per_seed = res["grad_norm"].get(condition, {})
    if not per_seed or any(v is None for v in per_seed.values()):
        return None

    def value(g: dict, task: str) -> float | None:
        entry = g[task]
        if group == "total" or (group == "lora" and condition != "modular" and "lora" not in entry):
            return entry[stat]
        return entry[group][stat] if group in entry else None

    values = [[value(g, t) for g in per_seed.values()] for t in res["tasks"]]
    if any(v is None for vs in values for v in vs):
        return None
    return [float(np.mean(vs)) for vs in values]


def clipped_per_task(res: dict, condition: str) -> list[float] | None:
    """Steps ZClip clipped per task (mean over seeds); None without ZClip."""
    per_seed = res["grad_norm"].get(condition, {})
    if not per_seed or any(v is None or any("clipped" not in e for e in v.values()) for v in per_seed.values()):
        return None
    return [float(np.mean([g[t]["clipped"] for g in per_seed.values()])) for t in res["tasks"]]


# -- report ------------------------------------------------------------------------------------
def figure(res: dict, path: Path) -> None:
    """Top: drift per condition and seed, peak gradient norm per task. Bottom: mean loss matrices."""
    plt = pyplot()
    conds, tasks = res["conditions"], res["tasks"]
    fig = plt.figure(figsize=(4.6 * len(conds) + 1.0, 8.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[1, 1.15])
    ax_drift, ax_grad = top.subplots(1, 2)
    for k, c in enumerate(conds):
        d = res["drift"][c]
        ax_drift.bar(k, d["mean"], color=f"C{k}", alpha=0.5, yerr=d["sd"] or 0, capsize=4)
        ax_drift.scatter([k] * len(d["per_seed"]), d["per_seed"], color=f"C{k}", zorder=3, s=18)
        peaks = grad_per_task(res, c, "max", "lora")
        if peaks is not None:
            ax_grad.plot(range(len(tasks)), peaks, marker="o", color=f"C{k}", label=f"{c.upper()}: LoRA")
        crma_peaks = grad_per_task(res, c, "max", "crma")
        if crma_peaks is not None:
            ax_grad.plot(range(len(tasks)), crma_peaks, marker="s", ls="--", color=f"C{k}", label=f"{c.upper()}: CRMA")
    ax_drift.axhline(0, color="black", lw=0.8)
    ax_drift.set_xticks(range(len(conds)), [c.upper() for c in conds])
    ax_drift.set_ylabel("drift, % (+ = forgetting)")
    ax_drift.set_title("loss-relative drift on prior tasks (bar: mean ± SD, dots: seeds)")
    ax_grad.set_xticks(range(len(tasks)), tasks)
    ax_grad.set_ylabel("peak gradient norm (mean over seeds)")
    ax_grad.set_title("peak gradient norm per task, by parameter group")
    if ax_grad.lines:
        ax_grad.legend()
    means = [np.asarray(res["loss_matrix_mean"][c]["matrix"]) for c in conds]
    limits = (min(m.min() for m in means), max(m.max() for m in means))  # one colour scale for every panel
    for ax, c, matrix in zip(np.atleast_1d(bottom.subplots(1, len(conds))), conds, means, strict=True):
        im = heatmap(ax, matrix, res["loss_matrix_mean"][c]["rows"], tasks, f"{c.upper()}: holdout loss (mean over seeds)",
                     "viridis_r", fmt="{:.3f}", limits=limits)  # fmt: skip
        bottom.colorbar(im, ax=ax, shrink=0.9)
    save_figure(fig, path)
    plt.close(fig)


def pm(mean: float | None, sd: float | None, digits: int = 2) -> str:
    """``+mean ± sd``, or n/a."""
    if mean is None:
        return "n/a"
    return f"{mean:+.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")


def seeds_str(values: list[float], fmt: str = "+.2f") -> str:
    return " / ".join(f"{v:{fmt}}" for v in values)


def row(name: str, values: list[float], last: str) -> str:
    return f"| {name} | " + " | ".join(f"{x:.4f}" for x in values) + f" | {last} |"


def head(first: str, tasks: list[str], last: str) -> list[str]:
    return [f"| {first} | " + " | ".join(tasks) + f" | {last} |", "|---|" + "---|" * (len(tasks) + 1)]


def markdown(res: dict, protocol: dict) -> str:
    conds, tasks, seeds = res["conditions"], res["tasks"], res["seeds"]
    cols = " / ".join(str(s) for s in seeds)
    lines = ["# Reproduction of the paper's headline table", "",
             f"Produced by `{protocol['command']}` on {protocol['date']} ({protocol['machine']}).",
             f"Ours: {protocol['model']}, tasks {' → '.join(tasks)}, seeds {', '.join(map(str, seeds))}. Paper: {PAPER['model']}.",
             "", "## Loss-relative drift on prior tasks (%, + = forgetting)", "",
             "drift = 100 · mean over prior tasks i of (L[T, i] − L[i, i]) / L[i, i]; mean ± sample SD over seeds.", "",
             f"| condition | ours: mean ± SD | ours: per seed ({cols}) | paper: mean ± SD | paper: per seed |",
             "|---|---|---|---|---|"]  # fmt: skip
    for c in conds:
        d, paper = res["drift"][c], PAPER["drift"].get(c)
        p_ms = "0 by construction" if c == "frozen" else pm(paper[0], paper[1]) if paper else "n/a"
        p_seed = seeds_str(paper[2], "+.1f") if paper and paper[2] else "—"
        lines.append(
            f"| {c.upper()} | {pm(d['mean'], d['sd'])} | {seeds_str(d['per_seed'])} | {p_ms} | {p_seed} |"
        )
    if "modular_vs_frozen" in res:
        a, (p_mean, p_sd, p_seeds) = res["modular_vs_frozen"], PAPER["modular_vs_frozen"]
        lines += ["", "## MODULAR vs FROZEN: prior-task holdout loss advantage (%, + = MODULAR better)", "",
                  "advantage = 100 · mean over prior tasks i of (L_F[T, i] − L_M[T, i]) / L_F[T, i], paired by seed.", "",
                  f"| | mean ± SD | per seed ({cols}) |", "|---|---|---|",
                  f"| ours | {pm(a['mean'], a['sd'])} | {seeds_str(a['per_seed'])} |",
                  f"| paper | {pm(p_mean, p_sd)} | {seeds_str(p_seeds)} |", "",
                  "Per prior task (mean over seeds): "
                  + ", ".join(f"{t} {v:+.2f} %" for t, v in zip(tasks, a["per_task_mean"], strict=False))]  # fmt: skip
    lines += [
        "",
        "## Final holdout loss per task (after the last task; mean over seeds)",
        "",
        *head("condition", tasks, "mean"),
    ]
    for c in conds:
        final = res["final_loss"][c]["mean"]
        lines.append(row(c.upper(), final, f"{np.mean(final):.4f}"))
    base = res["loss_matrix_mean"][conds[0]]["matrix"][0]
    lines.append(row("base model", base, f"{np.mean(base):.4f}"))
    if "ablation" in res:
        ab = res["ablation"]
        on, off = np.mean(ab["on_mean"]), np.mean(ab["off_mean"])
        lines += ["", "## Inference ablation: the trained MODULAR weights with CRMA on and off", "",
                  "Each MODULAR run loaded as served (`serve.load_run`), task i evaluated with LoRA_i on its holdout set;"
                  f" only the CRMA injection is toggled (mean over seeds). Paper: {PAPER['ablation']}.", "",
                  *head("CRMA", tasks, "mean"),
                  row("on", ab["on_mean"], f"{on:.4f}"), row("off", ab["off_mean"], f"{off:.4f}"), "",
                  f"Turning CRMA off changes the mean holdout loss by {100 * (off - on) / on:+.2f} %. Check: the served "
                  f"CRMA-on losses match the runs' last loss-matrix rows within {ab['max_diff_vs_run']:.1e}."]  # fmt: skip
    if any(grad_per_task(res, c, "max") is not None for c in conds):
        lines += grad_norm_section(res)
    if res.get("spectral"):
        sp = res["spectral"]
        lines += ["", "## Spectral bound", "",
                  f"Over every logged step of every MODULAR run: max σ_max(M) = {sp['max_sigma']:.7f}, max row/column-sum "
                  f"error {sp['max_row_col_err']:.1e}. Paper: {PAPER['spectral']}."]  # fmt: skip
    for label, v in res.get("variants", {}).items():
        lines += ["", f"## Also tried: MODULAR with {label}", "",
                  f"Same protocol and seeds, only `{' '.join(v['extra'])}` ({v['source']}); FROZEN is this report's.", "",
                  f"| | drift %: mean ± SD | per seed ({' / '.join(str(s) for s in v['seeds'])}) | vs FROZEN %: mean ± SD | per seed |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for name, d, a in (
            ("this report's MODULAR", v["base_drift"], v["base_adv"]),
            (label, v["drift"], v["adv"]),
        ):
            lines.append(
                f"| {name} | {pm(*clm.mean_sd(d))} | {seeds_str(d)} | {pm(*clm.mean_sd(a))} | {seeds_str(a)} |"
            )
    resumed = protocol.get("resumed", [])
    lines += ["", "## Protocol", "", *[f"- {k}: {v}" for k, v in protocol["settings"].items()],
              "- wall time per run (s): " + ", ".join(f"{k} {v:.0f}" + "*" * (k in resumed) for k, v in protocol["wall_s"].items())
              + (" (* resumed after an interruption: the time before it is not counted)" if resumed else ""),
              "", f"![drift, loss matrices and peak gradient norms]({protocol['figure']})", ""]  # fmt: skip
    return "\n".join(lines)


def grad_norm_section(res: dict) -> list[str]:
    """The gradient-norm tables: the LoRA norm across conditions, CRMA's norm apart, the total."""
    conds, tasks = res["conditions"], res["tasks"]

    def cells(c: str, group: str) -> str | None:
        peaks, means = grad_per_task(res, c, "max", group), grad_per_task(res, c, "mean", group)
        if peaks is None or means is None:
            return None
        body = " | ".join(f"{p:.3g} ({m:.3g})" for p, m in zip(peaks, means, strict=True))
        return f"| {c.upper()} | {body} | {max(peaks):.3g} |"

    lines = ["", "## Gradient norm per task: peak (mean) over the task's steps, mean over seeds", "",
             "Global norms before clipping, per parameter group (`train/grad_norm/lora`, `train/grad_norm/crma`; "
             "`callbacks/gradnorm.py`). The LoRA norm is the one comparable across conditions: under MODULAR the total "
             f"also holds CRMA's gradients. Paper: {PAPER['grad']}.", "",
             "LoRA gradients (NAIVE and FROZEN train nothing else):", "", *head("condition", tasks, "max over tasks")]  # fmt: skip
    lines += [r for c in conds if (r := cells(c, "lora"))]
    lora = {c: grad_per_task(res, c, "max", "lora") for c in conds}
    if lora.get("naive") and lora.get("modular"):
        red = 100 * (1 - np.asarray(lora["modular"]) / np.asarray(lora["naive"]))
        lines += ["", "LoRA peak reduction MODULAR vs NAIVE per task: " + ", ".join(f"{t} {r:+.0f} %" for t, r in zip(tasks, red, strict=True))
                  + f"; overall LoRA peak {max(lora['naive']):.3g} → {max(lora['modular']):.3g}."]  # fmt: skip
    crma = [r for c in conds if (r := cells(c, "crma"))]
    if crma:
        lines += ["", "CRMA gradients (MODULAR only):", "", *head("condition", tasks, "max over tasks"), *crma]
    total = [r for c in conds if (r := cells(c, "total"))]
    lines += ["", "All trainable adapters together (`train/grad_norm`, the norm a clip acts on):", "",
              *head("condition", tasks, "max over tasks"), *total]  # fmt: skip
    clipped = {c: clipped_per_task(res, c) for c in conds}
    if any(v is not None for v in clipped.values()):
        lines += ["", "Steps ZClip clipped per task (mean over seeds):", "", *head("condition", tasks, "all tasks")]
        lines += [f"| {c.upper()} | " + " | ".join(f"{v:.3g}" for v in clipped[c]) + f" | {sum(clipped[c]):.3g} |"
                  for c in conds if clipped[c] is not None]  # fmt: skip
    return lines


def protocol_settings(run: RunDir, extra: list[str]) -> dict:
    cfg = run.read_config()
    d, m, t = init_args(cfg["data"]), init_args(cfg["model"]), cfg["trainer"]
    lora, crma, sched = m["lora"], m["crma"], m["lr_schedule"]
    return {
        "tasks": ", ".join(
            f"{x['name']} ({x.get('source', 'synthetic')})" for x in map(init_args, d["tasks"])
        ),
        "examples per task": f"{d['train_size']} train / {d['holdout_size']} holdout blocks of {d['max_length']} tokens",
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
    return {label: {"source": Path(path).name, "extra": extra, "seeds": seeds,
                    "drift": [drift(theirs, s) for s in seeds], "adv": [adv(theirs, s) for s in seeds],
                    "base_drift": [drift(res, s) for s in seeds], "base_adv": [adv(res, s) for s in seeds]}}  # fmt: skip


def _interrupt(signum: int, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
        p.error(f"conditions must be among {CONDITIONS} (got {unknown}) and at least 1 seed given (2 for an SD)")
    info = run_info(__file__, argv)
    runs_dir = Path(args.runs_dir).resolve()
    keys = [(c, s) for s in seeds for c in conditions]  # seed-major: the first seed's runs finish first
    # SIGTERM (and SIGINT, which a shell's background job ignores) stop the runs in flight too.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    pool = ThreadPoolExecutor(max_workers=args.jobs)
    try:
        done = list(pool.map(lambda k: train(args.config, *k, runs_dir, extra, args.threads), keys))
    except BaseException:  # Ctrl-C, a failed run: stop the other runs too (each resumes on a rerun)
        pool.shutdown(wait=False, cancel_futures=True)
        stop_fits()
        raise
    pool.shutdown()
    runs = {k: run for k, (run, _) in zip(keys, done, strict=True)}
    res = collect(runs, conditions, seeds)
    if "modular" in conditions:
        res["ablation"] = ablation(runs, seeds)
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
    md, js = write_report(out, markdown(res, protocol), {"protocol": protocol, "results": res})
    print(f"wrote {md}, {js}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
