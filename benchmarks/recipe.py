"""The authors' training recipe against the current one: several ``reproduce.py`` reports side by side.

Each setting (the current recipe, ZClip, the PiSSA read projection, a 4-bit base) is one
``reproduce.py`` report (``.json``) of the same protocol and seeds with one override file
(``configs/recipe/*.yaml``). This reads them and writes ``<out>.md`` and ``<out>.json``: per setting
and condition the loss-relative drift, MODULAR vs FROZEN, the final mean holdout loss, the
gradient-norm peaks per parameter group (the LoRA norm comparable across conditions, CRMA's apart)
and ZClip's clipped steps, each also as the difference to the current recipe on the same seeds.

A setting that ran only MODULAR (the PiSSA read projection changes nothing else: NAIVE and FROZEN
have no CRMA) takes FROZEN from the current recipe's report for MODULAR vs FROZEN.

    python benchmarks/recipe.py --current benchmarks/results/recipe_current.json \\
        --setting "ZClip=benchmarks/results/recipe_zclip.json" ... --out benchmarks/results/recipe.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from harness import run_info, write_report

from crma_lightning import metrics as clm

CONDITIONS = ("naive", "frozen", "modular")


def load(path: str) -> dict:
    return json.loads(Path(path).read_text())


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


def summarise(label: str, res: dict, current: dict, protocol: dict) -> dict:
    """Per condition: per-seed values of every reported number, and the same for the current recipe."""
    out: dict = {"label": label, "seeds": res["seeds"], "conditions": {}, "command": protocol["command"],
                 "wall_s": protocol["wall_s"], "settings": protocol["settings"]}  # fmt: skip
    for cond in res["conditions"]:
        seeds = res["seeds"]
        frozen_src = res if "frozen" in res["conditions"] else current
        row = {
            "drift": [res["drift"][cond]["per_seed"][res["seeds"].index(s)] for s in seeds],
            "final_mean_loss": [float(final(res, cond, s).mean()) for s in seeds],
            "lora_peak": [peak(res, cond, s, "lora") for s in seeds],
            "crma_peak": [peak(res, cond, s, "crma") for s in seeds],
            "total_peak": [peak(res, cond, s, "total") for s in seeds],
            "clipped": [clipped(res, cond, s) for s in seeds],
        }
        if cond == "modular":
            row["vs_frozen"] = [vs_frozen(final(frozen_src, "frozen", s), final(res, "modular", s))
                                if s in frozen_src["seeds"] else None for s in seeds]  # fmt: skip
            row["frozen_from"] = "this setting" if frozen_src is res else "the current recipe (FROZEN has no CRMA)"
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
    return f.format(mean) + (f" ± {sd:.{digits}f}" if sd is not None else "") + (f" ({per})" if len(vals) > 1 else "")


def markdown(summaries: list[dict], info: dict) -> str:
    lines = ["# The authors' training recipe against the current one (SmolLM2-135M)", "",
             f"Produced by `{info['command']}` on {info['date']} from the `reproduce.py` reports below; each "
             "setting is the reproduction protocol (benchmarks/results/reproduction.md) with one override file.", ""]  # fmt: skip
    cur = summaries[0]
    for s in summaries:
        lines += [f"- **{s['label']}**: `{s['command']}`; seeds {', '.join(map(str, s['seeds']))}; wall time per run (s): "
                  + ", ".join(f"{k} {v:.0f}" for k, v in s["wall_s"].items())]  # fmt: skip
    lines += ["", "Numbers are mean ± sample SD over the seeds that ran (per seed in brackets); Δ is the paired "
              "difference to the current recipe on the same seeds. Peaks are the largest per-task peak of the "
              "pre-clip global gradient norm of the group over a run. No hyperparameter was tuned: ZClip runs with "
              "the ZClip paper's defaults, PiSSA and NF4 have none.", ""]  # fmt: skip
    head = ["| setting | condition | drift % | MODULAR vs FROZEN % | final mean loss | LoRA peak | CRMA peak | total peak | clipped steps |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += ["## Per setting", "", *head]
    for s in summaries:
        for cond, r in s["conditions"].items():
            lines.append(
                f"| {s['label']} | {cond.upper()} | {fmt(r['drift'])} | {fmt(r.get('vs_frozen', [None]))} | "
                f"{fmt(r['final_mean_loss'], 4, False)} | {fmt(r['lora_peak'], 3, False)} | "
                f"{fmt(r['crma_peak'], 3, False)} | {fmt(r['total_peak'], 3, False)} | {fmt(r['clipped'], 1, False)} |"
            )
    lines += ["", "## Against the current recipe (paired by seed)", "",
              "| setting | condition | Δ drift (pp) | Δ MODULAR vs FROZEN (pp) | Δ final mean loss | LoRA peak ratio | CRMA peak ratio |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for s in summaries[1:]:
        common = [x for x in s["seeds"] if x in cur["seeds"]]
        for cond, r in s["conditions"].items():
            c = cur["conditions"].get(cond)
            if c is None or not common:
                continue

            def diff(key: str, ratio: bool = False, r=r, c=c, s=s, common=common) -> str:
                pairs = [(r[key][s["seeds"].index(x)], c[key][cur["seeds"].index(x)]) for x in common]
                pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
                if not pairs:
                    return "n/a"
                return fmt([a / b for a, b in pairs], 2, False) if ratio else fmt([a - b for a, b in pairs], 3)

            lines.append(
                f"| {s['label']} | {cond.upper()} | {diff('drift')} | "
                f"{diff('vs_frozen') if 'vs_frozen' in r else 'n/a'} | {diff('final_mean_loss')} | "
                f"{diff('lora_peak', True)} | {diff('crma_peak', True)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--current", required=True, help="reproduce.py report (.json) of the current recipe")
    p.add_argument("--setting", action="append", default=[], metavar="LABEL=JSON", help="another setting's report")
    p.add_argument("--out", default="benchmarks/results/recipe.md")
    args = p.parse_args(argv)
    info = run_info(__file__, argv)
    current = load(args.current)
    summaries = [summarise("current recipe", current["results"], current["results"], current["protocol"])]
    for spec in args.setting:
        label, _, path = spec.partition("=")
        other = load(path)
        summaries.append(summarise(label, other["results"], current["results"], other["protocol"]))
    md, js = write_report(args.out, markdown(summaries, info), {"command": info["command"], "date": info["date"],
                                                                "settings": summaries})  # fmt: skip
    print(f"wrote {md}, {js}")


if __name__ == "__main__":
    main()
