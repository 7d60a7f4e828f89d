"""Every experiment's tables and figure, rendered from its record (``results/<name>.json``).

    python benchmarks/report.py benchmarks/results/reproduction.json [more.json ...] [--no-figures]

writes ``<name>.md`` (ending with the commits the record names) and ``<name>.png`` beside it. The record's
kind picks the renderer: a reproduction (``results.conditions``), the methods table (``results.grid``),
the standard CL benchmark (``results.base``) or the recipe comparison (``settings``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np
from harness import code_line, table

from crma_lightning.core.atomic import atomic_write_text
from crma_lightning.evaluation import metrics as clm
from crma_lightning.evaluation.report import heatmap, pyplot, save_figure

#: The methods: one preset each, configs/methods/<name>.yaml; reports name rows by these names.
METHODS = (
    *("naive", "frozen", "inc_lora", "replay", "ewc", "lwf", "olora", "modular"),
    *("modular_replay", "modular_ewc", "multitask"),
)
#: The knob a method's grid varies (methods.yaml's ``grid``).
KNOBS = {
    "replay": "ratio",
    "modular_replay": "ratio",
    "ewc": "weight",
    "modular_ewc": "weight",
    "lwf": "weight",
    "olora": "l1",
    "modular": "crma_lr",  # CRMA's read/write rate as a multiple of the LoRA rate (a reproduction's grid)
}
NO_TASK_ID = {"route": "routed", "sum": "all LoRAs summed", "shared": "the shared LoRA"}
#: The paper's numbers (Mistral-7B, 5 domains, 500/100 examples, seeds 0/42/1234; docs/method.md §3).
PAPER = {
    "model": "Mistral-7B, Medical→Legal→Financial→Code→Science, 500 train / 100 holdout per domain",
    "drift": {"naive": (42.96, 5.5, [38.1, 41.7, 49.0]), "modular": (-0.17, 0.17, None)},
    "modular_vs_frozen": (1.99, 0.54, [1.46, 1.97, 2.54]),
    "spectral": "||M||_2 = 1.0 within float32 over 867 logged steps (max deviation 1.2e-7)",
    "ablation": "Gemma-2-9B: 98/100 with CRMA vs 38/100 with only the CRMA injection toggled off",
    "grad": "plain LoRA grad-norm spike ~263 vs ~3 with CRMA (Mistral-7B); peak grad norm reduced 39-84 %",
}
#: Average accuracy after the last task, T5-large, dbpedia/amazon/yahoo/agnews in three orders
#: (O-LoRA, Wang et al. 2023, Table 1; ../shared/cl_benchmark/README.md).
PUBLISHED_T5_LARGE = {"naive": 43.7, "inc_lora": 66.4, "replay": 57.8, "olora": 75.8, "multitask": 80.0}


# -- cells shared by every report
def stat(vals: list) -> tuple[float | None, float | None]:
    """Mean and SD of the non-missing values (None, None without any)."""
    given = [v for v in vals if v is not None]
    return clm.mean_sd(given) if given else (None, None)


def cell(vals: list, f: str = "{:.4f}", sd_f: str | None = None, gap: str | None = None) -> str:
    """mean ± SD (per seed) of the non-missing values; a missing seed shows as ``gap``, or is left out."""
    mean, sd = stat(vals)
    if mean is None:
        return "n/a"
    shown = [gap if v is None else f.format(v) for v in vals if v is not None or gap is not None]
    per = f" ({' / '.join(shown)})" if len(shown) > 1 else ""
    return f.format(mean) + ("" if sd is None else " ± " + (sd_f or f).format(sd)) + per


def pm(mean: float | None, sd: float | None, digits: int = 2) -> str:
    """``+mean ± sd``, or n/a."""
    if mean is None:
        return "n/a"
    return f"{mean:+.{digits}f}" + ("" if sd is None else f" ± {sd:.{digits}f}")


def seeds_str(values: list[float], fmt: str = "+.2f") -> str:
    return " / ".join(f"{v:{fmt}}" for v in values)


def spread(d: dict) -> list[str]:
    """``+mean ± sd`` and the per-seed values of a ``{mean, sd, per_seed}`` entry."""
    return [pm(d["mean"], d["sd"]), seeds_str(d["per_seed"])]


def unnamed(columns: list[str], rows: list) -> list[str]:
    """A table whose first column has no heading."""
    head, *rest = table(["", *columns], rows)
    return ["| " + head[3:], *rest]


def seed_vals(per_seed: dict, key: str, split: str | None = None, scale: float = 1) -> list:
    """Each seed's ``key`` (in its ``split`` where given) times ``scale``; None where missing."""
    got = [p if split is None else p[split] for p in per_seed.values()]
    return [None if g is None or g[key] is None else scale * g[key] for g in got]


def losses(name: str, values: list[float]) -> list[str]:
    """A table row: ``name``, the losses and their mean."""
    return [name, *(f"{x:.4f}" for x in values), f"{np.mean(values):.4f}"]


def walls(wall_s: dict, marked: list | tuple = ()) -> str:
    """Each run's wall time in seconds, ``*`` after the ``marked`` runs."""
    return ", ".join(f"{k} {v:.0f}" + "*" * (k in marked) for k, v in wall_s.items())


def produced(protocol: dict, note: str = "") -> str:
    """The line naming the command, date, machine and the runs' wall time."""
    w = protocol["wall_s"]
    return (
        f"Produced by `{protocol['command']}` on {protocol['date']} ({protocol['machine']}): {len(w)} runs, "
        f"{sum(w.values()) / 60:.0f} min of run wall time in all ({note}finished runs are reused, so a "
        "report may gather runs of several invocations)."
    )


# -- gradient norms (callbacks/gradnorm.py): ``total`` (all trainable adapters), ``lora`` or ``crma``
def norm(entry: dict, cond: str, group: str, stat: str) -> float | None:
    """One task's ``stat`` (``max`` or ``mean``) of ``group``; None if not recorded. Without CRMA the
    total is the LoRA norm (also in records written before the groups were)."""
    if group == "total" or (group == "lora" and cond != "modular" and "lora" not in entry):
        return entry[stat]
    return entry[group][stat] if group in entry else None


def grad_per_task(res: dict, cond: str, stat: str, group: str = "total") -> list[float] | None:
    """``stat`` of ``group`` per task, averaged over seeds; None if a run lacks it."""
    per_seed = res["grad_norm"].get(cond, {})
    if not per_seed or any(v is None for v in per_seed.values()):
        return None
    values = [[norm(g[t], cond, group, stat) for g in per_seed.values()] for t in res["tasks"]]
    if any(v is None for vs in values for v in vs):
        return None
    return [float(np.mean(vs)) for vs in values]


def peak(res: dict, cond: str, seed: int, group: str) -> float | None:
    """Max over tasks of the per-task peak norm of ``group`` in one run (None if not recorded)."""
    g = res["grad_norm"].get(cond, {}).get(str(seed))
    vals = [norm(e, cond, group, "max") for e in g.values()] if g else [None]
    return None if any(v is None for v in vals) else max(vals)


def clipped_per_task(res: dict, cond: str) -> list[float] | None:
    """Steps ZClip clipped per task (mean over seeds); None without ZClip."""
    per_seed = res["grad_norm"].get(cond, {})
    if not per_seed or any(
        v is None or any("clipped" not in e for e in v.values()) for v in per_seed.values()
    ):
        return None
    return [float(np.mean([g[t]["clipped"] for g in per_seed.values()])) for t in res["tasks"]]


def clipped(res: dict, cond: str, seed: int) -> int | None:
    g = res["grad_norm"].get(cond, {}).get(str(seed))
    return sum(e["clipped"] for e in g.values()) if g and all("clipped" in e for e in g.values()) else None


# -- reproduction
def reproduction_figure(res: dict, protocol: dict, path: Path) -> None:
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
        for group, name, marker, ls in (("lora", "LoRA", "o", "-"), ("crma", "CRMA", "s", "--")):
            peaks = grad_per_task(res, c, "max", group)
            if peaks is not None:
                label = f"{c}: {name}"
                ax_grad.plot(range(len(tasks)), peaks, marker=marker, ls=ls, color=f"C{k}", label=label)
    ax_drift.axhline(0, color="black", lw=0.8)
    ax_drift.set_xticks(range(len(conds)), [c for c in conds])
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
        title = f"{c}: {res.get('split', 'validation')} loss (mean over seeds)"
        rows = res["loss_matrix_mean"][c]["rows"]
        im = heatmap(ax, matrix, rows, tasks, title, "viridis_r", fmt="{:.3f}", limits=limits)
        bottom.colorbar(im, ax=ax, shrink=0.9)
    save_figure(fig, path)
    plt.close(fig)


def reproduction_md(res: dict, protocol: dict) -> str:
    conds, tasks, seeds = res["conditions"], res["tasks"], res["seeds"]
    split = res.get("split", "validation")
    cols = " / ".join(str(s) for s in seeds)
    lines = [
        "# Reproduction of the paper's headline table",
        "",
        f"Produced by `{protocol['command']}` on {protocol['date']} ({protocol['machine']}).",
        f"Ours: {protocol['model']}, tasks {' → '.join(tasks)}, seeds {', '.join(map(str, seeds))}. Paper: "
        f"{PAPER['model']}.",
        "",
    ]
    if split == "test":
        picked = (
            "CRMA's learning rate (its own section below)"
            if res.get("grid")
            else "CRMA learning 10x slower than the LoRAs (configs/smollm2.yaml; the last section)"
        )
        lines += [
            "Every number is on the **test split** (`continual/test/`, scored after every task like the "
            "validation matrices), which no setting was chosen on. The one setting picked by comparing "
            f"runs, {picked}, was picked on the validation split; the validation numbers are in their own "
            "section.",
            "",
        ]
    lines += [
        "## Loss-relative drift on prior tasks (%, + = forgetting)",
        "",
        "drift = 100 · mean over prior tasks i of (L[T, i] − L[i, i]) / L[i, i]; mean ± sample SD over "
        "seeds.",
        "",
    ]
    rows = []
    for c in conds:
        paper = PAPER["drift"].get(c)
        p_ms = "0 by construction" if c == "frozen" else pm(paper[0], paper[1]) if paper else "n/a"
        rows.append(
            [c, *spread(res["drift"][c]), p_ms, seeds_str(paper[2], "+.1f") if paper and paper[2] else "—"]
        )
    lines += table(
        ["condition", "ours: mean ± SD", f"ours: per seed ({cols})", "paper: mean ± SD", "paper: per seed"],
        rows,
    )
    if "modular_vs_frozen" in res:
        a, (p_mean, p_sd, p_seeds) = res["modular_vs_frozen"], PAPER["modular_vs_frozen"]
        lines += [
            "",
            f"## MODULAR vs FROZEN: prior-task {split} loss advantage (%, + = MODULAR better)",
            "",
            "advantage = 100 · mean over prior tasks i of (L_F[T, i] − L_M[T, i]) / L_F[T, i], paired by "
            "seed.",
            "",
            *unnamed(
                ["mean ± SD", f"per seed ({cols})"],
                [["ours", *spread(a)], ["paper", pm(p_mean, p_sd), seeds_str(p_seeds)]],
            ),
            "",
            "Per prior task (mean over seeds): "
            + ", ".join(f"{t} {v:+.2f} %" for t, v in zip(tasks, a["per_task_mean"], strict=False)),
        ]
        if a.get("interval"):
            point, lo, hi = a["interval"]
            lines += [
                "",
                f"Paired 95 % interval: {point:+.2f} % [{lo:+.2f}, {hi:+.2f}] (percentile bootstrap over "
                f"seeds and, within each, over the {split} examples, the same for both; each task's loss "
                "pooled over its examples' tokens as in the matrices). "
                + ("It excludes 0." if lo > 0 or hi < 0 else "It includes 0: no difference is shown."),
            ]
    if "bwt" in res:
        lines += [
            "",
            f"## BWT on the {split} loss (+ = earlier tasks improved since trained)",
            "",
            "BWT = mean over prior tasks i of (L[i, i] − L[T, i]) (Lopez-Paz & Ranzato's, on the loss with "
            "the accuracy's sign).",
            "",
            *table(
                ["condition", "mean ± SD", f"per seed ({cols})"],
                [
                    [
                        c,
                        pm(res["bwt"][c]["mean"], res["bwt"][c]["sd"], 4),
                        seeds_str(res["bwt"][c]["per_seed"], "+.4f"),
                    ]
                    for c in conds
                ],
            ),
        ]
    base = res["loss_matrix_mean"][conds[0]]["matrix"][0]
    lines += [
        "",
        f"## Final {split} loss per task (after the last task; mean over seeds)",
        "",
        *table(
            ["condition", *tasks, "mean"],
            [*(losses(c, res["final_loss"][c]["mean"]) for c in conds), losses("base model", base)],
        ),
    ]
    if "ablation" in res:
        ab = res["ablation"]
        on, off = np.mean(ab["on_mean"]), np.mean(ab["off_mean"])
        lines += [
            "",
            "## Inference ablation: the trained MODULAR weights with CRMA on and off",
            "",
            "Each MODULAR run loaded as served (`serve.load_run`), task i evaluated with LoRA_i on its "
            f"{split} set; only the CRMA injection is toggled (mean over seeds). Paper: {PAPER['ablation']}.",
            "",
            *table(["CRMA", *tasks, "mean"], [losses("on", ab["on_mean"]), losses("off", ab["off_mean"])]),
            "",
            f"Turning CRMA off changes the mean {split} loss by {100 * (off - on) / on:+.2f} %. Check: the "
            "served CRMA-on losses match the runs' last loss-matrix rows within "
            f"{ab['max_diff_vs_run']:.1e}.",
        ]
    for g in res.get("grid", {}).values():
        lines += [
            "",
            f"## CRMA's learning rate, chosen on validation at seed {g['seed']}",
            "",
            "CRMA's read/write rate as a multiple of the LoRA rate (the mixing logits and the gate at 10x "
            "it); kept: the largest MODULAR-vs-FROZEN prior-task advantage on the validation split.",
            "",
            *table(
                ["rate x LoRA", "validation: MODULAR vs FROZEN %", "kept"],
                [
                    [f"{float(v):g}", f"{a:+.2f}", "yes" if float(v) == g["chosen"] else ""]
                    for v, a in g["validation_vs_frozen"].items()
                ],
            ),
        ]
    if "validation" in res:
        val = res["validation"]
        rows = [[f"drift %, {c}", *spread(val["drift"][c])] for c in val["conditions"]]
        if "modular_vs_frozen" in val:
            rows.append(["MODULAR vs FROZEN %", *spread(val["modular_vs_frozen"])])
        lines += ["", "## Validation split (where the settings were chosen)", ""]
        lines += unnamed(["mean ± SD", f"per seed ({cols})"], rows)
    if any(grad_per_task(res, c, "max") is not None for c in conds):
        lines += grad_norm_section(res)
    if res.get("spectral"):
        sp = res["spectral"]
        lines += [
            "",
            "## Spectral bound",
            "",
            f"Over every logged step of every MODULAR run: max σ_max(M) = {sp['max_sigma']:.7f}, max "
            f"row/column-sum error {sp['max_row_col_err']:.1e}. Paper: {PAPER['spectral']}.",
        ]
    for label, v in res.get("variants", {}).items():
        lines += [
            "",
            f"## Also tried: MODULAR with {label}",
            "",
            f"Same protocol and seeds, only `{' '.join(v['extra'])}` ({v['source']}); FROZEN is this "
            f"report's; on the {v.get('split', 'validation')} split.",
            "",
        ]
        per_seed = f"per seed ({' / '.join(str(s) for s in v['seeds'])})"
        rows = [
            [name, pm(*clm.mean_sd(d)), seeds_str(d), pm(*clm.mean_sd(a)), seeds_str(a)]
            for name, d, a in (
                ("this report's MODULAR", v["base_drift"], v["base_adv"]),
                (label, v["drift"], v["adv"]),
            )
        ]
        lines += unnamed(["drift %: mean ± SD", per_seed, "vs FROZEN %: mean ± SD", "per seed"], rows)
    resumed = protocol.get("resumed", [])
    lines += [
        "",
        "## Protocol",
        "",
        *[f"- {k}: {v}" for k, v in protocol["settings"].items()],
        f"- wall time per run (s): {walls(protocol['wall_s'], resumed)}"
        + (" (* resumed after an interruption: the time before it is not counted)" if resumed else ""),
        "",
        f"![drift, loss matrices and peak gradient norms]({protocol['figure']})",
        "",
    ]
    return "\n".join(lines)


def grad_norm_section(res: dict) -> list[str]:
    """The gradient-norm tables: the LoRA norm across conditions, CRMA's norm apart, the total."""
    conds, tasks = res["conditions"], res["tasks"]

    def group_rows(group: str) -> list[list[str]]:
        out = []
        for c in conds:
            peaks, means = grad_per_task(res, c, "max", group), grad_per_task(res, c, "mean", group)
            if peaks is not None and means is not None:
                out.append(
                    [
                        c,
                        *(f"{p:.3g} ({m:.3g})" for p, m in zip(peaks, means, strict=True)),
                        f"{max(peaks):.3g}",
                    ]
                )
        return out

    cols = ["condition", *tasks, "max over tasks"]
    lines = [
        "",
        "## Gradient norm per task: peak (mean) over the task's steps, mean over seeds",
        "",
        "Global norms before clipping, per parameter group (`train/grad_norm/lora`, `train/grad_norm/crma`; "
        "`callbacks/gradnorm.py`). The LoRA norm is the one comparable across conditions: under MODULAR the "
        f"total also holds CRMA's gradients. Paper: {PAPER['grad']}.",
        "",
        "LoRA gradients (NAIVE and FROZEN train nothing else):",
        "",
        *table(cols, group_rows("lora")),
    ]
    lora = {c: grad_per_task(res, c, "max", "lora") for c in conds}
    if lora.get("naive") and lora.get("modular"):
        red = 100 * (1 - np.asarray(lora["modular"]) / np.asarray(lora["naive"]))
        lines += [
            "",
            "LoRA peak reduction MODULAR vs NAIVE per task: "
            + ", ".join(f"{t} {r:+.0f} %" for t, r in zip(tasks, red, strict=True))
            + f"; overall LoRA peak {max(lora['naive']):.3g} → {max(lora['modular']):.3g}.",
        ]
    if crma := group_rows("crma"):
        lines += ["", "CRMA gradients (MODULAR only):", "", *table(cols, crma)]
    lines += ["", "All trainable adapters together (`train/grad_norm`, the norm a clip acts on):", ""]
    lines += table(cols, group_rows("total"))
    steps = {c: v for c in conds if (v := clipped_per_task(res, c)) is not None}
    if steps:
        lines += ["", "Steps ZClip clipped per task (mean over seeds):", ""]
        rows = [[c, *(f"{v:.3g}" for v in vs), f"{sum(vs):.3g}"] for c, vs in steps.items()]
        lines += table(["condition", *tasks, "all tasks"], rows)
    return lines


# -- per-method tables over seeds: the methods table and the standard CL benchmark
def task_rows(rows: dict[str, list], f: str, scale: float = 1) -> list[list[str]]:
    """Per method, its rows (one per seed) averaged: one value per task."""
    return [[m, *(f.format(scale * v) for v in np.mean(r, 0))] for m, r in rows.items()]


def bar_figure(path: Path, res: dict, model: str, panels: list, vals, figsize, decorate) -> None:
    """One panel per ``(key, title)``: each method's mean ± SD over seeds, task id given and not."""
    plt = pyplot()
    methods = list(res["methods"])
    x = np.arange(len(methods))
    fig, axes = plt.subplots(1, len(panels), figsize=figsize)
    for ax, (key, label) in zip(axes, panels, strict=True):
        for off, no_id, name in [(-0.2, False, "task id given"), (0.2, True, "no task id")]:
            st = [stat(vals(m, key, no_id)) for m in methods]
            means, sds = [np.nan if s[0] is None else s[0] for s in st], [s[1] or 0.0 for s in st]
            ax.bar(x + off, means, 0.4, yerr=sds, label=name, capsize=3)
        decorate(ax, key)
        ax.set_xticks(x, methods, rotation=30, ha="right")
        ax.set_title(label)
    seeds = ", ".join(map(str, res["seeds"]))
    fig.suptitle(f"{model}, {' → '.join(res['tasks'])}, test split, seeds {seeds}")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def methods_md(res: dict, protocol: dict) -> str:
    seeds = ", ".join(map(str, res["seeds"]))
    lines = [
        f"# Continual-learning methods on {len(res['tasks'])} tasks in sequence, "
        f"{protocol['settings']['model']}",
        "",
        produced(protocol),
        "",
        f"Tasks {' → '.join(res['tasks'])}, seeds {seeds}. Loss is the mean next-token loss on the **test** "
        "split, which no setting was chosen on; every number is mean ± sample SD over seeds (per seed in "
        "brackets). Drift: % change of each earlier task's loss from just after it was trained to the end "
        "(positive = forgetting). BWT and forgetting on the loss, with the accuracy's sign: negative BWT and "
        "positive forgetting = earlier tasks' losses went up (nats). Lower final loss is better.",
        "",
        "## Protocol",
        "",
        *[f"- {k}: {v}" for k, v in protocol["settings"].items()],
        f"- selection: for each method with a knob, every value of its grid at seed {res['select_seed']}; "
        "kept: the lowest final average **validation** loss with the task id; the other seeds ran only that "
        "value",
        "",
        "## Results (test split)",
        "",
    ]
    cols = ["method", "setting", "final avg loss (task id)", "drift % (task id)", "BWT", "forgetting"]
    cols += ["final avg loss (no task id)", "drift % (no task id)", "without the id", "routing acc"]
    rows = []
    for m, r in res["methods"].items():
        ps = r["per_seed"]
        first = next(iter(ps.values()))

        def c(split: str, key: str, f: str = "{:.4f}", ps: dict = ps) -> str:
            return cell(seed_vals(ps, key, split), f)

        routing = cell(seed_vals(ps, "routing_acc", scale=100), "{:.1f}") + " %"
        rows.append(
            [m, "preset" if r["value"] is None else f"{KNOBS[m]} = {r['value']:g}"]
            + [c("test", "final_avg_loss"), c("test", "drift_pct", "{:+.2f}"), c("test", "bwt", "{:+.4f}")]
            + [c("test", "forgetting"), c("test_no_task_id", "final_avg_loss")]
            + [
                c("test_no_task_id", "drift_pct", "{:+.2f}"),
                NO_TASK_ID.get(first["no_task_id"], first["no_task_id"] or "n/a"),
            ]
            + ["n/a" if first["routing_acc"] is None else routing]
        )
    lines += table(cols, rows)
    if "multitask" in res["methods"]:
        lines += [
            "",
            "Multi-task trains one LoRA on every task's data at once: its rows are evaluation points of one "
            "run over the pooled data, so its drift is the change between those points, not forgetting; its "
            "final loss is the reference the sequential methods are measured against.",
        ]
    finals = {m: [p["test"]["final_row"] for p in r["per_seed"].values()] for m, r in res["methods"].items()}
    lines += ["", "## Final test loss per task (mean over seeds, with the task id)", ""]
    lines += table(["method", *res["tasks"]], task_rows(finals, "{:.4f}"))
    lines += [
        "",
        f"## The selection (seed {res['select_seed']})",
        "",
        "Every grid value's final average loss and drift on validation (where the choice was made) and on "
        "test (reported only).",
        "",
    ]
    rows = [
        [m, f"{KNOBS[m]} = {float(v):g}", f"{p['validation']['final_avg_loss']:.4f}"]
        + [f"{p['validation']['drift_pct']:+.2f}", f"{p['test']['final_avg_loss']:.4f}"]
        + [f"{p['test']['drift_pct']:+.2f}", "yes" if float(v) == res["methods"][m]["value"] else ""]
        for m, grid in res["grid"].items()
        for v, p in grid.items()
    ]
    cols = ["method", "setting", "validation loss", "validation drift %", "test loss", "test drift %", "kept"]
    lines += table(cols, rows)
    rebuilt = [
        p["run"].split("/")[1]
        for r in res["methods"].values()
        for p in r["per_seed"].values()
        if p["rebuilt"]
    ]
    if rebuilt:
        lines += [
            "",
            "Runs reused from the reproduction (`--reuse`), their test matrices rebuilt from their adapters "
            f"by `train.py test --run <run> --task-id both`: {', '.join(rebuilt)}.",
        ]
    return "\n".join([*lines, "", f"Wall time per run (s): {walls(protocol['wall_s'])}", ""])


def methods_figure(res: dict, protocol: dict, path: Path) -> None:
    ps = {m: r["per_seed"] for m, r in res["methods"].items()}

    def decorate(ax, key: str) -> None:
        if key == "final_avg_loss":
            ax.set_ylim(
                0.97 * min(v for m in ps for v in seed_vals(ps[m], key, "test") if v is not None), None
            )
        ax.axhline(0, color="k", lw=0.8)
        ax.legend(fontsize=8)

    panels = [
        ("final_avg_loss", "final average test loss (lower is better)"),
        ("drift_pct", "drift of earlier tasks, % (lower is better)"),
    ]
    vals = lambda m, key, no_id: seed_vals(ps[m], key, "test_no_task_id" if no_id else "test")  # noqa: E731
    bar_figure(path, res, protocol["settings"]["model"], panels, vals, (14, 4.8), decorate)


def standard_cl_md(res: dict, protocol: dict) -> str:
    seeds, tasks, n_test = ", ".join(map(str, res["seeds"])), res["tasks"], protocol["test_size"]
    base_mean, base_sd = clm.mean_sd([100 * res["base"][s] for s in res["seeds"]])

    def acc(m: str, key: str, sign: bool = False) -> str:
        vals = seed_vals(res["methods"][m]["per_seed"], key, scale=100)
        return cell(vals, "{:+.1f}" if sign else "{:.1f}", "{:.1f}", "–")

    lines = [
        "# The standard CL benchmark (O-LoRA's text classification) with SmolLM2-135M",
        "",
        produced(protocol, "each run's own wall time below; "),
        "",
        f"Tasks {' → '.join(tasks)} (../shared/cl_benchmark: the O-LoRA repository's processed files, "
        f"subsampled), O-LoRA's prompt format, seeds {seeds}. Accuracy is exact match of the "
        "greedy-generated answer (trimmed, case-folded) on the **test** split, in %; average after the last "
        "task and BWT on it (mean ± sample SD over seeds, per seed in brackets). Every method runs the same "
        "protocol and its "
        "preset; a method's knob, where the experiment gives a grid, was chosen on the validation split at "
        f"the first seed ({chosen(res)}).",
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
        f"With {n_test} test examples per task, one example is {100 / n_test:.1f} points of a task's "
        f"accuracy and {100 / n_test / len(tasks):.1f} of the average: differences of a few points between "
        "methods are within one seed's noise.",
        "",
    ]
    cols = ["method", "avg acc (task id)", "BWT (task id)", "avg acc (no task id)", "BWT (no task id)"]
    cols += ["without the id", "routing acc", "T5-large, published", "eval share of the run"]
    rows = []
    for m, r in res["methods"].items():
        ps = r["per_seed"]
        first, pub = ps[res["seeds"][0]], PUBLISHED_T5_LARGE.get(m)
        how = first["no_task_id"]
        how = NO_TASK_ID.get(how, how or "n/a") + (
            f" ({first['router']} router)" if how == "route" and first.get("router") else ""
        )
        share = np.mean([p["evaluation_s"] / p["wall_s"] for p in ps.values()])
        wall = np.mean([p["wall_s"] for p in ps.values()])
        rows.append(
            [m, acc(m, "avg_acc"), acc(m, "bwt", True), acc(m, "avg_acc_no_task_id")]
            + [acc(m, "bwt_no_task_id", True), how, acc(m, "routing_acc")]
            + ["n/a" if pub is None else f"{pub:.1f}", f"{share * 100:.0f} % of {wall / 60:.1f} min"]
        )
    lines += [*table(cols, rows), *paired_section(res), *general_section(res)]
    lines += [
        "",
        "The published column is **another model on another sequence**: T5-large (770M, encoder-decoder), "
        "dbpedia/amazon/yahoo/agnews averaged over three orders, full training sets (O-LoRA, Wang et al. "
        "2023). It shows the ordering of methods in that paper, not a number ours should match.",
        "",
        "## Final test accuracy per task (mean over seeds, with the task id)",
        "",
    ]
    finals = {m: [p["final_row"] for p in r["per_seed"].values()] for m, r in res["methods"].items()}
    finals["zero-shot base"] = [
        p["base_row"] for p in next(iter(res["methods"].values()))["per_seed"].values()
    ]
    lines += table(["method", *tasks], task_rows(finals, "{:.1f}", 100))
    blind = {
        m: [p.get("final_row_no_task_id") for p in r["per_seed"].values()] for m, r in res["methods"].items()
    }
    blind = {m: rows for m, rows in blind.items() if all(v is not None for v in rows)}
    if blind:
        lines += ["", "Without the task id:", "", *table(["method", *tasks], task_rows(blind, "{:.1f}", 100))]
    rebuilt = [
        f"{m}_s{s}" for m, r in res["methods"].items() for s, p in r["per_seed"].items() if p.get("rebuilt")
    ]
    if rebuilt:
        lines += [
            "",
            f"Test matrices rebuilt from the runs' adapters by `train.py test --run <run> --task-id both` "
            "(what a fit writes, to 2e-5: tests/test_evaluation_tasks.py), after the fit: "
            f"{', '.join(rebuilt)}. Their evaluation share is the fit's own.",
        ]
    lines += [
        "",
        "## Validation split (where settings would be chosen)",
        "",
        f"Average accuracy after the last task with the task id, on {protocol['validation_size']} validation "
        "examples per task (the matrices of `fit`).",
        "",
        *table(
            ["method", "validation", "test"],
            [[m, acc(m, "val_avg_acc"), acc(m, "avg_acc")] for m in res["methods"]],
        ),
    ]
    return "\n".join([*lines, "", f"Wall time per run (s): {walls(protocol['wall_s'])}", ""])


def standard_cl_figure(res: dict, protocol: dict, path: Path) -> None:
    def decorate(ax, key: str) -> None:
        if key == "avg_acc":
            base = 100 * np.mean(list(res["base"].values()))
            ax.axhline(base, color="k", ls="--", lw=1, label="zero-shot base")
        ax.legend(fontsize=8, loc="upper left")

    panels = [("avg_acc", "average accuracy after the last task (%)"), ("bwt", "BWT (pp)")]
    vals = lambda m, key, no_id: seed_vals(  # noqa: E731
        res["methods"][m]["per_seed"], key + ("_no_task_id" if no_id else ""), scale=100
    )
    bar_figure(path, res, "SmolLM2-135M", panels, vals, (13, 4.5), decorate)


def chosen(res: dict) -> str:
    kept = [
        f"{m}: {KNOBS[m]} = {r['value']:g}" for m, r in res["methods"].items() if r.get("value") is not None
    ]
    return "; ".join(kept) or "no grid"


def paired_section(res: dict) -> list[str]:
    """Every method against FROZEN and against O-LoRA: the paired difference of the average test
    accuracy with its 95 % interval (:func:`paired_interval`), with and without the task id."""
    rows = []
    for ref in [r for r in ("frozen", "olora") if r in res["methods"]]:
        for m, r in res["methods"].items():
            if m == ref:
                continue
            cells = []
            for key in ("task_id", "no_task_id"):
                got = paired_interval(r["per_seed"], res["methods"][ref]["per_seed"], res["seeds"], key)
                apart = got is not None and (got[1] > 0 or got[2] < 0)
                cells.append("n/a" if got is None else f"{got[0]:+.1f} [{got[1]:+.1f}, {got[2]:+.1f}]")
                cells.append("yes" if apart else "no" if got is not None else "n/a")
            rows.append([m, ref, *cells])
    if all(c == "n/a" for r in rows for c in r[2:]):  # runs without per-example scores
        return []
    return [
        "",
        "## Paired differences (test split, points of average accuracy)",
        "",
        "Method minus reference, mean over seeds, with a 95 % bootstrap interval over seeds and, within each "
        "seed, over test examples (the same examples for both methods; 2000 resamples). 'Apart': the "
        "interval excludes 0.",
        "",
        *table(["method", "against", "with the task id", "apart", "without the task id", "apart"], rows),
    ]


def general_section(res: dict) -> list[str]:
    """The eval-only tasks (``data.eval_tasks``): how each method moved them from the base model, with
    the task id and without (``general_drift`` of the test summary; positive = worse)."""
    rows = []
    for m, r in res["methods"].items():
        gen = [p.get("general") for p in r["per_seed"].values()]
        if any(g is None for g in gen):
            continue
        for t in gen[0]["tasks"]:
            per = [g["tasks"][t] for g in gen]
            rows.append(
                [m, t, cell([x["loss_pct"] for x in per], "{:+.2f}", "{:.2f}")]
                + [cell([100 * x["metric_drop"] for x in per], "{:+.1f}", "{:.1f}")]
            )
    if not rows:
        return []
    return [
        "",
        "## Tasks never trained (`data.eval_tasks`): change from the base model after the last task",
        "",
        "With the task id (a per-task layout serves them with the base, plus CRMA under MODULAR); loss "
        "change in % of the base model's, metric drop in points; positive = worse.",
        "",
        *table(["method", "task", "loss change, %", "metric drop, points"], rows),
    ]


def paired_interval(
    a: dict, b: dict, seeds: list, key: str, resamples: int = 2000
) -> tuple[float, float, float] | None:
    """Method A's average test accuracy minus B's, in points (mean over seeds), with a 95 % percentile
    bootstrap interval over seeds and, within each seed, over test examples: the same examples for both
    methods (paired). ``a``/``b``: seed -> ``examples`` (``key``: task -> per-example scores). None
    without per-example scores."""
    try:
        diffs = [
            {
                t: np.asarray(a[s]["examples"][key][t], float) - np.asarray(b[s]["examples"][key][t], float)
                for t in a[s]["examples"][key]
            }
            for s in seeds
        ]
    except (KeyError, TypeError, ValueError):  # a run without per-example scores, or other examples
        return None
    rng = np.random.default_rng(0)
    point = 100 * np.mean([np.mean([d.mean() for d in per.values()]) for per in diffs])
    boots = np.empty(resamples)
    for i in range(resamples):
        picked = [diffs[j] for j in rng.integers(0, len(diffs), len(diffs))]
        boots[i] = np.mean(
            [np.mean([d[rng.integers(0, len(d), len(d))].mean() for d in per.values()]) for per in picked]
        )
    lo, hi = np.percentile(100 * boots, [2.5, 97.5])
    return float(point), float(lo), float(hi)


# -- recipe: settings compared with the current recipe, each summarised from its reproduction record
SPLITS = ("test", "validation")


def on_split(res: dict, split: str) -> dict:
    """A report's results on ``split``: test at the top level, validation nested (reproduce.py)."""
    return res if res["split"] == split else res["validation"]


def final(res: dict, cond: str, seed: int) -> np.ndarray:
    return np.asarray(res["final_loss"][cond]["per_seed"][res["seeds"].index(seed)])


def vs_frozen(f: np.ndarray, m: np.ndarray) -> float:
    """MODULAR-vs-FROZEN advantage from the final rows (docs/method.md §4; reproduce.compare_variant)."""
    return float(100 * np.mean((f[:-1] - m[:-1]) / f[:-1]))  # prior tasks only


def crma_off_pct(res: dict, seed: int) -> float | None:
    """How much the mean test loss rises when the trained MODULAR run is served with CRMA off (%)."""
    abl = res.get("ablation", {}).get("per_seed", {}).get(str(seed))
    return None if abl is None else float(100 * (np.mean(abl["off"]) / np.mean(abl["on"]) - 1))


def extra_of(protocol: dict) -> list[str]:
    """A record's ``fit_args`` (older records: what followed `` -- `` in their command)."""
    return protocol["extra"] if "extra" in protocol else shlex.split(protocol["command"].partition(" -- ")[2])


def summarise(label: str, report: dict, current: dict) -> dict:
    """Per condition: per-seed values of every reported number, per split."""
    res, cur, protocol = report["results"], current["results"], report["protocol"]
    seeds = res["seeds"]
    extra = shlex.join(extra_of(protocol))
    out: dict = {
        "label": label,
        "seeds": seeds,
        "conditions": {},
        "command": protocol["command"],
        "model": protocol["model"],
        "override": extra or "none",
        "wall_s": protocol["wall_s"],
        "resumed": protocol.get("resumed", []),
        "settings": protocol["settings"],
    }
    for cond in res["conditions"]:
        row: dict = {f"{g}_peak": [peak(res, cond, s, g) for s in seeds] for g in ("lora", "crma", "total")}
        row["clipped"] = [clipped(res, cond, s) for s in seeds]
        out["steps"] = sum(e["steps"] for e in res["grad_norm"][cond][str(seeds[0])].values())
        for split in SPLITS:
            r = on_split(res, split)
            frozen_src = r if "frozen" in res["conditions"] else on_split(cur, split)
            row[split] = {
                "drift": [r["drift"][cond]["per_seed"][seeds.index(s)] for s in seeds],
                "final_mean_loss": [float(final(r, cond, s).mean()) for s in seeds],
            }
            if cond == "modular":
                row[split]["vs_frozen"] = [
                    vs_frozen(final(frozen_src, "frozen", s), final(r, "modular", s))
                    if s in frozen_src["seeds"]
                    else None
                    for s in seeds
                ]
        if cond == "modular":
            row["crma_off_pct"] = [crma_off_pct(res, s) for s in seeds]
            row["frozen_from"] = "this setting" if "frozen" in res["conditions"] else "the current recipe"
        out["conditions"][cond] = row
    return out


def fmt(values: list, digits: int = 2, sign: bool = True) -> str:
    """mean ± SD (per seed) of the non-missing values."""
    return cell(values, f"{{:{'+' if sign else ''}.{digits}f}}", f"{{:.{digits}f}}")


def paired(s: dict, cur: dict, cond: str, get, ratio: bool = False) -> list[float]:
    """``get(row)`` of ``s`` minus (or over) the current recipe's, seed by seed where both exist."""
    r, c = s["conditions"][cond], cur["conditions"].get(cond)
    if c is None:
        return []
    pairs = [
        (get(r)[s["seeds"].index(x)], get(c)[cur["seeds"].index(x)]) for x in s["seeds"] if x in cur["seeds"]
    ]
    return [a / b if ratio else a - b for a, b in pairs if a is not None and b is not None]


def recipe_md(summaries: list[dict], info: dict) -> str:
    cur = summaries[0]
    lines = [
        f"# The authors' training recipe against the current one ({cur['model']})",
        "",
        f"Produced by `{info['command']}` on {info['date']} from the `reproduce.py` reports below. Every "
        "setting is the reproduction's protocol (benchmarks/results/reproduction.md) with one override file; "
        "the current recipe *is* the reproduction.",
        "",
        "## What ran",
        "",
        "The protocol (the current recipe's settings):",
        "",
        *[f"- {k}: {v}" for k, v in cur["settings"].items()],
        "",
    ]
    rows = []
    for s in summaries:
        differs = [
            f"{k}: {v}"
            for k, v in s["settings"].items()
            if k != "extra train.py arguments" and cur["settings"].get(k) != v
        ]
        rows.append(
            [s["label"], f"`{s['override']}`", "; ".join(differs) or "—", ", ".join(map(str, s["seeds"]))]
            + [walls(s["wall_s"])]
        )
    cols = ["setting", "override", "differs from the current recipe in", "seeds"]
    lines += table([*cols, "training wall time per run (s)"], rows)
    lines += ["", "Commands (from the repository root):", "", "```bash", *(s["command"] for s in summaries)]
    resumed = [f"{s['label']}: {', '.join(s['resumed'])}" for s in summaries if s["resumed"]]
    lines += ["```", "", f"Runs that continued from a checkpoint: {'; '.join(resumed) or 'none'}.", ""]
    yard = cur["conditions"]
    sd = {
        "NAIVE drift": clm.mean_sd(yard["naive"]["test"]["drift"])[1],
        "MODULAR drift": clm.mean_sd(yard["modular"]["test"]["drift"])[1],
        "MODULAR vs FROZEN": clm.mean_sd(yard["modular"]["test"]["vs_frozen"])[1],
    }
    lines += [
        "## Per setting (test split)",
        "",
        "drift: loss-relative drift on prior tasks (%, + = forgetting); MODULAR vs FROZEN: the prior-task "
        "test loss advantage (%, + = MODULAR better); peaks: the largest per-task peak of the pre-clip "
        "global gradient norm of the group over a run (the LoRA norm is comparable across conditions, CRMA's "
        f"is MODULAR's own); clipped: steps ZClip clipped, of a run's {cur['steps']}. Mean ± sample SD over "
        "seeds, per seed in brackets. No setting's hyperparameters were tuned: each override file ran as "
        "committed.",
        "",
        "The yardstick is the current recipe's seed-to-seed SD: "
        + ", ".join(f"{k} ±{v:.2f} pp" for k, v in sd.items() if v is not None)
        + ".",
        "",
    ]
    rows = [
        [s["label"], cond, fmt(r["test"]["drift"]), fmt(r["test"].get("vs_frozen", [None]))]
        + [fmt(r["test"]["final_mean_loss"], 4, False)]
        + [fmt(r[k], 3, False) for k in ("lora_peak", "crma_peak", "total_peak")]
        + [fmt(r["clipped"], 1, False)]
        for s in summaries
        for cond, r in s["conditions"].items()
    ]
    cols = ["setting", "condition", "drift %", "MODULAR vs FROZEN %", "final mean loss", "LoRA peak"]
    lines += table([*cols, "CRMA peak", "total peak", "clipped steps"], rows)
    lines += [
        "",
        "## Against the current recipe, paired by seed (test split)",
        "",
        "Δ = setting − current recipe on the same seed; peak ratios = setting / current recipe.",
        "",
    ]
    rows = []
    for s in summaries[1:]:
        for cond in [c for c in s["conditions"] if c in cur["conditions"]]:

            def diff(get, digits: int, ratio: bool = False, s: dict = s, cond: str = cond) -> str:
                return fmt(paired(s, cur, cond, get, ratio), digits, not ratio)

            rows.append(
                [s["label"], cond, diff(lambda x: x["test"]["drift"], 3)]
                + [diff(lambda x: x["test"]["vs_frozen"], 3) if cond == "modular" else "n/a"]
                + [diff(lambda x: x["test"]["final_mean_loss"], 4)]
                + [diff(lambda x: x["lora_peak"], 2, True), diff(lambda x: x["crma_peak"], 2, True)]
            )
    cols = ["setting", "condition", "Δ drift (pp)", "Δ MODULAR vs FROZEN (pp)", "Δ final mean loss"]
    lines += table([*cols, "LoRA peak ratio", "CRMA peak ratio"], rows)
    lines += [
        "",
        "## Validation split",
        "",
        "Beside the test numbers: the split fit evaluates on, and where the current recipe's CRMA learning "
        "rates were chosen (reproduction.md). Nothing of the settings above was chosen on it.",
        "",
    ]
    rows = []
    for s in summaries:
        c = s["conditions"]
        cells = [fmt(c[k]["validation"]["drift"]) if k in c else "—" for k in ("naive", "frozen", "modular")]
        rows.append(
            [s["label"], *cells, fmt(c["modular"]["validation"]["vs_frozen"]) if "modular" in c else "—"]
        )
    cols = ["setting", "drift % naive", "drift % frozen", "drift % modular", "modular vs frozen %"]
    lines += table(cols, rows)
    lines += [
        "",
        "## CRMA off at inference (MODULAR)",
        "",
        "Each MODULAR run served (`serve.load_run`) with its trained weights and the CRMA injection toggled "
        "off: the rise of the mean test loss over the tasks, % (+ = CRMA helps).",
        "",
    ]
    rows = [
        [s["label"], fmt(s["conditions"]["modular"]["crma_off_pct"])]
        for s in summaries
        if "modular" in s["conditions"]
    ]
    lines += table(["setting", "mean test loss rise with CRMA off, %"], rows)
    lines += ["", f"![drift, MODULAR vs FROZEN and gradient peaks per setting]({Path(info['figure']).name})"]
    return "\n".join(lines) + "\n"


def recipe_figure(summaries: list[dict], info: dict, path: Path) -> None:
    """Per setting: drift of naive and modular, modular vs frozen, and the LoRA / CRMA gradient peaks
    (dots: seeds)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    labels = [s["label"] for s in summaries]
    panels = [  # title, [(condition, legend, (key, subkey))]
        ("drift on prior tasks, % (test)", [(c, c, ("test", "drift")) for c in ("naive", "modular")]),
        ("MODULAR vs FROZEN, % (test; + = MODULAR better)", [("modular", "modular", ("test", "vs_frozen"))]),
        (
            "peak pre-clip gradient norm",
            [(c, f"{c}: LoRA", ("lora_peak",)) for c in ("naive", "frozen", "modular")]
            + [("modular", "modular: CRMA", ("crma_peak",))],
        ),
    ]
    for ax, (title, series) in zip(axes, panels, strict=True):
        width = 0.8 / len(series)
        for j, (cond, name, keys) in enumerate(series):
            for k, s in enumerate(summaries):
                if cond not in s["conditions"]:
                    continue
                got = s["conditions"][cond]
                for key in keys:
                    got = got[key]
                vals = [v for v in got if v is not None]
                x = k + (j - (len(series) - 1) / 2) * width
                ax.bar(x, np.mean(vals), width, color=f"C{j}", alpha=0.5, label=name if k == 0 else None)
                ax.scatter([x] * len(vals), vals, color=f"C{j}", s=14, zorder=3)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=15)
        ax.set_title(title)
        ax.legend(fontsize=8)
    save_figure(fig, path)
    plt.close(fig)


# -- rendering ---------------------------------------------------------------------------------
#: kind -> (markdown, figure), each taking the record's results and protocol
# -- growth: how forgetting and CRMA's gain grow with the steps per task
def growth_md(points: list[dict], record: dict) -> str:
    def cell_of(vals: list | None) -> str:
        return f"{pm(*stat(vals))} ({seeds_str(vals)})" if vals else "—"

    rows = [
        [p["label"], p["examples"], str(p["steps_per_task"]), ", ".join(map(str, p["seeds"]))]
        + [cell_of(p[k]) for k in ("naive_drift", "modular_drift", "modular_vs_frozen")]
        + [", ".join(f"{KNOBS.get(m, m)} {v:g}" for m, v in p["knobs"].items()) or "preset"]
        for p in points
    ]
    return "\n".join(
        [
            "# How forgetting and CRMA's gain grow with training",
            "",
            f"Produced by `{record['command']}` on {record['date']}. Each size is a reproduction record "
            "(its experiment file named below); every number on the **test split**, mean ± "
            "sample SD over seeds, each seed in brackets. Paper (Mistral-7B, 500 examples a domain): NAIVE "
            f"drift {pm(*PAPER['drift']['naive'][:2])} %, MODULAR vs FROZEN "
            f"{pm(*PAPER['modular_vs_frozen'][:2])} %.",
            "",
            *table(
                ["size", "examples per task", "steps per task", "seeds", "NAIVE drift %", "MODULAR drift %"]
                + ["MODULAR vs FROZEN %", "CRMA rate"],
                rows,
            ),
            "",
            "Experiments: "
            + "; ".join(
                f"{p['label']}: {p['experiment']}" + " (reference)" * bool(p.get("reference")) for p in points
            )
            + ". A reference size follows another protocol: it is drawn hollow and not joined to the others.",
            "",
            f"![drift and MODULAR vs FROZEN against steps per task]({Path(record['figure']).name})",
        ]
    )


def growth_figure(points: list[dict], record: dict, path: Path) -> None:
    """NAIVE's drift and MODULAR vs FROZEN against the steps per task: mean ± SD, seeds as dots, the
    sizes of one protocol joined; a reference size of another protocol hollow."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), layout="constrained")
    for ax, key, title in (
        (axes[0], "naive_drift", "NAIVE: loss-relative drift on prior tasks, % (+ = forgetting)"),
        (axes[1], "modular_vs_frozen", "MODULAR vs FROZEN on prior tasks, % (+ = MODULAR better)"),
    ):
        shown = [p for p in points if p[key]]
        for p in shown:
            mean, sd = stat(p[key])
            face = "white" if p.get("reference") else "C0"
            ax.errorbar(p["steps_per_task"], mean, yerr=sd or 0, fmt="o", color="C0", mfc=face, capsize=4)
            ax.scatter([p["steps_per_task"]] * len(p[key]), p[key], color="C1", s=12, zorder=3)
        joined = sorted((p["steps_per_task"], stat(p[key])[0]) for p in shown if not p.get("reference"))
        if len(joined) > 1:
            ax.plot(*zip(*joined, strict=True), color="C0", lw=1)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(sorted({p["steps_per_task"] for p in shown}))
        ax.set_xlabel("optimizer steps per task (hollow: a reference of another protocol)")
        ax.set_title(title, fontsize=10)
    save_figure(fig, path)
    plt.close(fig)


RENDERERS = {
    "reproduction": (reproduction_md, reproduction_figure),
    "methods": (methods_md, methods_figure),
    "standard_cl": (standard_cl_md, standard_cl_figure),
    "recipe": (recipe_md, recipe_figure),
    "growth": (growth_md, growth_figure),
}


def kind(record: dict) -> str:
    if "sizes" in record:
        return "growth"
    if "settings" in record and "results" not in record:
        return "recipe"
    res = record["results"]
    return "reproduction" if "conditions" in res else "methods" if "grid" in res else "standard_cl"


def render(path: str | Path, figures: bool = True) -> Path:
    """``<path>.md`` (and ``.png``) from the record at ``path``; returns the markdown's path."""
    path = Path(path)
    record = json.loads(path.read_text())
    k, png = kind(record), path.with_suffix(".png")
    if k in ("recipe", "growth"):
        res, protocol = record["settings" if k == "recipe" else "sizes"], {**record, "figure": png}
    else:
        res, protocol = record["results"], record["protocol"]
    if k == "standard_cl":  # JSON keys are strings; the seeds are ints
        res["base"] = {int(s): v for s, v in res["base"].items()}
        for m in res["methods"].values():
            m["per_seed"] = {int(s): v for s, v in m["per_seed"].items()}
    markdown, figure = RENDERERS[k]
    lines = markdown(res, protocol).rstrip("\n").split("\n")
    if record.get("experiment") and "benchmarks/run.py" not in protocol.get("command", ""):
        # made before the runner: how it is made now
        rerun = f"Made again by `python benchmarks/run.py {record['experiment']}` (its runs reused where "
        rerun += "finished)."
        lines[2:2] = [rerun, ""]
    if "code" in record:  # records from before reports named their commits have none
        lines += ["", code_line(record["code"])]
    md = path.with_suffix(".md")
    atomic_write_text(md, "\n".join(lines) + "\n")
    if figures:
        figure(res, protocol, png)
    return md


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("records", nargs="+", help="results/<name>.json files written by benchmarks/run.py")
    p.add_argument("--no-figures", action="store_true", help="only the markdown")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    for r in args.records:
        print(f"wrote {render(r, not args.no_figures)}")


if __name__ == "__main__":
    main()
