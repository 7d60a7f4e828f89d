"""The authors' training recipe against the current one: several ``reproduce.py`` reports side by side.

Each setting (ZClip, the PiSSA read projection, a 4-bit base) is one ``reproduce.py`` report
(``.json``) of the reproduction's protocol and seeds with one override file (``configs/recipe/*.yaml``);
the current recipe is the reproduction itself (``benchmarks/results/reproduction.json``). This reads
them and writes ``<out>.md``, ``<out>.json`` and ``<out>.png``: per setting and condition the
loss-relative drift, MODULAR vs FROZEN, the final mean loss, the gradient-norm peaks per parameter
group (the LoRA norm comparable across conditions, CRMA's apart), ZClip's clipped steps and the cost
of turning CRMA off at inference, each also as the paired difference to the current recipe on the
same seeds. The test split is reported; the validation split is beside it.

A setting that ran only MODULAR (the PiSSA read projection changes nothing else: NAIVE and FROZEN
have no CRMA) takes FROZEN from the current recipe's report for MODULAR vs FROZEN.

    python benchmarks/recipe.py --current benchmarks/results/reproduction.json \\
        --setting "ZClip=benchmarks/results/recipe_zclip.json" ... --out benchmarks/results/recipe.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from harness import run_info, write_report

from crma_lightning.evaluation import metrics as clm
from crma_lightning.evaluation.report import pyplot, save_figure

SPLITS = ("test", "validation")


def load(path: str) -> dict:
    return json.loads(Path(path).read_text())


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


def summarise(label: str, report: dict, current: dict) -> dict:
    """Per condition: per-seed values of every reported number, per split."""
    res, cur, protocol = report["results"], current["results"], report["protocol"]
    seeds = res["seeds"]
    extra = protocol["command"].partition(" -- ")[2]
    out: dict = {"label": label, "seeds": seeds, "conditions": {}, "command": protocol["command"], "model": protocol["model"],
                 "override": extra or "none", "wall_s": protocol["wall_s"], "resumed": protocol.get("resumed", []),
                 "settings": protocol["settings"]}  # fmt: skip
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
            row[split] = {"drift": [r["drift"][cond]["per_seed"][seeds.index(s)] for s in seeds],
                          "final_mean_loss": [float(final(r, cond, s).mean()) for s in seeds]}  # fmt: skip
            if cond == "modular":
                row[split]["vs_frozen"] = [vs_frozen(final(frozen_src, "frozen", s), final(r, "modular", s))
                                           if s in frozen_src["seeds"] else None for s in seeds]  # fmt: skip
        if cond == "modular":
            row["crma_off_pct"] = [crma_off_pct(res, s) for s in seeds]
            row["frozen_from"] = "this setting" if "frozen" in res["conditions"] else "the current recipe"
        out["conditions"][cond] = row
    return out


def fmt(values: list, digits: int = 2, sign: bool = True) -> str:
    """mean ± SD (per seed) of the non-missing values."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    mean, sd = clm.mean_sd(vals)
    f = f"{{:{'+' if sign else ''}.{digits}f}}"
    per = " / ".join(f.format(v) for v in vals)
    return (
        f.format(mean)
        + (f" ± {sd:.{digits}f}" if sd is not None else "")
        + (f" ({per})" if len(vals) > 1 else "")
    )


def paired(s: dict, cur: dict, cond: str, get, ratio: bool = False) -> list[float]:
    """``get(row)`` of ``s`` minus (or over) the current recipe's, seed by seed where both exist."""
    r, c = s["conditions"][cond], cur["conditions"].get(cond)
    if c is None:
        return []
    pairs = [
        (get(r)[s["seeds"].index(x)], get(c)[cur["seeds"].index(x)]) for x in s["seeds"] if x in cur["seeds"]
    ]
    return [a / b if ratio else a - b for a, b in pairs if a is not None and b is not None]


def run_commits(reports: list[tuple[str, dict]]) -> dict[str, list[str]]:
    """Commit -> ``label: run`` over the reports' runs (their ``code``; ``unknown`` for a report without)."""
    out: dict[str, list[str]] = {}
    for label, report in reports:
        for commit, runs in report.get("code", {}).get("run_commits", {"unknown": ["its runs"]}).items():
            out.setdefault(commit, []).extend(f"{label}: {run}" for run in runs)
    return out


def markdown(summaries: list[dict], info: dict) -> str:
    cur = summaries[0]
    lines = [f"# The authors' training recipe against the current one ({cur['model']})", "",
             f"Produced by `{info['command']}` on {info['date']} from the `reproduce.py` reports below. Every "
             "setting is the reproduction's protocol (benchmarks/results/reproduction.md) with one override file; "
             "the current recipe *is* the reproduction.", "", "## What ran", "",
             "The protocol (the current recipe's settings):", ""]  # fmt: skip
    lines += [f"- {k}: {v}" for k, v in cur["settings"].items()]
    lines += ["", "| setting | override | differs from the current recipe in | seeds | training wall time per run (s) |",
              "|---|---|---|---|---|"]  # fmt: skip
    for s in summaries:
        differs = [f"{k}: {v}" for k, v in s["settings"].items() if k != "extra train.py arguments"
                   and cur["settings"].get(k) != v]  # fmt: skip
        walls = ", ".join(f"{k} {v:.0f}" for k, v in s["wall_s"].items())
        lines.append(f"| {s['label']} | `{s['override']}` | {'; '.join(differs) or '—'} | "
                     f"{', '.join(map(str, s['seeds']))} | {walls} |")  # fmt: skip
    lines += ["", "Commands (from the repository root):", "", "```bash"]
    lines += [s["command"] for s in summaries] + ["```", ""]
    resumed = [f"{s['label']}: {', '.join(s['resumed'])}" for s in summaries if s["resumed"]]
    lines += [f"Runs that continued from a checkpoint: {'; '.join(resumed) if resumed else 'none'}.", ""]

    yard = cur["conditions"]
    sd = {k: clm.mean_sd(v)[1] for k, v in (("NAIVE drift", yard["naive"]["test"]["drift"]),
                                            ("MODULAR drift", yard["modular"]["test"]["drift"]),
                                            ("MODULAR vs FROZEN", yard["modular"]["test"]["vs_frozen"]))}  # fmt: skip
    lines += ["## Per setting (test split)", "",
              "drift: loss-relative drift on prior tasks (%, + = forgetting); MODULAR vs FROZEN: the prior-task "
              "test loss advantage (%, + = MODULAR better); peaks: the largest per-task peak of the pre-clip global "
              "gradient norm of the group over a run (the LoRA norm is comparable across conditions, CRMA's is "
              f"MODULAR's own); clipped: steps ZClip clipped, of a run's {cur['steps']}. Mean ± sample SD over seeds, per "
              "seed in brackets. No setting's hyperparameters were tuned: each override file ran as committed.", "",
              "The yardstick is the current recipe's seed-to-seed SD: " +
              ", ".join(f"{k} ±{v:.2f} pp" for k, v in sd.items() if v is not None) + ".", "",
              "| setting | condition | drift % | MODULAR vs FROZEN % | final mean loss | LoRA peak | CRMA peak | total peak | clipped steps |",
              "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summaries:
        for cond, r in s["conditions"].items():
            t = r["test"]
            lines.append(
                f"| {s['label']} | {cond.upper()} | {fmt(t['drift'])} | {fmt(t.get('vs_frozen', [None]))} | "
                f"{fmt(t['final_mean_loss'], 4, False)} | {fmt(r['lora_peak'], 3, False)} | "
                f"{fmt(r['crma_peak'], 3, False)} | {fmt(r['total_peak'], 3, False)} | {fmt(r['clipped'], 1, False)} |"
            )
    lines += ["", "## Against the current recipe, paired by seed (test split)", "",
              "Δ = setting − current recipe on the same seed; peak ratios = setting / current recipe.", "",
              "| setting | condition | Δ drift (pp) | Δ MODULAR vs FROZEN (pp) | Δ final mean loss | LoRA peak ratio | CRMA peak ratio |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summaries[1:]:
        for cond in s["conditions"]:
            if cond not in cur["conditions"]:
                continue
            vf = (
                fmt(paired(s, cur, cond, lambda x: x["test"]["vs_frozen"]), 3) if cond == "modular" else "n/a"
            )
            lines.append(
                f"| {s['label']} | {cond.upper()} | {fmt(paired(s, cur, cond, lambda x: x['test']['drift']), 3)} | {vf} | "
                f"{fmt(paired(s, cur, cond, lambda x: x['test']['final_mean_loss']), 4)} | "
                f"{fmt(paired(s, cur, cond, lambda x: x['lora_peak'], True), 2, False)} | "
                f"{fmt(paired(s, cur, cond, lambda x: x['crma_peak'], True), 2, False)} |"
            )
    lines += ["", "## Validation split", "",
              "Beside the test numbers: the split fit evaluates on, and where the current recipe's CRMA learning "
              "rates were chosen (reproduction.md). Nothing of the settings above was chosen on it.", "",
              "| setting | drift % NAIVE | drift % FROZEN | drift % MODULAR | MODULAR vs FROZEN % |", "|---|---|---|---|---|"]  # fmt: skip
    for s in summaries:
        c = s["conditions"]
        cells = [fmt(c[k]["validation"]["drift"]) if k in c else "—" for k in ("naive", "frozen", "modular")]
        vf = fmt(c["modular"]["validation"]["vs_frozen"]) if "modular" in c else "—"
        lines.append(f"| {s['label']} | {' | '.join(cells)} | {vf} |")
    lines += ["", "## CRMA off at inference (MODULAR)", "",
              "Each MODULAR run served (`serve.load_run`) with its trained weights and the CRMA injection toggled "
              "off: the rise of the mean test loss over the tasks, % (+ = CRMA helps).", "",
              "| setting | mean test loss rise with CRMA off, % |", "|---|---|"]  # fmt: skip
    for s in summaries:
        if "modular" in s["conditions"]:
            lines.append(f"| {s['label']} | {fmt(s['conditions']['modular']['crma_off_pct'])} |")
    lines += ["", f"![drift, MODULAR vs FROZEN and gradient peaks per setting]({Path(info['figure']).name})"]
    return "\n".join(lines) + "\n"


def figure(summaries: list[dict], path: Path) -> None:
    """Per setting: drift of NAIVE and MODULAR, MODULAR vs FROZEN, and the LoRA / CRMA gradient peaks (dots: seeds)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), layout="constrained")
    labels = [s["label"] for s in summaries]
    panels = [("drift on prior tasks, % (test)", [("naive", lambda r: r["test"]["drift"]),
                                                  ("modular", lambda r: r["test"]["drift"])]),
              ("MODULAR vs FROZEN, % (test; + = MODULAR better)", [("modular", lambda r: r["test"]["vs_frozen"])]),
              ("peak pre-clip gradient norm", [("naive", lambda r: r["lora_peak"]), ("frozen", lambda r: r["lora_peak"]),
                                                ("modular", lambda r: r["lora_peak"]), ("modular", lambda r: r["crma_peak"])])]  # fmt: skip
    names = [
        ["NAIVE", "MODULAR"],
        ["MODULAR"],
        ["NAIVE: LoRA", "FROZEN: LoRA", "MODULAR: LoRA", "MODULAR: CRMA"],
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


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--current", required=True, help="reproduce.py report (.json) of the current recipe")
    p.add_argument(
        "--setting", action="append", default=[], metavar="LABEL=JSON", help="another setting's report"
    )
    p.add_argument("--out", default="benchmarks/results/recipe.md")
    args = p.parse_args(argv)
    info = run_info(__file__, argv)
    info["figure"] = Path(args.out).with_suffix(".png")
    current = load(args.current)
    reports = [("current recipe", current)] + [(label, load(path)) for label, _, path in
                                               (spec.partition("=") for spec in args.setting)]  # fmt: skip
    summaries = [summarise(label, report, current) for label, report in reports]
    figure(summaries, info["figure"])
    md, js = write_report(args.out, markdown(summaries, info), {"command": info["command"], "date": info["date"],
                                                                "settings": summaries}, run_commits(reports))  # fmt: skip
    print(f"wrote {md}, {js}, {info['figure']}")


if __name__ == "__main__":
    main()
