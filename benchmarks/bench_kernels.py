"""Benchmark: the CRMA kernels (issue 16, point 4), old formulation against new, forward + backward on CPU.

1. The block's write (docs/method.md §5, additive form) at (8, 128, 576) (SmolLM2 width) and (16, 32, 64),
   n = 4, M given: ``old`` (s = R h, M s - s, W, * g, + h: the forward before this change),
   ``fused`` (g W (M - I) folded into W', one ``addmm``; the default, custom backward),
   ``fused_autograd`` (the same ``addmm`` differentiated by autograd), ``compiled``
   (``CRMABlock(compiled=True)``: torch.compile of the write).
2. The projection at L = 30 and L = 2 layers, n = 4, K = 20, batched: ``old`` (x - logsumexp(x)
   unrolled under autograd, the code before), ``autograd`` (the log_softmax iterations unrolled),
   ``custom`` (the default: ``_LogSinkhorn``), ``compiled`` (``project(compiled=True)``), and
   ``birkhoff`` (``(L, 24)`` logits over the 24 permutations, no iterations).
3. The bound: sigma_max, row/column errors and the rescale of Sinkhorn (K = 20) and Birkhoff on
   random logits, and the largest differences between old and new formulations.

Variants run interleaved in rounds (harness.py), each round in a rotated order; medians over rounds,
and the median of the per-round ratios against ``old`` with its bootstrap 95 % interval.
Both CPU time of this process and wall time are recorded: on a shared machine the wall clock also
counts the time a neighbour held the core, the CPU clock does not. Threads default to 1: there one
busy neighbour stalls every parallel region (a 19200-element ``exp`` took 6 ms with 2 threads, 4 us
with 1), and with one thread the process's CPU time is the kernels' own.

Run:  .venv/bin/python benchmarks/bench_kernels.py [--quick] [--no-compile] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import Timing, interleave, machine_line, paired_ratio, run_info, time_call, write_report
from torch import Tensor

from crma_lightning.adapters.config import CRMAConfig
from crma_lightning.adapters.crma import CRMABlock, low_rank_residual
from crma_lightning.adapters.projection import (
    autocast_off,
    birkhoff,
    certify,
    project,
    project_with_diagnostics,
    sinkhorn,
)

BLOCK_SHAPES = [(8, 128, 576), (16, 32, 64)]
LAYERS = [30, 2]
N, ITERS = 4, 20


def old_block_forward(block: CRMABlock, h: Tensor) -> Tensor:
    """The additive block's forward before the fused write (crma.py at 3f0eef8)."""
    m, g = block.mixing_matrix(), block.gate_value()
    s = F.linear(h, block.read.to(h.dtype))  # (..., n)
    mixed = s @ m.to(s.dtype).T - s
    delta = F.linear(mixed, block.write.to(h.dtype))  # (..., d)
    return h + g.to(h.dtype) * delta


def old_sinkhorn(logits: Tensor, iters: int = ITERS) -> Tensor:
    """The certified Sinkhorn before this change (projection.py at 3f0eef8), float32 logits."""
    x = logits
    for _ in range(iters):
        x = x - torch.logsumexp(x, dim=-1, keepdim=True)
        x = x - torch.logsumexp(x, dim=-2, keepdim=True)
    return certify(x.exp())[0]


def fused_autograd_forward(block: CRMABlock, h: Tensor) -> Tensor:
    """``CRMABlock.forward`` with autograd's backward of the write instead of the custom one."""
    read, write = block.factors()
    with autocast_off(h.device.type):
        return low_rank_residual(h, read.to(h.dtype), write.to(h.dtype), custom_backward=False)


def make_block(d: int, seed: int = 0) -> tuple[CRMABlock, Tensor]:
    """An additive block with every parameter moved off its init; M is a leaf given to the block."""
    block = CRMABlock(d, CRMAConfig(streams=N), torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.5)
    m = project(block.log_mix.detach(), "sinkhorn", N).requires_grad_(True)
    block.step_mix = m
    return block, m


def step(fn: Callable[[Tensor], Tensor], x: Tensor, grad: Tensor) -> Callable[[], None]:
    """One forward + backward of ``fn`` on ``x`` with upstream gradient ``grad``."""
    return lambda: fn(x).backward(grad)


def reps_for(step: Callable[[], None], target_s: float = 0.01) -> int:
    """Inner repetitions so one timing spans ~target_s (timer resolution and call jitter)."""
    return max(1, round(target_s / max(time_call(step).wall_s, 1e-6)))


def measure(steps: dict[str, Callable[[], None]], rounds: int, warmup: int) -> dict[str, dict[str, list]]:
    """Per-call microseconds, CPU and wall, of every variant: harness rounds (order rotated each round)."""
    reps = {k: reps_for(s) for k, s in steps.items()}

    def timed(k: str) -> Callable[[], Timing]:
        return lambda: time_call(lambda: [steps[k]() for _ in range(reps[k])])

    got = interleave({k: timed(k) for k in steps}, rounds, warmup=warmup)
    return {
        k: {"cpu": [t.cpu_s / reps[k] * 1e6 for t in ts], "wall": [t.wall_s / reps[k] * 1e6 for t in ts]}
        for k, ts in got.values.items()
    }


def summarise(section: str, times: dict[str, dict[str, list]], compile_s: float | None) -> list[dict]:
    rows = []
    for k, v in times.items():
        row = {"section": section, "variant": k, "compile_s": compile_s if k == "compiled" else None}
        for clock in ("cpu", "wall"):
            r = paired_ratio(v[clock], times["old"][clock])
            row[clock] = {"median_us": statistics.median(v[clock]), "ratio_vs_old": r.median, "ci95": list(r.ci95)}
        rows.append(row)
    return rows


def first_call_s(step: Callable[[], None]) -> float:
    t = time.perf_counter()
    step()
    return time.perf_counter() - t


def grads(fn: Callable[[Tensor], Tensor], leaves: list[Tensor], x: Tensor, grad: Tensor) -> list[Tensor]:
    """[output, d/dx, d/dleaf...] of ``fn(x)`` with upstream gradient ``grad``."""
    x = x.detach().requires_grad_(True)
    out = fn(x)
    return [out.detach(), *torch.autograd.grad(out, [x, *leaves], grad)]


def max_diffs(new: list[Tensor], old: list[Tensor], names: list[str]) -> dict[str, dict[str, float]]:
    """Max |new - old| per tensor, absolute and relative to max |old|."""
    return {
        n: {"abs": (a - b).abs().max().item(), "rel": ((a - b).abs().max() / b.abs().max()).item()}
        for n, a, b in zip(names, new, old, strict=True)
    }


def bench_block(args, timings: list[dict], diffs: dict) -> None:
    for shape in BLOCK_SHAPES:
        block, m = make_block(shape[-1])
        gen = torch.Generator().manual_seed(1)
        h, grad = torch.randn(shape, generator=gen).requires_grad_(True), torch.randn(shape, generator=gen)
        variants = {
            "old": lambda x, b=block: old_block_forward(b, x),
            "fused": block.forward,  # .forward: no variant pays nn.Module.__call__
            "fused_autograd": lambda x, b=block: fused_autograd_forward(b, x),
        }
        steps = {k: step(f, h, grad) for k, f in variants.items()}
        compile_s = None
        if args.compile:
            cblock, _ = make_block(shape[-1])
            cblock.compiled = True
            torch._dynamo.reset()  # compile this shape on its own: a second shape would go dynamic
            compile_s = first_call_s(step(cblock.forward, h, grad))
            steps["compiled"] = step(cblock.forward, h, grad)
        times = measure(steps, args.rounds, args.warmup)
        timings += summarise(f"block {tuple(shape)} n={N}", times, compile_s)
        leaves, names = (
            [block.read, block.write, block.log_gate, m],
            ["out", "h", "read", "write", "log_gate", "M"],
        )
        ref = grads(variants["old"], leaves, h, grad)
        fused = grads(block, leaves, h, grad)
        diffs[f"block {tuple(shape)}: fused vs old"] = max_diffs(fused, ref, names)
        auto = grads(variants["fused_autograd"], leaves, h, grad)
        diffs[f"block {tuple(shape)}: fused vs fused_autograd"] = max_diffs(fused, auto, names)
        if args.compile:
            new = grads(cblock, [cblock.read, cblock.write, cblock.log_gate, cblock.step_mix], h, grad)
            diffs[f"block {tuple(shape)}: compiled vs old"] = max_diffs(new, ref, names)


def bench_projection(args, timings: list[dict], diffs: dict) -> None:
    for layers in LAYERS:
        gen = torch.Generator().manual_seed(layers)
        logits = (torch.randn(layers, N, N, generator=gen) * 3).requires_grad_(True)
        weight = torch.randn(layers, N, N, generator=gen)
        perm_logits = torch.randn(layers, 24, generator=gen).requires_grad_(True)
        steps = {
            "old": step(old_sinkhorn, logits, weight),
            "autograd": step(lambda x: sinkhorn(x, ITERS, custom_backward=False), logits, weight),
            "custom": step(lambda x: sinkhorn(x, ITERS), logits, weight),
            "birkhoff": step(lambda x: birkhoff(x, N), perm_logits, weight),
        }
        compile_s = None
        if args.compile:
            compiled = step(lambda x: project(x, "sinkhorn", N, iters=ITERS, compiled=True), logits, weight)
            torch._dynamo.reset()
            compile_s = first_call_s(compiled)
            steps["compiled"] = compiled
        times = measure(steps, args.rounds, args.warmup)
        timings += summarise(f"projection L={layers} n={N} K={ITERS}", times, compile_s)
    for std in (1.0, 10.0):
        gen = torch.Generator().manual_seed(int(std))
        logits, weight = torch.randn(1000, N, N, generator=gen) * std, torch.randn(1000, N, N, generator=gen)
        ref = grads(old_sinkhorn, [], logits, weight)
        new = grads(lambda x: sinkhorn(x, ITERS), [], logits, weight)
        diffs[f"projection std {std:g}: custom vs old"] = max_diffs(new, ref, ["M", "logits"])
        auto = grads(lambda x: sinkhorn(x, ITERS, custom_backward=False), [], logits, weight)
        diffs[f"projection std {std:g}: custom vs autograd"] = max_diffs(new, auto, ["M", "logits"])


def bound_quality() -> list[dict]:
    rows = []
    for kind, std in [("sinkhorn", 1.0), ("sinkhorn", 10.0), ("birkhoff", 1.0), ("birkhoff", 10.0)]:
        shape = (10_000, N, N) if kind == "sinkhorn" else (10_000, 24)
        logits = torch.randn(shape, generator=torch.Generator().manual_seed(int(std))) * std
        _, d = project_with_diagnostics(logits, kind, N, iters=ITERS)
        stats = {"sigma_max": d.sigma_max.max(), "row_err": d.row_err.max(), "col_err": d.col_err.max()}
        stats |= {"rescaled_share": (d.rescale > 1).float().mean(), "rescale_max": d.rescale.max()}
        rows.append({"projection": kind, "logit_std": std} | {k: v.item() for k, v in stats.items()})
    return rows


def markdown(meta: dict, timings: list[dict], diffs: dict, bounds: list[dict]) -> str:
    lines = ["# CRMA kernels: old vs new formulation, forward + backward (CPU)", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()]
    lines += ["", "## Variants", "", __doc__.split("\n\n")[1]]
    lines += [
        "",
        "## Timings",
        "",
        "Per call, forward + backward, in CPU time of this process (the machine may be shared: CPU time",
        "leaves out the time other processes held the core) and wall time. 'vs old' = the median over rounds",
        "of variant / old, below 1 is faster, with its bootstrap 95% CI; 'compile s' = the first call",
        "(a cold compile of that shape alone: inductor's caches are off).",
        "",
        "| section | variant | CPU us | CPU vs old (95% CI) | wall us | wall vs old (95% CI) | compile s |",
        "|---|---|---:|---|---:|---|---:|",
    ]
    for t in timings:
        cells = []
        for clock in ("cpu", "wall"):
            c = t[clock]
            ci = f"{c['ratio_vs_old']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}]"
            cells += [f"{c['median_us']:.0f}", "baseline" if t["variant"] == "old" else ci]
        comp = "" if t["compile_s"] is None else f"{t['compile_s']:.1f}"
        lines.append(f"| {t['section']} | {t['variant']} | {' | '.join(cells)} | {comp} |")
    lines += [
        "",
        "## Max differences (abs / relative to max |reference|)",
        "",
        "| comparison | tensor | max abs | rel |",
        "|---|---|---:|---:|",
    ]
    for name, d in diffs.items():
        lines += [f"| {name} | {k} | {v['abs']:.3g} | {v['rel']:.3g} |" for k, v in d.items()]
    lines += ["", f"## Bound on 10,000 random logit matrices (n={N}, Sinkhorn K={ITERS} certified)", ""]
    lines += [
        "| projection | logit std | max sigma_max | max row err | max col err | share rescaled | max rescale |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b in bounds:
        lines.append(
            f"| {b['projection']} | {b['logit_std']:g} | {b['sigma_max']:.7f} | {b['row_err']:.2e} | "
            f"{b['col_err']:.2e} | {b['rescaled_share']:.3f} | {b['rescale_max']:.7f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="15 rounds, no torch.compile (< 30 s)")
    p.add_argument("--rounds", type=int, default=None, help="measured rounds (default 100, --quick 15)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--no-compile", dest="compile", action="store_false", help="skip the torch.compile variants"
    )
    p.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "kernels", help="path stem"
    )
    args = p.parse_args()
    args.rounds = args.rounds or (15 if args.quick else 100)
    args.compile = args.compile and not args.quick
    torch.set_num_threads(args.threads)
    if args.compile:  # measure a cold compile, not a hit in a cache from an earlier run
        torch._inductor.config.fx_graph_cache = False
        torch._functorch.config.enable_autograd_cache = False
    start = time.time()
    info = run_info("benchmarks/bench_kernels.py", sys.argv[1:])
    meta = {
        "command": info["command"],
        "date": info["date"],
        "machine": machine_line(info["machine"]),
        "threads": torch.get_num_threads(),
        "load average (1 min) at start": round(info["load_start"], 2),
        "rounds": f"{args.rounds} measured after {args.warmup} warm-up rounds",
    }
    timings, diffs = [], {}
    bench_block(args, timings, diffs)
    bench_projection(args, timings, diffs)
    bounds = bound_quality()
    meta |= {
        "load average (1 min) at end": round(os.getloadavg()[0], 2),
        "runtime s": round(time.time() - start, 1),
    }
    text = markdown(meta, timings, diffs, bounds)
    print(text)
    write_report(args.out, text, {"meta": meta, "timings": timings, "diffs": diffs, "bounds": bounds})


if __name__ == "__main__":
    main()
