"""The cost benchmarks, one script: what a step, CRMA, each method, a long task sequence and a
fit's memory cost. Every subcommand writes ``benchmarks/results/<name>.{md,json}`` (``--out PATH``
without suffix elsewhere), whose header names the command that made it.

    python benchmarks/cost.py step --model tiny|smollm2 [--batch 8 --seq 128 --steps 10 --rounds 6]
    python benchmarks/cost.py overhead [--models tiny,smollm2]
    python benchmarks/cost.py methods [--config configs/tiny.yaml --rounds 3] [-- train.py fit args]
    python benchmarks/cost.py long-sequence [--tasks 30]
    python benchmarks/cost.py memory-plan [--steps 3] [--replan results/memory_plan.json]
    python benchmarks/cost.py render results/<name>.json   # the .md again from its record

What each measures, its targets and how variants are compared: benchmarks/README.md (Cost).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from harness import (
    QUIET_PCT,
    REPO,
    SMOLLM2_GGUF,
    SMOLLM2_PACKAGE,
    Fit,
    interleave,
    machine_line,
    paired_ratio,
    run_info,
    smollm2_missing,
    spread,
    table,
    time_call,
    train_fit,
    verdict,
    write_report,
)

from crma_lightning.runs.rundir import RunDir

RESULTS = REPO / "benchmarks" / "results"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
RESOURCES = {"class_path": "crma_lightning.callbacks.resources.ResourceMonitor"}
SMOLLM2_ARGS = [
    *("--model.backbone.name_or_path", SMOLLM2_PACKAGE, "--model.backbone.gguf_file", SMOLLM2_GGUF),
    *("--model.backbone.config", "null", "--data.tokenizer", f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}"),
]
#: What a busy machine does to the clocks (a note under a table measured with neighbours at work).
LOADED = (
    "The machine was shared: with neighbours on the cores a step's wall time depends on when they ran, "
    "so the wall-clock ratios are noise here; at 1 thread (no OpenMP threads spinning at a barrier) the "
    "CPU time per step is the clock to judge by."
)


# -- shared ------------------------------------------------------------------------------------
def fit(name: str, cli: list[str], args: argparse.Namespace, **kw) -> tuple[Fit, RunDir]:
    """``train.py fit CLI`` offline, and its run; exits with the log's end when it fails."""
    done = train_fit(cli, threads=args.threads, env=OFFLINE | kw.pop("env", {}), timeout=args.timeout, **kw)
    if done.rc != 0 or done.run_dir is None:
        raise SystemExit(f"{name}: train.py fit failed (exit {done.rc}):\n{done.tail}")
    return done, RunDir(done.run_dir)


def per_task(run: RunDir) -> dict:
    """What ``ResourceMonitor`` recorded per task: step times, memory, optimizer state."""
    return json.loads(run.resources_file.read_text())


def one_task(batch: int, length: int, steps: int) -> list[str]:
    """One task of ``steps`` steps of real text blocks (corpus:code) of ``length`` tokens."""
    return [
        *("--data.tasks", '[{"name": "code", "source": "corpus:code"}]', "--data.max_length", str(length)),
        *(
            "--data.train_size",
            str(steps * batch),
            "--data.holdout_size",
            "8",
            "--data.batch_size",
            str(batch),
        ),
        *("--data.eval_batch_size", "8", "--evaluation.print_table", "false"),
    ]


def header(title: str, info: dict, details: str) -> list[str]:
    machine = machine_line(info["machine"])
    return [f"# {title}", "", f"`{info['command']}` ({info['date']}; {machine}; {details}).", ""]


def ci(r: dict) -> str:
    return f"[{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"


def ratio_cells(r: dict) -> str:
    return f"{r['median']:.3f} {ci(r)}"


def median_others(pcts: list) -> float:
    return statistics.median([o for o in pcts if o is not None] or [0.0])


# -- step --------------------------------------------------------------------------------------
TINY = {
    "model_type": "llama",
    "vocab_size": 512,
    "hidden_size": 128,
    "intermediate_size": 344,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}
UNFUSED = [
    *("--model.fused_loss", "false", "--model.optimizer"),
    json.dumps({"class_path": "torch.optim.AdamW", "init_args": {"foreach": False}}),
]
#: variant -> the plain loop (fused or not) or a fit (strategy, extra arguments)
STEP_VARIANTS: dict[str, tuple[str, list[str]]] = {
    "plain": ("plain", []),
    "plain_fused": ("plain", ["--fused"]),
    "frozen": ("frozen", []),
    "frozen_unfused": ("frozen", UNFUSED),
    "modular": ("modular", []),
}
#: (numerator, denominator, target or None, label): the ratios reported (``<num>_vs_<den>``), paired by round
STEP_RATIOS: list[tuple[str, str, float | None, str]] = [
    ("frozen", "plain", 1.05, "frozen / plain loop (against what a user writes)"),
    ("frozen", "plain_fused", 1.03, "frozen / plain loop on the fused paths (like for like)"),
    ("frozen_unfused", "plain", 1.03, "frozen_unfused / plain loop (like for like)"),
    ("plain_fused", "plain", None, "plain loop: fused paths / unfused"),
    ("frozen", "frozen_unfused", None, "frozen: fused paths / unfused"),
    ("modular", "frozen", 1.02, "modular / frozen (CRMA's cost)"),
]
CLOCKS = {"step_s": "step time", "step_cpu_s": "step CPU time", "peak_rss_mb": "peak resident memory"}
#: peak memory is judged against the plain loop (1.10) and for CRMA's cost only
MEMORY_TARGETS = {"frozen_vs_plain": 1.10, "frozen_vs_plain_fused": 1.10, "modular_vs_frozen": None}


def plain_loop(args: argparse.Namespace) -> dict:
    """The loop a user writes: forward with labels (full logits), per-tensor AdamW; ``--fused``: fused
    AdamW and the loss from the final hidden states (``losses.head_token_stats``, as the framework)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from crma_lightning.backbone.output_head import head_as_identity
    from crma_lightning.core.losses import head_token_stats

    torch.manual_seed(0)
    if args.model_dir:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    else:
        conf = dict(TINY)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(conf.pop("model_type"), **conf))
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=QKVO)
    model = get_peft_model(model, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=args.fused or None)
    vocab, head = model.config.vocab_size, model.get_output_embeddings()
    starts = []
    for _ in range(args.steps + args.skip):
        starts.append((time.perf_counter(), time.process_time()))
        x = torch.randint(0, vocab, (args.batch, args.seq))
        if args.fused:
            with head_as_identity(head):
                hidden = model(input_ids=x, use_cache=False).logits
            stats = head_token_stats(hidden, head.weight, x)
            (stats.loss_sum / stats.tokens).backward()
        else:
            model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    starts.append((time.perf_counter(), time.process_time()))
    gaps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(starts, starts[1:], strict=False)][args.skip :]
    return {
        "step_s": statistics.median(g[0] for g in gaps),
        "step_cpu_s": statistics.median(g[1] for g in gaps),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def step_fit(args: argparse.Namespace, variant: str, tmp: Path) -> dict:
    strategy, extra = STEP_VARIANTS[variant]
    backbone = (
        SMOLLM2_ARGS
        if args.model == "smollm2"
        else ["--model.backbone.config", json.dumps(TINY), "--data.tokenizer", "tiny"]
    )
    cli = [
        *("--config", "configs/tiny.yaml", "--config", f"configs/methods/{strategy}.yaml", *backbone),
        *one_task(args.batch, args.seq, args.steps),
        *("--data.epochs_per_task", "1", "--model.lora.target_modules", json.dumps(QKVO)),
        *("--model.lora.r", str(args.rank), "--model.lora.alpha", str(2 * args.rank)),
        *("--model.lora.dropout", "0.0", "--trainer.callbacks", json.dumps([RESOURCES])),
        *("--trainer.logger.init_args.save_dir", str(tmp / variant), *extra),
    ]
    _, run = fit(variant, cli, args)
    row = next(iter(per_task(run).values()))
    return {
        "step_s": row["step_s_median"],
        "step_cpu_s": row["step_cpu_s_median"],
        "peak_rss_mb": row["peak_rss_mb"],
        "fused_loss": run.read_summary().get("fused_loss"),  # "on" or "off: why", as the fit decided
    }


def step_plain(args: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, __file__, "step", "--plain-loop", *STEP_VARIANTS[variant][1]]
    for flag in ("steps", "batch", "seq", "rank", "skip"):
        cmd += [f"--{flag}", str(getattr(args, flag))]
    if args.model == "smollm2":
        from crma_lightning.backbone.hub import converted_gguf, resolve_path

        cmd += ["--model-dir", str(converted_gguf(resolve_path(SMOLLM2_PACKAGE), SMOLLM2_GGUF))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def step(args: argparse.Namespace) -> dict:
    """A training step in ``train.py fit`` against a plain PyTorch + peft loop."""
    if args.plain_loop:
        print(json.dumps(plain_loop(args)))
        raise SystemExit(0)
    if args.model == "smollm2" and (why := smollm2_missing()):
        raise SystemExit(why)
    args.out = args.out or str(RESULTS / f"step_cost_{args.model}")
    with tempfile.TemporaryDirectory() as tmp:
        steps = {
            v: lambda v=v: (
                step_plain(args, v) if STEP_VARIANTS[v][0] == "plain" else step_fit(args, v, Path(tmp))
            )
            for v in STEP_VARIANTS
        }
        budget = float("inf") if args.budget_min is None else 60 * args.budget_min
        rounds = interleave(steps, args.rounds, budget_s=budget, progress=print_round)
    summary: dict = {}
    for num, den, _, _ in STEP_RATIOS:
        if len(rounds.values[num]) >= 2:
            for clock in CLOCKS:
                xs, base = ([r[clock] for r in rounds.values[v]] for v in (num, den))
                summary[f"{num}_vs_{den}/{clock}"] = vars(paired_ratio(xs, base))
    return {"rounds": rounds.values, "others_pct": rounds.others_pct, "summary": summary}


def print_round(rounds, lap: dict) -> None:
    steps = ", ".join(f"{v} {r['step_s']:.4f}" for v, r in lap.items())
    print(f"round {len(rounds.others_pct)}: {steps} s/step; neighbours {rounds.others_pct[-1] or 0:.0f} %")


def step_md(rec: dict) -> list[str]:
    a, s, others = argparse.Namespace(**rec["args"]), rec["summary"], rec["others_pct"]
    per = {v: {k: statistics.median(r[k] for r in rs) for k in CLOCKS} for v, rs in rec["rounds"].items()}
    rows = []
    for clock in CLOCKS:
        for num, den, target, label in STEP_RATIOS:
            name = f"{num}_vs_{den}"
            r = s.get(f"{name}/{clock}")
            if r is None or (clock == "peak_rss_mb" and name not in MEMORY_TARGETS):
                continue
            target = MEMORY_TARGETS[name] if clock == "peak_rss_mb" else target
            judged = (f"<= {target}", verdict(r["ci95"], target)) if target else ("", "")
            rows.append([f"{label}, {CLOCKS[clock]}", f"{r['median']:.3f}", ci(r), *judged])
    per_round = ", ".join("?" if o is None else f"{o:.0f}" for o in others)
    lines = header(
        f"Step cost: {a.model}, batch {a.batch} x {a.seq} tokens, LoRA r {a.rank} on q/k/v/o, fp32",
        rec["info"],
        f"{a.threads} thread(s); {len(next(iter(rec['rounds'].values())))} rounds of {a.steps} steps per "
        f"variant, the first {a.skip} dropped in the plain loop; neighbours took "
        f"{median_others(others):.0f} % of the CPU (median over rounds; per round: {per_round}); "
        f"{rec['wall_s']:.0f} s",
    )
    lines += table(
        ["variant", "step s (median of rounds)", "step CPU s", "peak RSS MiB"],
        [
            [v, f"{p['step_s']:.4f}", f"{p['step_cpu_s']:.4f}", f"{p['peak_rss_mb']:.0f}"]
            for v, p in per.items()
        ],
    )
    lines += ["", *table(["ratio (paired by round)", "median", "95 % CI", "target", "verdict"], rows)]
    return lines + (["", LOADED] if median_others(others) > QUIET_PCT else [])


# -- overhead ----------------------------------------------------------------------------------
#: per model: label, measuring settings (SmolLM2's LoRA step is ~5 s at 8 x 128 on 2 cores: fewer,
#: smaller steps keep a run near 10 minutes)
OVERHEAD_MODELS = {
    "tiny": (
        "Tiny random-init Llama (4 layers, hidden 128, vocab 2048)",
        dict(steps=60, warmup=5, batch=8, seq=128, budget_s=120.0),
    ),
    "smollm2": (
        "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to fp32)",
        dict(steps=20, warmup=2, batch=4, seq=128, budget_s=360.0),
    ),
}
OVERHEAD_TARGETS = {"tiny": 5.0, "smollm2": 2.0}  # max CRMA overhead over LoRA-only, percent
PROJECTION_TARGET = 1.0  # max share of the LoRA+CRMA step, percent
OVERHEAD_VARIANTS = {
    "lora": "LoRA only",
    "crma_per_layer": "LoRA + CRMA, per-layer projection",
    "crma_batched": "LoRA + CRMA, batched projection",
    "proj_batched": "projection alone, batched (L, n, n)",
    "proj_per_layer": "projection alone, L per-layer calls",
    "blocks": "CRMA blocks alone, L layers on (B, T, d), M given",
}


def overhead_steps(key: str, batch: int, seq: int, sizes: dict) -> dict[str, Callable]:
    """Every variant of one model as a timed step; ``sizes`` gets the layer and parameter counts."""
    import torch

    from crma_lightning.adapters.config import CRMAConfig, LoRAConfig
    from crma_lightning.adapters.injection import inject_crma
    from crma_lightning.adapters.lora import activate_lora, add_lora, lora_parameters
    from crma_lightning.adapters.projection import project
    from crma_lightning.backbone.loading import BackboneConfig, load_backbone

    tiny = dict(TINY, vocab_size=2048, num_key_value_heads=2, max_position_embeddings=512)
    base = load_backbone(
        BackboneConfig(config=dict(tiny, tie_word_embeddings=True), init_seed=0)
        if key == "tiny"
        else BackboneConfig(name_or_path=SMOLLM2_PACKAGE, gguf_file=SMOLLM2_GGUF)
    )
    base.requires_grad_(False)
    add_lora(base, "task0", LoRAConfig())
    activate_lora(base, "task0")
    # two deep copies: neither keeps the loader's memory layout, and LoRA-only carries no CRMA hook
    lora_model, crma_model = copy.deepcopy(base), copy.deepcopy(base)
    handle = inject_crma(crma_model, CRMAConfig(batched_projection=True))
    lora_params = lora_parameters(lora_model, "task0")
    crma_params = lora_parameters(crma_model, "task0") + handle.parameters()
    for p in lora_params + crma_params:
        p.requires_grad_(True)
    lora_model.train()  # LoRA dropout on, as in fine-tuning
    crma_model.train()
    ids = torch.randint(
        0, lora_model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0)
    )
    blocks, c = list(handle.blocks.values()), handle.config
    shape = (batch, seq, lora_model.config.hidden_size)
    h, grad = torch.randn(shape, requires_grad=True), torch.randn(shape)
    fixed = handle.mixing_matrices().detach()  # (L, n, n): no optimizer step here, so M stays fixed
    lora_n = sum(p.numel() for p in lora_params)
    sizes |= {
        "layers": len(blocks),
        "lora": lora_n,
        "crma": sum(p.numel() for p in handle.parameters()),
        "base": sum(p.numel() for p in lora_model.parameters()) - lora_n,
    }

    def timed(params, run: Callable[[], object], before: Callable[[], object] | None = None):
        def go():
            if before is not None:
                before()
            for p in params:
                p.grad = None
            return time_call(run)

        return go

    def lm(model):
        return lambda: model(input_ids=ids, labels=ids, use_cache=False).loss.backward()

    def per_layer_projection() -> None:  # what each block does on its own when batched_projection is off
        kw = dict(iters=c.sinkhorn_iters, tau=c.temperature)
        torch.stack([project(b.log_mix, c.projection, c.streams, **kw) for b in blocks]).sum().backward()

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

    mix = [b.log_mix for b in blocks]
    return {
        "lora": timed(lora_params, lm(lora_model)),
        "crma_per_layer": timed(crma_params, lm(crma_model), lambda: handle.set_batched_projection(False)),
        "crma_batched": timed(crma_params, lm(crma_model), lambda: handle.set_batched_projection(True)),
        "proj_batched": timed(mix, lambda: handle.mixing_matrices().sum().backward()),
        "proj_per_layer": timed(mix, per_layer_projection),
        "blocks": timed(handle.parameters(), blocks_alone),
    }


def time_stats(times: dict[str, list[float]]) -> dict:
    """Median, IQR, min per variant; paired overhead vs LoRA-only; shares of the CRMA step."""
    stats = {name: spread(xs) for name, xs in times.items()}
    for name in ("crma_per_layer", "crma_batched"):
        r = paired_ratio(times[name], times["lora"])
        stats[name] |= {
            "overhead_pct": 100 * (r.median - 1),
            "overhead_iqr_pct": [100 * (r.q1 - 1), 100 * (r.q3 - 1)],
            "overhead_ci95_pct": [100 * (x - 1) for x in r.ci95],
        }
    for part, host in (("proj_batched", "crma_batched"), ("proj_per_layer", "crma_per_layer")):
        stats[part]["share_pct"] = 100 * stats[part]["median_s"] / stats[host]["median_s"]
    stats["blocks"]["share_pct"] = 100 * stats["blocks"]["median_s"] / stats["crma_batched"]["median_s"]
    # CRMA's parts timed alone, against the LoRA-only step: a lower-noise estimate that leaves out
    # hook dispatch and any cache effects on the rest of the step.
    parts = stats["blocks"]["median_s"] + stats["proj_batched"]["median_s"]
    stats["component_overhead_pct"] = 100 * parts / stats["lora"]["median_s"]
    return stats


def overhead(args: argparse.Namespace) -> dict:
    """What CRMA adds to a LoRA step, and the projection's share."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    runs, keys = [], args.models.split(",")
    if set(keys) - set(OVERHEAD_MODELS):
        raise SystemExit(f"--models: {', '.join(OVERHEAD_MODELS)}")
    for key in keys:
        label, s = OVERHEAD_MODELS[key]
        run = {"key": key, "label": label, **s, "skipped": smollm2_missing() if key == "smollm2" else None}
        runs.append(run)
        if run["skipped"]:
            print(f"{key}: skipped, {run['skipped']}")
            continue
        print(f"{key}: building and measuring ...", flush=True)
        steps = overhead_steps(key, s["batch"], s["seq"], run)
        rounds = interleave(
            steps,
            s["steps"],
            warmup=s["warmup"],
            max_rounds=3 * s["steps"],
            budget_s=s["budget_s"],
            wait_s=args.wait_s,
        )
        idx, quiet_only = rounds.used(min(10, s["steps"] // 2))
        run["others_pct"], run["waited_s"] = rounds.others_pct, rounds.waited_s
        run["rounds"] = {"measured": len(rounds.others_pct), "quiet": len(rounds.quiet())}
        run["rounds"] |= {"used": len(idx), "quiet_only": quiet_only}
        for clock in ("wall_s", "cpu_s"):
            times = {n: [getattr(ts[i], clock) for i in idx] for n, ts in rounds.values.items()}
            run[clock] = {n: [getattr(t, clock) for t in ts] for n, ts in rounds.values.items()}
            run["stats" if clock == "wall_s" else "cpu"] = time_stats(times)
    return {"runs": runs, "load_end": os.getloadavg()[0]}


def overhead_md(rec: dict) -> list[str]:
    info = rec["info"]
    lines = [
        "# CRMA step-time overhead over LoRA-only (forward + backward, CPU)",
        "",
        f"- Command: `{info['command']}`",
        f"- Date: {info['date']}",
        f"- Machine: {machine_line(info['machine'])}",
        f"- Load average (1 min) at start / end: {info['load_start']:.2f} / {rec['load_end']:.2f}",
        "",
        "## Protocol",
        "",
        f"benchmarks/README.md (overhead protocol), with `torch.set_num_threads({rec['args']['threads']})`, "
        f"waiting at most {rec['args']['wait_s']:.0f} s per model for <= {QUIET_PCT:.0f}% neighbours.",
        "",
        "## Results",
    ]
    for run in rec["runs"]:
        lines += ["", f"### {run['label']}", ""]
        if run["skipped"]:
            lines.append(f"Skipped: {run['skipped']}")
            continue
        st, cpu, r = run["stats"], run["cpu"], run["rounds"]
        target = OVERHEAD_TARGETS[run["key"]]
        known = [o for o in run["others_pct"] if o is not None]
        lines += [
            f"{run['layers']} decoder layers; batch {run['batch']} x seq {run['seq']}; {run['warmup']} "
            f"warm-up rounds, then rounds until {run['steps']} quiet ones (at most {3 * run['steps']}, or "
            f"{run['budget_s']:.0f} s). Trainable: LoRA {run['lora']:,} params, CRMA {run['crma']:,}; frozen "
            f"base {run['base']:,}.",
            "",
        ]
        if known:
            used = (
                f"Statistics use the {r['used']} quiet rounds."
                if r["quiet_only"]
                else "**Warning:** too few quiet rounds, so the statistics use all rounds (absolute times "
                "are inflated and noisy; the interleaving keeps the ratios fairer)."
            )
            lines += [
                f"Other processes used {statistics.mean(known):.0f}% of the machine's CPU on average during "
                f"the {r['measured']} measured rounds; {r['quiet']} were quiet (<= {QUIET_PCT:.0f}%). Waited "
                f"{run['waited_s']:.0f} s in all for a quiet machine. {used}",
                "",
            ]
        rows = []
        for name, label in OVERHEAD_VARIANTS.items():
            s = st[name]
            iqr = s.get("overhead_iqr_pct", [0, 0])
            vs = f"{s.get('overhead_pct', 0):+.1f}% [{iqr[0]:+.1f}, {iqr[1]:+.1f}]"
            ms = [f"{1e3 * s[k]:.2f}" for k in ("median_s", "iqr_s", "min_s")]
            share = f"{s['share_pct']:.2f}%" if "share_pct" in s else ""
            rows.append([label, *ms, vs if "overhead_pct" in s else "", share])
        cols = ["variant", "median ms", "IQR ms", "min ms", "vs LoRA-only (paired median [IQR])"]
        lines += table([*cols, "share of its CRMA step"], rows)
        b, lo, hi = st["crma_batched"], *st["crma_batched"]["overhead_ci95_pct"]
        comp, proj = st["component_overhead_pct"], st["proj_batched"]["share_pct"]
        lines += [
            "",
            f"- CRMA (batched, the default) adds {b['overhead_pct']:+.1f}% (95% CI {lo:+.1f} to {hi:+.1f}) "
            f"to the LoRA-only step (target <= {target:.0f}%): **{verdict([lo, hi], target)}**. Per-layer "
            f"projection: {st['crma_per_layer']['overhead_pct']:+.1f}%.",
            "- Component estimate (blocks alone + batched projection alone, / LoRA-only step): "
            f"{comp:+.1f}%: **{'met' if comp <= target else 'MISSED'}**.",
            f"- The batched projection takes {proj:.2f}% of the LoRA+CRMA step (target <= "
            f"{PROJECTION_TARGET:.0f}%): **{'met' if proj <= PROJECTION_TARGET else 'MISSED'}**. As L "
            f"per-layer calls: {st['proj_per_layer']['share_pct']:.2f}%.",
            f"- Cross-check in process CPU time (less sensitive to neighbours): LoRA-only "
            f"{1e3 * cpu['lora']['median_s']:.2f} ms; CRMA batched "
            f"{cpu['crma_batched']['overhead_pct']:+.1f}%, per-layer "
            f"{cpu['crma_per_layer']['overhead_pct']:+.1f}%, component estimate "
            f"{cpu['component_overhead_pct']:+.1f}%; batched projection "
            f"{cpu['proj_batched']['share_pct']:.2f}% of the step.",
        ]
    return lines


# -- methods -----------------------------------------------------------------------------------
PRESETS = [
    *("frozen", "naive", "inc_lora", "olora", "replay", "ewc", "lwf", "multitask"),
    *("modular", "modular_replay", "modular_ewc"),
]


def method_fit(args: argparse.Namespace, method: str, tmp: Path) -> dict:
    cli = [
        *("--config", args.config, "--config", f"configs/methods/{method}.yaml"),
        *("--trainer.callbacks", json.dumps([RESOURCES]), "--evaluation.print_table", "false"),
        *("--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(tmp / method)),
        *args.extra,
    ]
    done, run = fit(method, cli, args, meter=True)
    rows = list(per_task(run).values())
    later = rows[1:] or rows  # the tasks where replay and the regularisers act
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.path))
    acc.Reload()
    task_end = "regularization/task_end_s" in acc.Tags()["scalars"]
    return {
        "step_s": statistics.median(r["step_s_median"] for r in later),
        "step_cpu_s": statistics.median(r["step_cpu_s_median"] for r in later),
        "peak_rss_mb": max(r["peak_rss_mb"] for r in rows),
        "task_end_s": sum(e.value for e in acc.Scalars("regularization/task_end_s")) if task_end else 0.0,
        "wall_s": done.wall_s,
        # Other processes' CPU during this fit (the fit's own process group excluded).
        "others_pct": done.load.others_pct if done.load else None,
    }


def methods(args: argparse.Namespace) -> dict:
    """Each preset's fit against FROZEN at the same batch."""
    names = args.methods.split(",")
    if "frozen" not in names or args.rounds < 2:
        raise SystemExit("--methods must include frozen (the reference) and --rounds be >= 2 (paired ratios)")
    with tempfile.TemporaryDirectory() as tmp:
        rounds = interleave({m: lambda m=m: method_fit(args, m, Path(tmp)) for m in names}, args.rounds)
    values = rounds.values

    def col(m: str, k: str) -> list[float]:
        return [r[k] for r in values[m]]

    summary = {}
    for m in values:
        s = {k: statistics.median(col(m, k)) for k in ("step_s", "peak_rss_mb", "task_end_s", "wall_s")}
        for key, clock, base in (("step", "step_s", "frozen"), ("cpu", "step_cpu_s", "frozen")):
            s[f"{key}_ratio"] = vars(paired_ratio(col(m, clock), col(base, clock)))
        s["peak_ratio"] = vars(paired_ratio(col(m, "peak_rss_mb"), col("frozen", "peak_rss_mb")))
        s["task_end_share"] = s["task_end_s"] / s["wall_s"]
        for base in ("naive", "modular"):
            if base in values:
                s[f"vs_{base}"] = vars(paired_ratio(col(m, "step_s"), col(base, "step_s")))
        summary[m] = s
    # per fit, not per round: a round's meter would count the fits' own subprocesses as neighbours
    others = [r["others_pct"] for per in values.values() for r in per]
    return {"rounds": values, "summary": summary, "others_pct_median": median_others(others)}


def methods_md(rec: dict) -> list[str]:
    a, res = rec["args"], rec["summary"]
    lines = header(
        "What each method costs, against FROZEN at the same batch",
        rec["info"],
        f"{a['threads']} thread(s); {a['rounds']} interleaved rounds of one `train.py fit` per method on "
        f"`{a['config']}`; neighbours took {rec['others_pct_median']:.0f} % of the CPU (median over fits); "
        f"{rec['wall_s']:.0f} s in all",
    )
    lines += [
        "Step: median over the tasks after the first (where replay and the regularisers act). Ratios are per "
        "round against FROZEN's run of the same round, median and bootstrap 95 % CI. Task-end s: the "
        "regularisers' passes (EWC's Fisher), summed over the run.",
        "",
    ]
    cols = [
        "method",
        "step s",
        "step / FROZEN (95 % CI)",
        "step CPU / FROZEN",
        "peak RSS MiB",
        "peak / FROZEN",
    ]
    rows = [
        [m, f"{s['step_s']:.4f}", ratio_cells(s["step_ratio"]), f"{s['cpu_ratio']['median']:.3f}"]
        + [f"{s['peak_rss_mb']:.0f}", f"{s['peak_ratio']['median']:.3f}"]
        + [f"{s['task_end_s']:.2f} ({100 * s['task_end_share']:.1f} %)"]
        for m, s in res.items()
    ]
    lines += table([*cols, "task-end s (share of fit)"], rows)
    lines += [
        "",
        "Targets: replay and EWC add at most 10 % to a step (the 95 % interval of step / FROZEN, and of the "
        "method against its own layout without it):",
        "",
    ]
    pairs = (("replay", "naive"), ("ewc", "naive"), ("modular_replay", "modular"), ("modular_ewc", "modular"))
    for m, base in pairs:
        if m in res and f"vs_{base}" in res[m]:
            r = res[m][f"vs_{base}"]
            lines.append(f"- {m} / {base}: {ratio_cells(r)}: {verdict(r['ci95'], 1.10)}")
    if "lwf" in res and "vs_naive" in res["lwf"]:
        lines.append(
            f"- LwF's teacher forward: the lwf step is {ratio_cells(res['lwf']['vs_naive'])}x naive's "
            "(the extra is the teacher's forward)."
        )
    return lines


# -- long sequence -----------------------------------------------------------------------------
SERIES = {
    "step_s_median": "median step time, s",
    "step_cpu_s_median": "median step CPU time, s",
    "rss_mb": "resident memory at task end, MiB",
    "held_anon_mb": "held anonymous memory (after malloc_trim), MiB",
    "peak_rss_mb": "peak resident memory, MiB",
    "optimizer_state_mb": "optimizer state, MiB",
    "checkpoint_mb": "checkpoint after the task, MiB",
}


def growth(y: list[float]) -> dict[str, float]:
    """Least-squares fits of ``y`` against k = 1..n: slope, the quadratic coefficient, and the
    largest residual of the linear fit relative to the mean."""
    import numpy as np

    k, y = np.arange(1, len(y) + 1, dtype=np.float64), np.asarray(y, dtype=np.float64)
    slope, intercept = np.polyfit(k, y, 1)
    resid = np.abs(y - (slope * k + intercept)).max()
    return {
        "first": float(y[0]),
        "last": float(y[-1]),
        "slope_per_task": float(slope),
        "quadratic_coef": float(np.polyfit(k, y, 2)[0]),
        "max_linear_residual_rel": float(resid / max(abs(y.mean()), 1e-12)),
    }


def long_sequence(args: argparse.Namespace) -> dict:
    """What grows with the number of finished tasks (one fit of --tasks synthetic tasks)."""
    names = [f"t{i:02d}" for i in range(args.tasks)]
    checkpoint = {"every_n_epochs": 1, "save_top_k": -1, "filename": "after-{epoch:02d}"}
    callbacks = [
        RESOURCES,
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": checkpoint},
    ]
    with tempfile.TemporaryDirectory() as tmp:
        cli = [
            *("--config", "configs/tiny.yaml", "--data.tasks", json.dumps([{"name": n} for n in names])),
            *("--data.epochs_per_task", "1", "--data.train_size", "96", "--data.holdout_size", "16"),
            # what grows is measured on the validation matrices: test ones would double the evaluation
            *("--evaluation.print_table", "false", "--evaluation.test_matrices", "false"),
            *("--trainer.callbacks", json.dumps(callbacks), "--trainer.enable_progress_bar", "false"),
            *("--trainer.logger.init_args.save_dir", tmp),
        ]
        _, run = fit("long-sequence", cli, args)
        resources = per_task(run)
        series = {k: [resources[t][k] for t in names] for k in SERIES if k != "checkpoint_mb"}
        ckpts = sorted(run.checkpoints.glob("after-epoch=*.ckpt"))
        series["checkpoint_mb"] = [p.stat().st_size / 2**20 for p in ckpts]
    return {
        "tasks": names,
        "series": series,
        "growth": {k: growth(v) for k, v in series.items()},
        "trainable_params": [resources[t]["trainable_params"] for t in names],
    }


def long_sequence_figure(rec: dict, path: Path) -> None:
    import numpy as np

    from crma_lightning.evaluation.report import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(SERIES), figsize=(4 * len(SERIES), 3.2))
    for ax, (key, label) in zip(axes, SERIES.items(), strict=True):
        y, g = rec["series"][key], rec["growth"][key]
        k = np.arange(1, len(y) + 1)
        ax.plot(k, y, "o-", ms=3)
        fitted = g["slope_per_task"] * k + (np.mean(y) - g["slope_per_task"] * k.mean())
        ax.plot(k, fitted, "--", lw=1, label="linear fit")
        ax.set_xlabel("finished tasks")
        ax.set_title(label, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"{len(rec['tasks'])} tasks of configs/tiny.yaml, one run")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def long_sequence_md(rec: dict) -> list[str]:
    g = rec["growth"]
    rows = [
        [SERIES[k], f"{x['first']:.4g}", f"{x['last']:.4g}", f"{x['slope_per_task']:+.3g}"]
        + [f"{x['quadratic_coef']:+.2g}", f"{100 * x['max_linear_residual_rel']:.2f} %"]
        for k, x in g.items()
    ]
    cols = ["series", "after task 1", "after the last", "slope per task", "k² coefficient"]
    return [
        *header(
            "A long task sequence: what grows with the number of finished tasks",
            rec["info"],
            f"one run, {rec['wall_s']:.0f} s wall",
        ),
        f"{len(rec['tasks'])} synthetic tasks of configs/tiny.yaml (96 training examples, 6 steps and 16 "
        "holdout examples each; every task evaluated after every task). Per finished task k, fitted against "
        "k:",
        "",
        *table([*cols, "largest residual of the linear fit"], rows),
        "",
        f"Trainable parameters during every task: {sorted(set(rec['trainable_params']))} (the current LoRA "
        "and CRMA).",
        "",
        "How to read it: benchmarks/README.md (long sequence).",
        "",
        "![per-task step time, memory, optimizer state and checkpoint size](long_sequence.png)",
    ]


# -- memory plan -------------------------------------------------------------------------------
MEMORY_TARGET = 0.15
#: case -> (strategy, batch, length, extra fit arguments)
CASES: dict[str, tuple[str, int, int, list[str]]] = {
    "modular 4x64 NF4 base": ("modular", 4, 64, ["--config", "configs/recipe/nf4.yaml"]),
    "frozen 4x64": ("frozen", 4, 64, []),
    "modular 4x64": ("modular", 4, 64, []),
    "frozen 8x128": ("frozen", 8, 128, []),
    "modular 8x128": ("modular", 8, 128, []),
    "modular 8x128 checkpointing": ("modular", 8, 128, ["--model.gradient_checkpointing", "true"]),
}


def case_args(case: str, steps: int) -> list[str]:
    strategy, batch, length, extra = CASES[case]
    methods = ["--config", "configs/smollm2.yaml", "--config", f"configs/methods/{strategy}.yaml"]
    return [*methods, *extra, *one_task(batch, length, steps)]


def with_plan(row: dict, steps: int) -> dict:
    """``row`` (a measured fit) with the plan's estimate for the same arguments, computed here."""
    from crma_lightning.cli.plan import plan_config

    plan, _ = plan_config(case_args(row["case"], steps))
    estimate = plan.peak() / 2**20
    return row | {
        "plan_static_mib": (plan.weights + plan.adapters) / 2**20,
        "plan_mib": estimate,
        "error": estimate / row["measured_mib"] - 1,
        "plan_activations_mib": plan.activations[plan.checkpointing] / 2**20,
    }


def memory_plan(args: argparse.Namespace) -> dict:
    """``train.py plan`` against the measured peaks of SmolLM2 fits."""
    if why := smollm2_missing():
        raise SystemExit(why)
    if args.replan:  # the plan column again, the measured rows kept
        old = json.loads(Path(args.replan).read_text())
        steps = old["args"]["steps"]
        measured = old["info"].get("measured_by", old["info"])
        wall = old.get("measured_wall_s", old.get("wall_s", 0.0))
        rows = [with_plan(r, steps) for r in old["rows"]]
        return {"rows": rows, "measured_by": measured, "measured_wall_s": wall, "steps": steps}
    rows = []
    env = {} if args.default_malloc else {"MALLOC_MMAP_THRESHOLD_": "65536"}
    with tempfile.TemporaryDirectory() as tmp:
        for i, case in enumerate(CASES):
            out = Path(tmp) / f"{i}.json"
            probe = {"class_path": "benchmarks.memory_probe.PeakMemory", "init_args": {"out": str(out)}}
            cli = [*case_args(case, args.steps), "--trainer.callbacks", json.dumps([probe])]
            fit(case, [*cli, "--trainer.logger.init_args.save_dir", f"{tmp}/runs"], args, env=env)
            r = json.loads(out.read_text())
            measured = {
                "case": case,
                "steps": r["steps"],
                "baseline_mib": r["baseline_mib"],
                "measured_static_mib": r["start_mib"] - r["baseline_mib"],
                "measured_mib": r["peak_mib"] - r["baseline_mib"],
                "default_malloc": args.default_malloc,
                "mapped_checkpoint_mib": r["mapped_checkpoint_mib"],
            }
            rows.append(with_plan(measured, args.steps))
            print(json.dumps(rows[-1]), flush=True)
    return {"rows": rows, "steps": args.steps}


def memory_plan_md(rec: dict) -> list[str]:
    rows, info = rec["rows"], rec["info"]
    worst = max(abs(r["error"]) for r in rows)
    by = rec.get("measured_by")
    m = by or info
    replanned = f"; the plan recomputed by `{info['command']}` ({info['date']})" if by else ""
    malloc = "glibc's default malloc" if rows[0].get("default_malloc") else "`MALLOC_MMAP_THRESHOLD_=65536`"
    cols = ["fit", "plan MiB", "measured MiB", "error", "plan static MiB", "measured static MiB"]
    return [
        "# Memory plan against measured peaks (SmolLM2-135M-Instruct, CPU, float32)",
        "",
        f"`{m['command']}` ({m['date']}; {machine_line(m['machine'])}; "
        f"{rec.get('measured_wall_s', rec['wall_s']):.0f} s){replanned}. One task of "
        f"{rows[0]['steps']} steps per fit, LoRA r 8 on every linear layer (configs/smollm2.yaml).",
        "",
        "Measured: the fit's peak resident memory during its training steps less the process's baseline "
        "(benchmarks/memory_probe.py: the RSS after the data are set up and before the model is built; the "
        "checkpoint's mapped pages are paged out and the peak is reset when training starts, so loading "
        f"leaves no transient in it), with {malloc} (benchmarks/README.md, Cost). Static: the RSS when "
        "training starts less the baseline, against the plan's weights + adapters; with a float32 base it is "
        "low because that base is mapped from the converted checkpoint, paged out there, and faults back in "
        "during the first step (the NF4 base is quantised into ordinary memory).",
        "",
        *table(
            [*cols, "plan activations MiB"],
            [
                [r["case"], f"{r['plan_mib']:.0f}", f"{r['measured_mib']:.0f}", f"{100 * r['error']:+.1f} %"]
                + [f"{r[k]:.0f}" for k in ("plan_static_mib", "measured_static_mib", "plan_activations_mib")]
                for r in rows
            ],
        ),
        "",
        f"Largest error {100 * worst:.1f} % (target: within {100 * MEMORY_TARGET:.0f} %): "
        + ("met." if worst <= MEMORY_TARGET else "NOT met."),
    ]


# -- the command line --------------------------------------------------------------------------
STEP_OPTIONS = [
    ("--model", dict(choices=["tiny", "smollm2"], default="tiny")),
    ("--rounds", dict(type=int, default=6)),
    ("--steps", dict(type=int, default=10, help="steady-state steps per run")),
    ("--skip", dict(type=int, default=3, help="plain loop: warm-up steps dropped")),
    ("--batch", dict(type=int, default=8)),
    ("--seq", dict(type=int, default=128)),
    ("--rank", dict(type=int, default=8)),
    ("--budget-min", dict(type=float, help="start no round after this (at least 2 rounds)")),
    ("--plain-loop", dict(action="store_true", help=argparse.SUPPRESS)),
    ("--fused", dict(action="store_true", help=argparse.SUPPRESS)),
    ("--model-dir", dict(help=argparse.SUPPRESS)),
]
OVERHEAD_OPTIONS = [
    ("--models", dict(default="tiny,smollm2", help="comma-separated: tiny, smollm2")),
    ("--wait-s", dict(type=float, default=300, help="wait at most this long for a quiet machine")),
]
METHODS_OPTIONS = [
    ("--config", dict(default="configs/tiny.yaml")),
    ("--methods", dict(default=",".join(PRESETS))),
    ("--rounds", dict(type=int, default=3)),
]
LONG_SEQUENCE_OPTIONS = [("--tasks", dict(type=int, default=30))]
MEMORY_PLAN_OPTIONS = [
    ("--steps", dict(type=int, default=3)),
    ("--default-malloc", dict(action="store_true", help="glibc's default malloc thresholds")),
    ("--replan", dict(help="a results JSON: recompute the plan column only, no fits")),
]
#: subcommand -> (measure, render, default result name (step: step_cost_<model>), threads, timeout s,
#: its own options)
SUBCOMMANDS: dict[str, tuple[Callable, Callable, str | None, int, float, list]] = {
    "step": (step, step_md, None, 2, 1200, STEP_OPTIONS),
    "overhead": (overhead, overhead_md, "overhead", 2, 0, OVERHEAD_OPTIONS),
    "methods": (methods, methods_md, "methods_cost", 1, 1800, METHODS_OPTIONS),
    "long-sequence": (long_sequence, long_sequence_md, "long_sequence", 1, 1200, LONG_SEQUENCE_OPTIONS),
    "memory-plan": (memory_plan, memory_plan_md, "memory_plan", 2, 900, MEMORY_PLAN_OPTIONS),
}


def write(rec: dict, out: str | Path) -> Path:
    """The record's ``.md`` (its subcommand's renderer) and ``.json``; ``long-sequence`` also its figure."""
    md, _ = write_report(out, "\n".join(SUBCOMMANDS[rec["subcommand"]][1](rec)), rec)
    if rec["subcommand"] == "long-sequence":
        long_sequence_figure(rec, Path(out).with_suffix(".png"))
    return md


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="subcommand", required=True)
    for name, (measure, _, out, threads, timeout, options) in SUBCOMMANDS.items():
        s = sub.add_parser(name, help=measure.__doc__.splitlines()[0])
        s.add_argument("--out", default=out and str(RESULTS / out), help="result path without suffix")
        s.add_argument("--threads", type=int, default=threads, help="torch / OMP threads")
        s.add_argument("--timeout", type=float, default=timeout, help="seconds per fit")
        for flag, kw in options:
            s.add_argument(flag, **kw)
    sub.add_parser("render", help="the .md again from a record").add_argument("record")
    args = p.parse_args(ours)
    if args.subcommand == "render":
        rec = json.loads(Path(args.record).read_text())
        print(write(rec, Path(args.record).with_suffix("")))
        return rec
    args.extra = extra
    info = run_info(__file__, argv)
    start = time.perf_counter()
    rec = SUBCOMMANDS[args.subcommand][0](args)
    rec = {"subcommand": args.subcommand, "args": vars(args), "info": info, **rec}
    rec["wall_s"] = time.perf_counter() - start
    print(write(rec, args.out).read_text())
    return rec


if __name__ == "__main__":
    main()
