"""Benchmark: what a training step costs inside the framework, against a plain PyTorch + peft loop.

The question (issue 16): a user pays the whole training step inside ``train.py fit`` (data,
forward, backward, clipping, optimizer, every callback), not just CRMA's forward and backward.
Three variants at the same shape (fp32, LoRA r on q/k/v/o, AdamW), each a fresh subprocess, run in
interleaved rounds (harness.py: a different variant first each round):

1. ``plain``    a plain PyTorch + peft loop: ``get_peft_model``, forward with labels, backward,
                AdamW step, zero_grad (the reference loop of ../shared/bench/plain_lora_loop.py);
2. ``frozen``   ``train.py fit``, strategy frozen (LoRA only), one task;
3. ``modular``  ``train.py fit``, strategy modular (LoRA + CRMA), one task.

A step is the interval between consecutive training-batch starts, steady state (the first
``--skip`` steps dropped): for the plain loop timed in its loop, for ``train.py`` by
``callbacks.resources.ResourceMonitor`` (median over the task's steps, first step excluded). Per
round each variant gives its median step; the ratios ``frozen / plain`` and ``modular / frozen``
are paired by round (harness.paired_ratio: median and bootstrap 95 % CI). Peak resident memory
(``ru_maxrss``) of each process is compared too. Targets: frozen <= 1.05 x plain; modular <= 1.02 x
frozen with a 95 % interval narrower than +-1 %; peak memory <= 1.10 x plain.

Run:  .venv/bin/python benchmarks/bench_step_cost.py --model smollm2 [--rounds 8] [--steps 10]
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
    REPO,
    SMOLLM2_GGUF,
    SMOLLM2_PACKAGE,
    interleave,
    machine_line,
    paired_ratio,
    run_info,
    smollm2_missing,
    train_fit,
    verdict,
    write_report,
)

from crma_lightning.rundir import RunDir

TARGETS_QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 128, "intermediate_size": 344,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 256}  # fmt: skip


# -- the plain loop (run in a subprocess: python bench_step_cost.py --plain-loop ...) ------------
def plain_loop(model_dir: str | None, steps: int, batch: int, seq: int, rank: int, skip: int) -> dict:
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
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    vocab = model.config.vocab_size
    starts = []
    for _ in range(steps):
        starts.append((time.perf_counter(), time.process_time()))
        x = torch.randint(0, vocab, (batch, seq))
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    starts.append((time.perf_counter(), time.process_time()))
    gaps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(starts, starts[1:], strict=False)][skip:]
    return {"step_s": statistics.median(g[0] for g in gaps), "step_cpu_s": statistics.median(g[1] for g in gaps),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip


# -- train.py fit ------------------------------------------------------------------------------
def fit_args(
    model: str, strategy: str, steps: int, batch: int, seq: int, rank: int, save_dir: Path
) -> list[str]:
    """One task of ``steps`` steps at the plain loop's shape (real text blocks of ``seq`` tokens)."""
    if model == "smollm2":
        backbone = ["--model.backbone.name_or_path", SMOLLM2_PACKAGE, "--model.backbone.gguf_file", SMOLLM2_GGUF,
                    "--model.backbone.config", "null", "--data.tokenizer", f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF}"]  # fmt: skip
    else:
        backbone = ["--model.backbone.config", json.dumps(TINY), "--data.tokenizer", "tiny"]
    callbacks = json.dumps([{"class_path": "callbacks.resources.ResourceMonitor"}])
    return ["--config", "configs/tiny.yaml", "--config", f"configs/strategy/{strategy}.yaml", *backbone,
            "--data.tasks", '[{"name": "code", "source": "corpus:code"}]', "--data.max_length", str(seq),
            "--data.train_size", str(steps * batch), "--data.holdout_size", "8", "--data.batch_size", str(batch),
            "--data.epochs_per_task", "1", "--data.eval_batch_size", "8",
            "--model.lora.target_modules", json.dumps(TARGETS_QKVO), "--model.lora.r", str(rank),
            "--model.lora.alpha", str(2 * rank), "--model.lora.dropout", "0.0", "--trainer.callbacks", callbacks,
            "--evaluation.print_table", "false", "--trainer.logger.init_args.save_dir", str(save_dir)]  # fmt: skip


def run_fit(args: argparse.Namespace, strategy: str, tmp: Path) -> dict:
    fit = train_fit(fit_args(args.model, strategy, args.steps, args.batch, args.seq, args.rank, tmp / strategy),
                    threads=args.threads, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
                    timeout=args.timeout)  # fmt: skip
    if fit.rc != 0 or fit.run_dir is None:
        raise SystemExit(f"train.py fit ({strategy}) failed (exit {fit.rc}):\n{fit.tail}")
    row = next(iter(json.loads(RunDir(fit.run_dir).resources_file.read_text()).values()))
    return {
        "step_s": row["step_s_median"],
        "step_cpu_s": row["step_cpu_s_median"],
        "peak_rss_mb": row["peak_rss_mb"],
    }


def run_plain(args: argparse.Namespace) -> dict:
    import subprocess

    folder = None
    if args.model == "smollm2":
        from crma_lightning.hub import converted_gguf, resolve_path

        folder = str(converted_gguf(resolve_path(SMOLLM2_PACKAGE), SMOLLM2_GGUF))
    cmd = [sys.executable, __file__, "--plain-loop", "--steps", str(args.steps + args.skip), "--batch", str(args.batch),
           "--seq", str(args.seq), "--rank", str(args.rank), "--skip", str(args.skip)] + (["--model-dir", folder] if folder else [])  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- report ------------------------------------------------------------------------------------
def summarise(values: dict[str, list[dict]]) -> dict:
    def series(v: str, k: str) -> list[float]:
        return [r[k] for r in values[v]]

    out: dict = {
        "per_variant": {v: {k: statistics.median(series(v, k)) for k in values[v][0]} for v in values}
    }
    for name, (num, den) in {
        "frozen_vs_plain": ("frozen", "plain"),
        "modular_vs_frozen": ("modular", "frozen"),
    }.items():
        for clock in ("step_s", "step_cpu_s", "peak_rss_mb"):
            r = paired_ratio(series(num, clock), series(den, clock))
            out[f"{name}/{clock}"] = {"median": r.median, "q1": r.q1, "q3": r.q3, "ci95": list(r.ci95)}
    return out


def markdown(res: dict, info: dict, args: argparse.Namespace) -> str:
    s = res["summary"]
    per = s["per_variant"]
    targets = {
        "frozen_vs_plain/step_s": 1.05,
        "modular_vs_frozen/step_s": 1.02,
        "frozen_vs_plain/peak_rss_mb": 1.10,
    }
    lines = [
        f"# Step cost: {args.model}, batch {args.batch} x {args.seq} tokens, LoRA r {args.rank} on q/k/v/o, fp32",
        "",
        f"`{info['command']}` ({info['date']}; {machine_line(info['machine'])}; {args.threads} thread(s); "
        f"{len(res['rounds']['plain'])} rounds of {args.steps} steps per variant, the first {args.skip} dropped; "
        f"neighbours took {res['others_pct_median']:.0f} % of the CPU (median over rounds); {res['wall_s']:.0f} s).",
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
    ]
    for key in ("frozen_vs_plain/step_s", "frozen_vs_plain/step_cpu_s", "modular_vs_frozen/step_s",
                "modular_vs_frozen/step_cpu_s", "frozen_vs_plain/peak_rss_mb"):  # fmt: skip
        r = s[key]
        target = targets.get(key)
        judged = verdict(r["ci95"], target) if target else ""
        lines.append(f"| {key} | {r['median']:.4f} | [{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}] | "
                     f"{'' if target is None else f'<= {target}'} | {judged} |")  # fmt: skip
    return "\n".join(lines)


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
        "--out", default=None, help="report path without suffix (default results/step_cost_<model>)"
    )
    ap.add_argument("--plain-loop", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plain_loop:
        print(json.dumps(plain_loop(args.model_dir, args.steps, args.batch, args.seq, args.rank, args.skip)))
        return None
    if args.model == "smollm2" and (why := smollm2_missing()):
        raise SystemExit(why)
    info = run_info("benchmarks/bench_step_cost.py", sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        steps = {"plain": lambda: run_plain(args)}
        steps |= {s: (lambda s=s: run_fit(args, s, Path(tmp))) for s in ("frozen", "modular")}
        rounds = interleave(steps, args.rounds)
    res = {"rounds": rounds.values, "others_pct": rounds.others_pct, "wall_s": time.perf_counter() - start,
           "others_pct_median": statistics.median([o for o in rounds.others_pct if o is not None] or [0.0]),
           "info": info, "args": vars(args)}  # fmt: skip
    res["summary"] = summarise(rounds.values)
    text = markdown(res, info, args)
    write_report(args.out or REPO / "benchmarks" / "results" / f"step_cost_{args.model}", text, res)
    print(text)
    return res


if __name__ == "__main__":
    main()
