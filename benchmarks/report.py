"""Every table and figure of the experiments, rendered from their records (``results/<name>.json``).

    python benchmarks/report.py benchmarks/results/reproduction.json [more.json ...] [--no-figures]

A record is what ``benchmarks/run.py`` aggregated from its runs (``protocol``, ``results``, ``code``;
the recipe comparison: ``settings``). This writes ``<name>.md`` beside it (ending with the commit the
record was written at and the commits its runs were fitted at, from the record) and ``<name>.png``.
The record's kind decides the renderer: a reproduction (``results.conditions``), the methods table
(``results.grid``), the standard CL benchmark (``results.base``) or the recipe comparison (``settings``).
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


# -- reproduction
def grad_per_task(res: dict, condition: str, stat: str, group: str = "total") -> list[float] | None:
    """``stat`` (``max`` or ``mean``) of one gradient-norm group per task, averaged over seeds; None if
    a run lacks it. ``group``: ``total`` (all trainable adapters), ``lora`` or ``crma``
    (``crma_lightning.callbacks.gradnorm``). A run without CRMA has LoRA gradients only, so there its total
    is its
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
    if not per_seed or any(
        v is None or any("clipped" not in e for e in v.values()) for v in per_seed.values()
    ):
        return None
    return [float(np.mean([g[t]["clipped"] for g in per_seed.values()])) for t in res["tasks"]]


def reproduction_figure(res: dict, path: Path) -> None:
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
            ax_grad.plot(range(len(tasks)), peaks, marker="o", color=f"C{k}", label=f"{c}: LoRA")
        crma_peaks = grad_per_task(res, c, "max", "crma")
        if crma_peaks is not None:
            ax_grad.plot(
                range(len(tasks)), crma_peaks, marker="s", ls="--", color=f"C{k}", label=f"{c}: CRMA"
            )
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
        im = heatmap(
            ax,
            matrix,
            res["loss_matrix_mean"][c]["rows"],
            tasks,
            f"{c}: {res.get('split', 'validation')} loss (mean over seeds)",
            "viridis_r",
            fmt="{:.3f}",
            limits=limits,
        )
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
        lines += [
            "Every number is on the **test split** (`continual/test/`, scored after every task like the "
            "validation matrices), which no setting was chosen on. The one setting picked by comparing "
            "runs, CRMA "
            "learning 10x slower than the LoRAs (configs/smollm2.yaml; the last section), was picked on the "
            "validation split; the validation numbers are in their own section.",
            "",
        ]
    lines += [
        "## Loss-relative drift on prior tasks (%, + = forgetting)",
        "",
        "drift = 100 · mean over prior tasks i of (L[T, i] − L[i, i]) / L[i, i]; mean ± sample SD over "
        "seeds.",
        "",
        f"| condition | ours: mean ± SD | ours: per seed ({cols}) | paper: mean ± SD | paper: per seed |",
        "|---|---|---|---|---|",
    ]
    for c in conds:
        d, paper = res["drift"][c], PAPER["drift"].get(c)
        p_ms = "0 by construction" if c == "frozen" else pm(paper[0], paper[1]) if paper else "n/a"
        p_seed = seeds_str(paper[2], "+.1f") if paper and paper[2] else "—"
        lines.append(f"| {c} | {pm(d['mean'], d['sd'])} | {seeds_str(d['per_seed'])} | {p_ms} | {p_seed} |")
    if "modular_vs_frozen" in res:
        a, (p_mean, p_sd, p_seeds) = res["modular_vs_frozen"], PAPER["modular_vs_frozen"]
        lines += [
            "",
            f"## MODULAR vs FROZEN: prior-task {split} loss advantage (%, + = MODULAR better)",
            "",
            "advantage = 100 · mean over prior tasks i of (L_F[T, i] − L_M[T, i]) / L_F[T, i], paired by "
            "seed.",
            "",
            f"| | mean ± SD | per seed ({cols}) |",
            "|---|---|---|",
            f"| ours | {pm(a['mean'], a['sd'])} | {seeds_str(a['per_seed'])} |",
            f"| paper | {pm(p_mean, p_sd)} | {seeds_str(p_seeds)} |",
            "",
            "Per prior task (mean over seeds): "
            + ", ".join(f"{t} {v:+.2f} %" for t, v in zip(tasks, a["per_task_mean"], strict=False)),
        ]
    lines += [
        "",
        f"## Final {split} loss per task (after the last task; mean over seeds)",
        "",
        *head("condition", tasks, "mean"),
    ]
    for c in conds:
        final = res["final_loss"][c]["mean"]
        lines.append(row(c, final, f"{np.mean(final):.4f}"))
    base = res["loss_matrix_mean"][conds[0]]["matrix"][0]
    lines.append(row("base model", base, f"{np.mean(base):.4f}"))
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
            *head("CRMA", tasks, "mean"),
            row("on", ab["on_mean"], f"{on:.4f}"),
            row("off", ab["off_mean"], f"{off:.4f}"),
            "",
            f"Turning CRMA off changes the mean {split} loss by {100 * (off - on) / on:+.2f} %. Check: the "
            "served "
            f"CRMA-on losses match the runs' last loss-matrix rows within {ab['max_diff_vs_run']:.1e}.",
        ]
    if "validation" in res:
        lines += validation_section(res["validation"], cols)
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
            f"| | drift %: mean ± SD | per seed ({' / '.join(str(s) for s in v['seeds'])}) | vs FROZEN %: "
            "mean ± SD | per seed |",
            "|---|---|---|---|---|",
        ]
        for name, d, a in (
            ("this report's MODULAR", v["base_drift"], v["base_adv"]),
            (label, v["drift"], v["adv"]),
        ):
            lines.append(
                f"| {name} | {pm(*clm.mean_sd(d))} | {seeds_str(d)} | {pm(*clm.mean_sd(a))} | "
                f"{seeds_str(a)} |"
            )
    resumed = protocol.get("resumed", [])
    lines += [
        "",
        "## Protocol",
        "",
        *[f"- {k}: {v}" for k, v in protocol["settings"].items()],
        "- wall time per run (s): "
        + ", ".join(f"{k} {v:.0f}" + "*" * (k in resumed) for k, v in protocol["wall_s"].items())
        + (" (* resumed after an interruption: the time before it is not counted)" if resumed else ""),
        "",
        f"![drift, loss matrices and peak gradient norms]({protocol['figure']})",
        "",
    ]
    return "\n".join(lines)


def validation_section(val: dict, cols: str) -> list[str]:
    """Drift and the MODULAR-vs-FROZEN advantage on the validation split (where settings were chosen)."""
    lines = [
        "",
        "## Validation split (where the settings were chosen)",
        "",
        f"| | mean ± SD | per seed ({cols}) |",
        "|---|---|---|",
    ]
    for c in val["conditions"]:
        d = val["drift"][c]
        lines.append(f"| drift %, {c} | {pm(d['mean'], d['sd'])} | {seeds_str(d['per_seed'])} |")
    if "modular_vs_frozen" in val:
        a = val["modular_vs_frozen"]
        lines.append(f"| MODULAR vs FROZEN % | {pm(a['mean'], a['sd'])} | {seeds_str(a['per_seed'])} |")
    return lines


def grad_norm_section(res: dict) -> list[str]:
    """The gradient-norm tables: the LoRA norm across conditions, CRMA's norm apart, the total."""
    conds, tasks = res["conditions"], res["tasks"]

    def cells(c: str, group: str) -> str | None:
        peaks, means = grad_per_task(res, c, "max", group), grad_per_task(res, c, "mean", group)
        if peaks is None or means is None:
            return None
        body = " | ".join(f"{p:.3g} ({m:.3g})" for p, m in zip(peaks, means, strict=True))
        return f"| {c} | {body} | {max(peaks):.3g} |"

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
        *head("condition", tasks, "max over tasks"),
    ]
    lines += [r for c in conds if (r := cells(c, "lora"))]
    lora = {c: grad_per_task(res, c, "max", "lora") for c in conds}
    if lora.get("naive") and lora.get("modular"):
        red = 100 * (1 - np.asarray(lora["modular"]) / np.asarray(lora["naive"]))
        lines += [
            "",
            "LoRA peak reduction MODULAR vs NAIVE per task: "
            + ", ".join(f"{t} {r:+.0f} %" for t, r in zip(tasks, red, strict=True))
            + f"; overall LoRA peak {max(lora['naive']):.3g} → {max(lora['modular']):.3g}.",
        ]
    crma = [r for c in conds if (r := cells(c, "crma"))]
    if crma:
        lines += [
            "",
            "CRMA gradients (MODULAR only):",
            "",
            *head("condition", tasks, "max over tasks"),
            *crma,
        ]
    total = [r for c in conds if (r := cells(c, "total"))]
    lines += [
        "",
        "All trainable adapters together (`train/grad_norm`, the norm a clip acts on):",
        "",
        *head("condition", tasks, "max over tasks"),
        *total,
    ]
    clipped = {c: clipped_per_task(res, c) for c in conds}
    if any(v is not None for v in clipped.values()):
        lines += [
            "",
            "Steps ZClip clipped per task (mean over seeds):",
            "",
            *head("condition", tasks, "all tasks"),
        ]
        lines += [
            f"| {c} | " + " | ".join(f"{v:.3g}" for v in clipped[c]) + f" | {sum(clipped[c]):.3g} |"
            for c in conds
            if clipped[c] is not None
        ]
    return lines


# -- methods
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


def m_vals(per_seed: dict, split: str | None, key: str) -> list:
    """``key`` of each seed's ``split`` (of the seed's record itself without one; routing_acc in %)."""
    if split is None:
        return [None if p[key] is None else 100 * p[key] for p in per_seed.values()]
    return [None if p[split] is None else p[split][key] for p in per_seed.values()]


def m_cell(per_seed: dict, split: str, key: str, f: str = "{:.4f}") -> str:
    return cell(m_vals(per_seed, split, key), f)


def methods_md(res: dict, protocol: dict) -> str:
    seeds = ", ".join(map(str, res["seeds"]))
    lines = [
        f"# Continual-learning methods on {len(res['tasks'])} tasks in sequence, "
        f"{protocol['settings']['model']}",
        "",
        f"Produced by `{protocol['command']}` on {protocol['date']} ({protocol['machine']}): "
        f"{len(protocol['wall_s'])} runs, {sum(protocol['wall_s'].values()) / 60:.0f} min of run wall time "
        "in all (finished runs are reused, so a report may gather runs of several invocations).",
        "",
        f"Tasks {' → '.join(res['tasks'])}, seeds {seeds}. Loss is the mean next-token loss on the **test** "
        "split, which no setting was chosen on; every number is mean ± sample SD over seeds (per seed in "
        "brackets). "
        "Drift: % change of each earlier task's loss from just after it was trained to the end (positive = "
        "forgetting). BWT and forgetting on the loss, with the accuracy's sign: negative BWT and positive "
        "forgetting = earlier tasks' losses went up (nats). Lower final loss is better.",
        "",
        "## Protocol",
        "",
        *[f"- {k}: {v}" for k, v in protocol["settings"].items()],
        f"- selection: for each method with a knob, every value of its grid at seed {res['select_seed']}; "
        "kept: the "
        "lowest final average **validation** loss with the task id; the other seeds ran only that value",
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
        routing = "n/a" if first["routing_acc"] is None else m_cell(ps, None, "routing_acc", "{:.1f}") + " %"
        setting = "preset" if r["value"] is None else f"{KNOBS[m]} = {r['value']:g}"
        rows.append(
            [m, setting, m_cell(ps, "test", "final_avg_loss"), m_cell(ps, "test", "drift_pct", "{:+.2f}")]
            + [m_cell(ps, "test", "bwt", "{:+.4f}"), m_cell(ps, "test", "forgetting")]
            + [m_cell(ps, "test_no_task_id", "final_avg_loss")]
            + [m_cell(ps, "test_no_task_id", "drift_pct", "{:+.2f}")]
            + [NO_TASK_ID.get(first["no_task_id"], first["no_task_id"] or "n/a"), routing]
        )
    lines += table(cols, rows)
    if "multitask" in res["methods"]:
        lines += [
            "",
            "Multi-task trains one LoRA on every task's data at once: its rows are evaluation points of one "
            "run over the pooled data, so its drift is the change between those points, not forgetting; its "
            "final loss is the reference the sequential methods are measured against.",
        ]
    lines += [
        "",
        "## Final test loss per task (mean over seeds, with the task id)",
        "",
    ]
    final = {
        m: np.mean([p["test"]["final_row"] for p in r["per_seed"].values()], 0)
        for m, r in res["methods"].items()
    }
    lines += table(["method", *res["tasks"]], [[m, *(f"{v:.4f}" for v in row)] for m, row in final.items()])
    lines += [
        "",
        f"## The selection (seed {res['select_seed']})",
        "",
        "Every grid value's final average loss and drift on validation (where the choice was made) and on "
        "test (reported only).",
        "",
        "| method | setting | validation loss | validation drift % | test loss | test drift % | kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for m, grid in res["grid"].items():
        for v, p in grid.items():
            lines.append(
                f"| {m} | {KNOBS[m]} = {float(v):g} | {p['validation']['final_avg_loss']:.4f} | "
                f"{p['validation']['drift_pct']:+.2f} | {p['test']['final_avg_loss']:.4f} | "
                f"{p['test']['drift_pct']:+.2f} | {'yes' if float(v) == res['methods'][m]['value'] else ''} |"
            )
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
    lines += [
        "",
        "Wall time per run (s): " + ", ".join(f"{k} {v:.0f}" for k, v in protocol["wall_s"].items()),
        "",
    ]
    return "\n".join(lines)


def bar_figure(path: Path, methods: list, panels: list, vals, title: str, figsize, decorate) -> None:
    """One panel per ``(key, title)``: each method's mean ± SD over seeds, task id given and not."""
    from crma_lightning.evaluation.report import pyplot, save_figure

    plt = pyplot()
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
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def methods_figure(res: dict, path: Path, model: str) -> None:
    ps = {m: r["per_seed"] for m, r in res["methods"].items()}

    def decorate(ax, key: str) -> None:
        if key == "final_avg_loss":
            ax.set_ylim(0.97 * min(v for m in ps for v in m_vals(ps[m], "test", key) if v is not None), None)
        ax.axhline(0, color="k", lw=0.8)
        ax.legend(fontsize=8)

    panels = [
        ("final_avg_loss", "final average test loss (lower is better)"),
        ("drift_pct", "drift of earlier tasks, % (lower is better)"),
    ]
    vals = lambda m, key, no_id: m_vals(ps[m], "test_no_task_id" if no_id else "test", key)  # noqa: E731
    seeds = ", ".join(map(str, res["seeds"]))
    title = f"{model}, {' → '.join(res['tasks'])}, test split, seeds {seeds}"
    bar_figure(path, list(ps), panels, vals, title, (14, 4.8), decorate)


# -- standard CL
def s_vals(res: dict, method: str, key: str) -> list:
    return [
        None if v is None else 100 * v
        for v in (res["methods"][method]["per_seed"][s][key] for s in res["seeds"])
    ]


def s_cell(res: dict, method: str, key: str, sign: bool = False) -> str:
    return cell(s_vals(res, method, key), "{:+.1f}" if sign else "{:.1f}", "{:.1f}", "–")


def s_share(res: dict, method: str) -> str:
    ps = res["methods"][method]["per_seed"].values()
    share, wall = np.mean([p["evaluation_s"] / p["wall_s"] for p in ps]), np.mean([p["wall_s"] for p in ps])
    return f"{share * 100:.0f} % of {wall / 60:.1f} min"


def standard_cl_md(res: dict, protocol: dict) -> str:
    seeds = ", ".join(map(str, res["seeds"]))
    base_mean, base_sd = clm.mean_sd([100 * res["base"][s] for s in res["seeds"]])
    lines = [
        "# The standard CL benchmark (O-LoRA's text classification) with SmolLM2-135M",
        "",
        f"Produced by `{protocol['command']}` on {protocol['date']} ({protocol['machine']}): "
        f"{len(protocol['wall_s'])} runs, {sum(protocol['wall_s'].values()) / 60:.0f} min of run wall time "
        "in all "
        "(each run's own wall time below; finished runs are reused, so a report may gather runs of several "
        "invocations).",
        "",
        f"Tasks {' → '.join(res['tasks'])} (../shared/cl_benchmark: the O-LoRA repository's processed files, "
        f"subsampled), O-LoRA's prompt format, seeds {seeds}. Accuracy is exact match of the "
        "greedy-generated "
        "answer (trimmed, case-folded) on the **test** split, in %; average after the last task and BWT on "
        "it (mean ± sample SD over seeds, per seed in brackets). Every method runs the same protocol and its "
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
        f"With {protocol['test_size']} test examples per task, one example is "
        f"{100 / protocol['test_size']:.1f} points "
        f"of a task's accuracy and {100 / protocol['test_size'] / len(res['tasks']):.1f} of the average: "
        "differences of a few points between methods are within one seed's noise.",
        "",
        "| method | avg acc (task id) | BWT (task id) | avg acc (no task id) | BWT (no task id) | without "
        "the id | routing acc | T5-large, published | eval share of the run |",
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
            f"| {m} | {s_cell(res, m, 'avg_acc')} | {s_cell(res, m, 'bwt', True)} | "
            f"{s_cell(res, m, 'avg_acc_no_task_id')} | {s_cell(res, m, 'bwt_no_task_id', True)} | "
            f"{how} | {s_cell(res, m, 'routing_acc')} | "
            f"{'n/a' if pub is None else f'{pub:.1f}'} | {s_share(res, m)} |"
        )
    lines += paired_section(res)
    lines += general_section(res)
    lines += [
        "",
        "The published column is **another model on another sequence**: T5-large (770M, encoder-decoder), "
        "dbpedia/amazon/yahoo/agnews averaged over three orders, full training sets (O-LoRA, Wang et al. "
        "2023). It shows the ordering of methods in that paper, not a number ours should match.",
        "",
        "## Final test accuracy per task (mean over seeds, with the task id)",
        "",
        "| method | " + " | ".join(res["tasks"]) + " |",
        "|---|" + "---|" * len(res["tasks"]),
    ]
    for m, r in res["methods"].items():
        row = np.mean([r["per_seed"][s]["final_row"] for s in res["seeds"]], 0)
        lines.append(f"| {m} | " + " | ".join(f"{100 * v:.1f}" for v in row) + " |")
    base_row = np.mean(
        [res["methods"][next(iter(res["methods"]))]["per_seed"][s]["base_row"] for s in res["seeds"]], 0
    )
    lines.append("| zero-shot base | " + " | ".join(f"{100 * v:.1f}" for v in base_row) + " |")
    blind = {
        m: [p.get("final_row_no_task_id") for p in r["per_seed"].values()] for m, r in res["methods"].items()
    }
    if any(all(v is not None for v in rows) for rows in blind.values()):
        lines += ["", "Without the task id:", ""]
        lines += table(
            ["method", *res["tasks"]],
            [
                [m, *(f"{100 * v:.1f}" for v in np.mean(rows, 0))]
                for m, rows in blind.items()
                if all(v is not None for v in rows)
            ],
        )
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
        "| method | validation | test |",
        "|---|---|---|",
    ]
    for m in res["methods"]:
        lines.append(f"| {m} | {s_cell(res, m, 'val_avg_acc')} | {s_cell(res, m, 'avg_acc')} |")
    lines += [
        "",
        "Wall time per run (s): " + ", ".join(f"{k} {v:.0f}" for k, v in protocol["wall_s"].items()),
        "",
    ]
    return "\n".join(lines)


def chosen(res: dict) -> str:
    kept = [
        f"{m}: {KNOBS[m]} = {r['value']:g}" for m, r in res["methods"].items() if r.get("value") is not None
    ]
    return "; ".join(kept) or "no grid"


def paired_section(res: dict) -> list[str]:
    """Every method against FROZEN and against O-LoRA: the paired difference of the average test
    accuracy with its 95 % interval (:func:`paired_interval`), with and without the task id."""
    refs = [r for r in ("frozen", "olora") if r in res["methods"]]
    rows = []
    for ref in refs:
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


def standard_cl_figure(res: dict, path: Path) -> None:
    def decorate(ax, key: str) -> None:
        if key == "avg_acc":
            base = 100 * np.mean(list(res["base"].values()))
            ax.axhline(base, color="k", ls="--", lw=1, label="zero-shot base")
        ax.legend(fontsize=8, loc="upper left")

    panels = [("avg_acc", "average accuracy after the last task (%)"), ("bwt", "BWT (pp)")]
    vals = lambda m, key, no_id: s_vals(res, m, key + ("_no_task_id" if no_id else ""))  # noqa: E731
    seeds = ", ".join(map(str, res["seeds"]))
    title = f"SmolLM2-135M, {' → '.join(res['tasks'])}, test split, seeds {seeds}"
    bar_figure(path, list(res["methods"]), panels, vals, title, (13, 4.5), decorate)


# -- recipe
SPLITS = ("test", "validation")


def on_split(res: dict, split: str) -> dict:
    """A report's results on ``split``: test at the top level, validation nested (reproduce.py)."""
    return res if res["split"] == split else res["validation"]


def final(res: dict, cond: str, seed: int) -> np.ndarray:
    return np.asarray(res["final_loss"][cond]["per_seed"][res["seeds"].index(seed)])


def peak(res: dict, cond: str, seed: int, group: str) -> float | None:
    """Max over tasks of the per-task peak norm of ``group`` in one run (None if not recorded)."""
    g = res["grad_norm"].get(cond, {}).get(str(seed))
    if not g:
        return None
    if group == "lora" and cond != "modular":
        return max(e.get("lora", e)["max"] for e in g.values())  # no CRMA: the total is the LoRA norm
    if group == "total":
        return max(e["max"] for e in g.values())
    vals = [e[group]["max"] for e in g.values() if group in e]
    return max(vals) if len(vals) == len(g) else None


def clipped(res: dict, cond: str, seed: int) -> int | None:
    g = res["grad_norm"].get(cond, {}).get(str(seed))
    return sum(e["clipped"] for e in g.values()) if g and all("clipped" in e for e in g.values()) else None


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
        row: dict = {
            "lora_peak": [peak(res, cond, s, "lora") for s in seeds],
            "crma_peak": [peak(res, cond, s, "crma") for s in seeds],
            "total_peak": [peak(res, cond, s, "total") for s in seeds],
            "clipped": [clipped(res, cond, s) for s in seeds],
        }
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
    ]
    lines += [f"- {k}: {v}" for k, v in cur["settings"].items()]
    lines += [
        "",
        "| setting | override | differs from the current recipe in | seeds | training wall time per run (s) "
        "|",
        "|---|---|---|---|---|",
    ]
    for s in summaries:
        differs = [
            f"{k}: {v}"
            for k, v in s["settings"].items()
            if k != "extra train.py arguments" and cur["settings"].get(k) != v
        ]
        walls = ", ".join(f"{k} {v:.0f}" for k, v in s["wall_s"].items())
        lines.append(
            f"| {s['label']} | `{s['override']}` | {'; '.join(differs) or '—'} | "
            f"{', '.join(map(str, s['seeds']))} | {walls} |"
        )
    lines += ["", "Commands (from the repository root):", "", "```bash"]
    lines += [s["command"] for s in summaries] + ["```", ""]
    resumed = [f"{s['label']}: {', '.join(s['resumed'])}" for s in summaries if s["resumed"]]
    lines += [f"Runs that continued from a checkpoint: {'; '.join(resumed) if resumed else 'none'}.", ""]

    yard = cur["conditions"]
    sd = {
        k: clm.mean_sd(v)[1]
        for k, v in (
            ("NAIVE drift", yard["naive"]["test"]["drift"]),
            ("MODULAR drift", yard["modular"]["test"]["drift"]),
            ("MODULAR vs FROZEN", yard["modular"]["test"]["vs_frozen"]),
        )
    }
    lines += [
        "## Per setting (test split)",
        "",
        "drift: loss-relative drift on prior tasks (%, + = forgetting); MODULAR vs FROZEN: the prior-task "
        "test loss advantage (%, + = MODULAR better); peaks: the largest per-task peak of the pre-clip "
        "global "
        "gradient norm of the group over a run (the LoRA norm is comparable across conditions, CRMA's is "
        f"MODULAR's own); clipped: steps ZClip clipped, of a run's {cur['steps']}. Mean ± sample SD over "
        "seeds, per "
        "seed in brackets. No setting's hyperparameters were tuned: each override file ran as committed.",
        "",
        "The yardstick is the current recipe's seed-to-seed SD: "
        + ", ".join(f"{k} ±{v:.2f} pp" for k, v in sd.items() if v is not None)
        + ".",
        "",
        "| setting | condition | drift % | MODULAR vs FROZEN % | final mean loss | LoRA peak | CRMA peak | "
        "total peak | clipped steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        for cond, r in s["conditions"].items():
            t = r["test"]
            lines.append(
                f"| {s['label']} | {cond} | {fmt(t['drift'])} | {fmt(t.get('vs_frozen', [None]))} | "
                f"{fmt(t['final_mean_loss'], 4, False)} | {fmt(r['lora_peak'], 3, False)} | "
                f"{fmt(r['crma_peak'], 3, False)} | {fmt(r['total_peak'], 3, False)} | "
                f"{fmt(r['clipped'], 1, False)} |"
            )
    lines += [
        "",
        "## Against the current recipe, paired by seed (test split)",
        "",
        "Δ = setting − current recipe on the same seed; peak ratios = setting / current recipe.",
        "",
        "| setting | condition | Δ drift (pp) | Δ MODULAR vs FROZEN (pp) | Δ final mean loss | LoRA peak "
        "ratio | CRMA peak ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries[1:]:
        for cond in s["conditions"]:
            if cond not in cur["conditions"]:
                continue
            vf = (
                fmt(paired(s, cur, cond, lambda x: x["test"]["vs_frozen"]), 3) if cond == "modular" else "n/a"
            )
            lines.append(
                f"| {s['label']} | {cond} | {fmt(paired(s, cur, cond, lambda x: x['test']['drift']), 3)} | "
                f"{vf} | {fmt(paired(s, cur, cond, lambda x: x['test']['final_mean_loss']), 4)} | "
                f"{fmt(paired(s, cur, cond, lambda x: x['lora_peak'], True), 2, False)} | "
                f"{fmt(paired(s, cur, cond, lambda x: x['crma_peak'], True), 2, False)} |"
            )
    lines += [
        "",
        "## Validation split",
        "",
        "Beside the test numbers: the split fit evaluates on, and where the current recipe's CRMA learning "
        "rates were chosen (reproduction.md). Nothing of the settings above was chosen on it.",
        "",
        "| setting | drift % naive | drift % frozen | drift % modular | modular vs frozen % |",
        "|---|---|---|---|---|",
    ]
    for s in summaries:
        c = s["conditions"]
        cells = [fmt(c[k]["validation"]["drift"]) if k in c else "—" for k in ("naive", "frozen", "modular")]
        vf = fmt(c["modular"]["validation"]["vs_frozen"]) if "modular" in c else "—"
        lines.append(f"| {s['label']} | {' | '.join(cells)} | {vf} |")
    lines += [
        "",
        "## CRMA off at inference (MODULAR)",
        "",
        "Each MODULAR run served (`serve.load_run`) with its trained weights and the CRMA injection toggled "
        "off: the rise of the mean test loss over the tasks, % (+ = CRMA helps).",
        "",
        "| setting | mean test loss rise with CRMA off, % |",
        "|---|---|",
    ]
    for s in summaries:
        if "modular" in s["conditions"]:
            lines.append(f"| {s['label']} | {fmt(s['conditions']['modular']['crma_off_pct'])} |")
    lines += ["", f"![drift, MODULAR vs FROZEN and gradient peaks per setting]({Path(info['figure']).name})"]
    return "\n".join(lines) + "\n"


def recipe_figure(summaries: list[dict], path: Path) -> None:
    """Per setting: drift of naive and modular, modular vs frozen, and the LoRA / CRMA gradient peaks
    (dots: seeds)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    labels = [s["label"] for s in summaries]
    panels = [
        (
            "drift on prior tasks, % (test)",
            [("naive", lambda r: r["test"]["drift"]), ("modular", lambda r: r["test"]["drift"])],
        ),
        ("MODULAR vs FROZEN, % (test; + = MODULAR better)", [("modular", lambda r: r["test"]["vs_frozen"])]),
        (
            "peak pre-clip gradient norm",
            [
                ("naive", lambda r: r["lora_peak"]),
                ("frozen", lambda r: r["lora_peak"]),
                ("modular", lambda r: r["lora_peak"]),
                ("modular", lambda r: r["crma_peak"]),
            ],
        ),
    ]
    names = [
        ["naive", "modular"],
        ["modular"],
        ["naive: LoRA", "frozen: LoRA", "modular: LoRA", "modular: CRMA"],
    ]
    for ax, (title, series), legend in zip(axes, panels, names, strict=True):
        width = 0.8 / len(series)
        for j, ((cond, get), name) in enumerate(zip(series, legend, strict=True)):
            for k, s in enumerate(summaries):
                if cond not in s["conditions"]:
                    continue
                vals = [v for v in get(s["conditions"][cond]) if v is not None]
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
def kind(record: dict) -> str:
    if "settings" in record and "results" not in record:
        return "recipe"
    res = record["results"]
    return "reproduction" if "conditions" in res else "methods" if "grid" in res else "standard_cl"


def render(path: str | Path, figures: bool = True) -> Path:
    """``<path>.md`` (and ``.png``) from the record at ``path``; returns the markdown's path."""
    path = Path(path)
    record = json.loads(path.read_text())
    k, png = kind(record), path.with_suffix(".png")
    if k == "recipe":
        body = recipe_md(record["settings"], {**record, "figure": png})
        draw = lambda: recipe_figure(record["settings"], png)  # noqa: E731
    else:
        res, protocol = record["results"], record["protocol"]
        if k == "standard_cl":  # JSON keys are strings; the seeds are ints
            res["base"] = {int(s): v for s, v in res["base"].items()}
            for m in res["methods"].values():
                m["per_seed"] = {int(s): v for s, v in m["per_seed"].items()}
        body = {"reproduction": reproduction_md, "methods": methods_md, "standard_cl": standard_cl_md}[k](
            res, protocol
        )
        draw = {
            "reproduction": lambda: reproduction_figure(res, png),
            "methods": lambda: methods_figure(res, png, protocol["settings"]["model"]),
            "standard_cl": lambda: standard_cl_figure(res, png),
        }[k]
    lines = body.rstrip("\n").split("\n")
    command = record.get("protocol", record).get("command", "")
    if record.get("experiment") and "benchmarks/run.py" not in command:  # made before the runner: how now
        rerun = (
            f"Made again by `python benchmarks/run.py {record['experiment']}` "
            "(its runs reused where finished)."
        )
        lines[2:2] = [rerun, ""]
    if "code" in record:  # records from before reports named their commits have none
        lines += ["", code_line(record["code"])]
    md = path.with_suffix(".md")
    atomic_write_text(md, "\n".join(lines) + "\n")
    if figures:
        draw()
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
