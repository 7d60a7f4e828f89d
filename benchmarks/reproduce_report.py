"""The report of ``benchmarks/reproduce.py``: the paper's numbers, the Markdown tables and the figure.

Reads only the aggregated results dictionary that ``reproduce.py`` builds from its runs (and writes
to ``<out>.json``), so a report can be redrawn from that file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crma_lightning.evaluation import metrics as clm
from crma_lightning.evaluation.report import heatmap, pyplot, save_figure

PAPER = {
    "model": "Mistral-7B, Medical→Legal→Financial→Code→Science, 500 train / 100 holdout per domain",
    "drift": {"naive": (42.96, 5.5, [38.1, 41.7, 49.0]), "modular": (-0.17, 0.17, None)},
    "modular_vs_frozen": (1.99, 0.54, [1.46, 1.97, 2.54]),
    "spectral": "||M||_2 = 1.0 within float32 over 867 logged steps (max deviation 1.2e-7)",
    "ablation": "Gemma-2-9B: 98/100 with CRMA vs 38/100 with only the CRMA injection toggled off",
    "grad": "plain LoRA grad-norm spike ~263 vs ~3 with CRMA (Mistral-7B); peak grad norm reduced 39-84 %",
}


def grad_per_task(res: dict, condition: str, stat: str, group: str = "total") -> list[float] | None:
    """``stat`` (``max`` or ``mean``) of one gradient-norm group per task, averaged over seeds; None if
    a run lacks it. ``group``: ``total`` (all trainable adapters), ``lora`` or ``crma``
    (``crma_lightning.callbacks.gradnorm``). A run without CRMA has LoRA gradients only, so there its total is its
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
        im = heatmap(ax, matrix, res["loss_matrix_mean"][c]["rows"], tasks, f"{c.upper()}: {res.get('split', 'validation')} loss (mean over seeds)",
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
    split = res.get("split", "validation")
    cols = " / ".join(str(s) for s in seeds)
    lines = ["# Reproduction of the paper's headline table", "",
             f"Produced by `{protocol['command']}` on {protocol['date']} ({protocol['machine']}).",
             f"Ours: {protocol['model']}, tasks {' → '.join(tasks)}, seeds {', '.join(map(str, seeds))}. Paper: {PAPER['model']}.",
             ""]  # fmt: skip
    if split == "test":
        lines += ["Every number is on the **test split** (`continual/test/`, scored after every task like the "
                  "validation matrices), which no setting was chosen on. The one setting picked by comparing runs, CRMA "
                  "learning 10x slower than the LoRAs (configs/smollm2.yaml; the last section), was picked on the "
                  "validation split; the validation numbers are in their own section.", ""]  # fmt: skip
    lines += ["## Loss-relative drift on prior tasks (%, + = forgetting)", "",
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
        lines += ["", f"## MODULAR vs FROZEN: prior-task {split} loss advantage (%, + = MODULAR better)", "",
                  "advantage = 100 · mean over prior tasks i of (L_F[T, i] − L_M[T, i]) / L_F[T, i], paired by seed.", "",
                  f"| | mean ± SD | per seed ({cols}) |", "|---|---|---|",
                  f"| ours | {pm(a['mean'], a['sd'])} | {seeds_str(a['per_seed'])} |",
                  f"| paper | {pm(p_mean, p_sd)} | {seeds_str(p_seeds)} |", "",
                  "Per prior task (mean over seeds): "
                  + ", ".join(f"{t} {v:+.2f} %" for t, v in zip(tasks, a["per_task_mean"], strict=False))]  # fmt: skip
    lines += [
        "",
        f"## Final {split} loss per task (after the last task; mean over seeds)",
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
                  f"Each MODULAR run loaded as served (`serve.load_run`), task i evaluated with LoRA_i on its {split} set;"
                  f" only the CRMA injection is toggled (mean over seeds). Paper: {PAPER['ablation']}.", "",
                  *head("CRMA", tasks, "mean"),
                  row("on", ab["on_mean"], f"{on:.4f}"), row("off", ab["off_mean"], f"{off:.4f}"), "",
                  f"Turning CRMA off changes the mean {split} loss by {100 * (off - on) / on:+.2f} %. Check: the served "
                  f"CRMA-on losses match the runs' last loss-matrix rows within {ab['max_diff_vs_run']:.1e}."]  # fmt: skip
    if "validation" in res:
        lines += validation_section(res["validation"], cols)
    if any(grad_per_task(res, c, "max") is not None for c in conds):
        lines += grad_norm_section(res)
    if res.get("spectral"):
        sp = res["spectral"]
        lines += ["", "## Spectral bound", "",
                  f"Over every logged step of every MODULAR run: max σ_max(M) = {sp['max_sigma']:.7f}, max row/column-sum "
                  f"error {sp['max_row_col_err']:.1e}. Paper: {PAPER['spectral']}."]  # fmt: skip
    for label, v in res.get("variants", {}).items():
        lines += ["", f"## Also tried: MODULAR with {label}", "",
                  f"Same protocol and seeds, only `{' '.join(v['extra'])}` ({v['source']}); FROZEN is this report's; "
                  f"on the {v.get('split', 'validation')} split.", "",
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


def validation_section(val: dict, cols: str) -> list[str]:
    """Drift and the MODULAR-vs-FROZEN advantage on the validation split (where settings were chosen)."""
    lines = ["", "## Validation split (where the settings were chosen)", "",
             f"| | mean ± SD | per seed ({cols}) |", "|---|---|---|"]  # fmt: skip
    for c in val["conditions"]:
        d = val["drift"][c]
        lines.append(f"| drift %, {c.upper()} | {pm(d['mean'], d['sd'])} | {seeds_str(d['per_seed'])} |")
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
