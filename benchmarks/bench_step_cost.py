"""Benchmark: a training step inside ``train.py fit`` against a plain PyTorch + peft loop (issue 16, 29).

Five variants at one shape (fp32, LoRA r on q/k/v/o, AdamW), each a fresh subprocess, in interleaved
rounds (harness.interleave; ratios paired by round, harness.paired_ratio):

- ``plain``           the loop a user writes: forward with labels (full logits), per-tensor AdamW
                      (../shared/bench/plain_lora_loop.py);
- ``plain_fused``     the same loop on the framework's paths: ``AdamW(fused=True)`` and the loss from
                      the final hidden states (``losses.head_token_stats``, as ``model.fused_loss``);
- ``frozen``          ``train.py fit``, FROZEN, one task (fused AdamW and fused loss, its defaults);
- ``frozen_unfused``  the same with ``--model.fused_loss false`` and AdamW ``foreach: false``;
- ``modular``         ``train.py fit``, MODULAR (LoRA + CRMA).

A step is the interval between consecutive training-batch starts in steady state (median over a
run's steps). Like for like, frozen / plain_fused and frozen_unfused / plain are the framework's own
overhead (target <= 1.03); frozen / plain is against what a user would write (<= 1.05).

Run:  .venv/bin/python benchmarks/bench_step_cost.py --model smollm2 [--rounds 4] [--steps 10]
      .venv/bin/python benchmarks/bench_step_cost.py --model smollm2 --batch 4 --seq 64 --steps 20 \
          --out benchmarks/results/step_cost_smollm2_4x64
      .venv/bin/python benchmarks/bench_step_cost.py --model tiny --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    QUIET_PCT,
    REPO,
    SMOLLM2_GGUF,
    SMOLLM2_PACKAGE,
    Rounds,
    interleave,
    machine_line,
    paired_ratio,
    run_info,
    smollm2_missing,
    train_fit,
    verdict,
    write_report,
)

from crma_lightning.backbone.output_head import head_as_identity
from crma_lightning.core.losses import head_token_stats
from crma_lightning.runs.rundir import RunDir

TARGETS_QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
#: variant -> what it runs: the plain loop (unfused or on the fused paths) or a fit (strategy, extra arguments).
UNFUSED = [
    "--model.fused_loss",
    "false",
    "--model.optimizer",
    json.dumps({"class_path": "torch.optim.AdamW", "init_args": {"foreach": False}}),
]
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "plain": ("plain", []),
    "plain_fused": ("plain", ["--fused"]),
    "frozen": ("frozen", []),
    "frozen_unfused": ("frozen", UNFUSED),
    "modular": ("modular", []),
}
#: name -> (numerator, denominator, target or None, label): the ratios reported, paired by round.
RATIOS: dict[str, tuple[str, str, float | None, str]] = {
    "frozen_vs_plain": ("frozen", "plain", 1.05, "FROZEN / plain loop (against what a user writes)"),
    "frozen_vs_plain_fused": (
        "frozen",
        "plain_fused",
        1.03,
        "FROZEN / plain loop on the fused paths (like for like)",
    ),
    "frozen_unfused_vs_plain": (
        "frozen_unfused",
        "plain",
        1.03,
        "FROZEN unfused / plain loop (like for like)",
    ),
    "plain_fused_vs_plain": (
        "plain_fused",
        "plain",
        None,
        "plain loop: fused paths / unfused (what they save)",
    ),
    "frozen_vs_frozen_unfused": ("frozen", "frozen_unfused", None, "FROZEN: fused paths / unfused"),
    "modular_vs_frozen": ("modular", "frozen", 1.02, "MODULAR / FROZEN (CRMA's cost)"),
}
#: (ratio, clock) -> target: a step's on both clocks (its CPU time is the one a busy machine leaves
#: usable at 1 thread), peak memory's against the plain loop.
TARGETS = {
    (k, c): t for k, (_, _, t, _) in RATIOS.items() if t is not None for c in ("step_s", "step_cpu_s")
} | {
    ("frozen_vs_plain", "peak_rss_mb"): 1.10,
    ("frozen_vs_plain_fused", "peak_rss_mb"): 1.10,
}
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


# -- the plain loop (run in a subprocess: python bench_step_cost.py --plain-loop ...) ------------
def plain_loop(
    model_dir: str | None, steps: int, batch: int, seq: int, rank: int, skip: int, fused: bool
) -> dict:
    """The plain loop; ``fused``: fused AdamW and the loss from the final hidden states (the framework's paths)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if model_dir:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    else:
        conf = dict(TINY)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(conf.pop("model_type"), **conf))
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS_QKVO))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=fused or None)
    vocab, head = model.config.vocab_size, model.get_output_embeddings()
    starts = []
    for _ in range(steps):
        starts.append((time.perf_counter(), time.process_time()))
        x = torch.randint(0, vocab, (batch, seq))
        if fused:
            with head_as_identity(head):
                hidden = model(input_ids=x, use_cache=False).logits
            stats = head_token_stats(hidden, head.weight, x)
            (stats.loss_sum / stats.tokens).backward()
        else:
            model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    starts.append((time.perf_counter(), time.process_time()))
    gaps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(starts, starts[1:], strict=False)][skip:]
    return {
        "step_s": statistics.median(g[0] for g in gaps),
        "step_cpu_s": statistics.median(g[1] for g in gaps),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


# -- train.py fit ------------------------------------------------------------------------------
def fit_args(
    model: str, strategy: str, steps: int, batch: int, seq: int, rank: int, save_dir: Path
) -> list[str]:
    """One task of ``steps`` steps at the plain loop's shape (real text blocks of ``seq`` tokens)."""
    if model == "smollm2":
        backbone = [
            "--model.backbone.name_or_path",
            SMOLLM2_PACKAGE,
            "--model.backbone.gguf_file",
            SMOLLM2_GGUF,
            "--model.backbone.config",
            "null",
            "--data.tokenizer",
            f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}",
        ]
    else:
        backbone = ["--model.backbone.config", json.dumps(TINY), "--data.tokenizer", "tiny"]
    callbacks = json.dumps([{"class_path": "crma_lightning.callbacks.resources.ResourceMonitor"}])
    return [
        "--config",
        "configs/tiny.yaml",
        "--config",
        f"configs/methods/{strategy}.yaml",
        *backbone,
        "--data.tasks",
        '[{"name": "code", "source": "corpus:code"}]',
        "--data.max_length",
        str(seq),
        "--data.train_size",
        str(steps * batch),
        "--data.holdout_size",
        "8",
        "--data.batch_size",
        str(batch),
        "--data.epochs_per_task",
        "1",
        "--data.eval_batch_size",
        "8",
        "--model.lora.target_modules",
        json.dumps(TARGETS_QKVO),
        "--model.lora.r",
        str(rank),
        "--model.lora.alpha",
        str(2 * rank),
        "--model.lora.dropout",
        "0.0",
        "--trainer.callbacks",
        callbacks,
        "--evaluation.print_table",
        "false",
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
    ]


def run_fit(args: argparse.Namespace, variant: str, tmp: Path) -> dict:
    strategy, extra = VARIANTS[variant]
    cli = fit_args(args.model, strategy, args.steps, args.batch, args.seq, args.rank, tmp / variant) + extra
    fit = train_fit(
        cli,
        threads=args.threads,
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        timeout=args.timeout,
    )
    if fit.rc != 0 or fit.run_dir is None:
        raise SystemExit(f"train.py fit ({variant}) failed (exit {fit.rc}):\n{fit.tail}")
    run = RunDir(fit.run_dir)
    row = next(iter(json.loads(run.resources_file.read_text()).values()))
    return {
        "step_s": row["step_s_median"],
        "step_cpu_s": row["step_cpu_s_median"],
        "peak_rss_mb": row["peak_rss_mb"],
        "fused_loss": run.read_summary().get("fused_loss"),  # "on" or "off: why", as the fit decided
    }


def run_plain(args: argparse.Namespace, fused: bool) -> dict:
    import subprocess

    folder = None
    if args.model == "smollm2":
        from crma_lightning.backbone.hub import converted_gguf, resolve_path

        folder = str(converted_gguf(resolve_path(SMOLLM2_PACKAGE), SMOLLM2_GGUF))
    cmd = (
        [
            sys.executable,
            __file__,
            "--plain-loop",
            "--steps",
            str(args.steps + args.skip),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--rank",
            str(args.rank),
            "--skip",
            str(args.skip),
        ]
        + (["--model-dir", folder] if folder else [])
        + (["--fused"] if fused else [])
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- report ------------------------------------------------------------------------------------
def summarise(values: dict[str, list[dict]]) -> dict:
    def series(v: str, k: str) -> list[float]:
        return [r[k] for r in values[v]]

    out: dict = {"per_variant": {v: {k: statistics.median(series(v, k)) for k in CLOCKS} for v in values}}
    for name, (num, den, _, _) in RATIOS.items():
        if num in values and den in values and len(values[num]) >= 2:  # paired_ratio's quartiles need two
            for clock in ("step_s", "step_cpu_s", "peak_rss_mb"):
                r = paired_ratio(series(num, clock), series(den, clock))
                out[f"{name}/{clock}"] = {"median": r.median, "q1": r.q1, "q3": r.q3, "ci95": list(r.ci95)}
    return out


def ratio_rows(s: dict, clocks: tuple[str, ...] = ("step_s", "step_cpu_s", "peak_rss_mb")) -> list[str]:
    """Markdown rows of the paired ratios in ``s`` (a summary), with their targets and verdicts."""
    rows = []
    for clock in clocks:
        for name, (_, _, _, label) in RATIOS.items():
            if (r := s.get(f"{name}/{clock}")) is None or (
                clock == "peak_rss_mb" and name not in MEMORY_RATIOS
            ):
                continue
            target = TARGETS.get((name, clock))
            judged = verdict(r["ci95"], target) if target else ""
            rows.append(
                f"| {label}, {CLOCKS[clock]} | {r['median']:.3f} | [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | "
                f"{'' if target is None else f'<= {target}'} | {judged} |"
            )
    return rows


MEMORY_RATIOS = ("frozen_vs_plain", "frozen_vs_plain_fused", "modular_vs_frozen")
CLOCKS = {"step_s": "step time", "step_cpu_s": "step CPU time", "peak_rss_mb": "peak resident memory"}


def markdown(res: dict, info: dict, args: argparse.Namespace) -> str:
    s = res["summary"]
    per = s["per_variant"]
    lines = [
        f"# Step cost: {args.model}, batch {args.batch} x {args.seq} tokens, LoRA r {args.rank} on q/k/v/o, fp32",
        "",
        f"`{info['command']}` ({info['date']}; {machine_line(info['machine'])}; {args.threads} thread(s); "
        f"{len(next(iter(res['rounds'].values())))} rounds of {args.steps} steps per variant, the first {args.skip} "
        f"dropped in the plain loop; neighbours took {res['others_pct_median']:.0f} % of the CPU (median over "
        f"rounds; per round: {', '.join('?' if o is None else f'{o:.0f}' for o in res['others_pct'])}); "
        f"{res['wall_s']:.0f} s). Variants: module docstring.",
        "",
        "| variant | step s (median of rounds) | step CPU s | peak RSS MiB |",
        "|---|---|---|---|",
        *[
            f"| {v} | {per[v]['step_s']:.4f} | {per[v]['step_cpu_s']:.4f} | {per[v]['peak_rss_mb']:.0f} |"
            for v in per
        ],
        "",
        "| ratio (paired by round) | median | 95 % CI | target | verdict |",
        "|---|---|---|---|---|",
        *ratio_rows(s),
    ]
    if res["others_pct_median"] > QUIET_PCT:
        lines += ["", LOADED]
    return "\n".join(lines)


#: What a busy machine does to the clocks (a note under a table measured with neighbours at work).
LOADED = (
    "The machine was shared: with neighbours on the cores a step's wall time depends on when they ran, "
    "so the wall-clock ratios are noise here; at 1 thread (no OpenMP threads spinning at a barrier) the "
    "CPU time per step is the clock to judge by."
)


def progress(rounds: Rounds, lap: dict[str, dict]) -> None:
    steps = ", ".join(f"{v} {r['step_s']:.4f}" for v, r in lap.items())
    print(
        f"round {len(rounds.others_pct)}: {steps} s/step; neighbours {rounds.others_pct[-1] or 0:.0f} %",
        flush=True,
    )


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=10, help="steady-state steps per run")
    ap.add_argument("--skip", type=int, default=3, help="plain loop: warm-up steps dropped")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument(
        "--budget-min", type=float, default=None, help="start no round after this (at least 2 rounds)"
    )
    ap.add_argument(
        "--out", default=None, help="report path without suffix (default results/step_cost_<model>)"
    )
    ap.add_argument("--render", default=None, help="rewrite the .md of this result .json (no measuring)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--fused", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plain_loop:
        print(
            json.dumps(
                plain_loop(args.model_dir, args.steps, args.batch, args.seq, args.rank, args.skip, args.fused)
            )
        )
        return None
    if args.render:
        res = json.loads(Path(args.render).read_text())
        res["summary"] = summarise(res["rounds"])
        text = markdown(res, res["info"], argparse.Namespace(**res["args"]))
        write_report(Path(args.render).with_suffix(""), text, res)
        return res
    if args.model == "smollm2" and (why := smollm2_missing()):
        raise SystemExit(why)
    info = run_info("benchmarks/bench_step_cost.py", sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        steps = {
            v: (
                lambda v=v: (
                    run_plain(args, v == "plain_fused")
                    if VARIANTS[v][0] == "plain"
                    else run_fit(args, v, Path(tmp))
                )
            )
            for v in args.variants
        }
        budget = float("inf") if args.budget_min is None else 60 * args.budget_min
        rounds = interleave(steps, args.rounds, budget_s=budget, progress=progress)
    res = {
        "rounds": rounds.values,
        "others_pct": rounds.others_pct,
        "wall_s": time.perf_counter() - start,
        "others_pct_median": statistics.median([o for o in rounds.others_pct if o is not None] or [0.0]),
        "info": info,
        "args": vars(args),
    }
    res["summary"] = summarise(rounds.values)
    text = markdown(res, info, args)
    write_report(args.out or REPO / "benchmarks" / "results" / f"step_cost_{args.model}", text, res)
    print(text)
    return res


if __name__ == "__main__":
    main()
