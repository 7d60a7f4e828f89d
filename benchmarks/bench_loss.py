"""Benchmark: the next-token loss's layout, alone and inside a SmolLM2 LoRA training step.

``crma_lightning.core.losses.token_losses`` computes cross-entropy on the logits as they come out of the
model, a row-major ``(B * T, V)`` view with the targets shifted left (the last position unscored),
as transformers' causal-LM loss does. Before, it sliced the logits to ``(B, T - 1, V)`` and ran
cross-entropy over dim 1 of a transposed ``(B, V, T - 1)`` view. The profile of a SmolLM2 step
(``profile_step.py``) put that loss at 9 % of the step's forward samples, so this measures the two
side by side, in interleaved rounds (harness.interleave), forward + backward:

1. the loss alone, on random logits of the step-cost shape (batch 8 x 128 tokens) at SmolLM2's
   vocabulary (49152) and at a tiny one (512);
2. a whole LoRA training step of SmolLM2-135M (LoRA r 8 on q/k/v/o, fp32: forward, loss, backward,
   AdamW, zero_grad) with each loss, when the model is installed.

It also reports how far apart the two are (the loss values and the gradient on the logits: the
layouts sum in different orders) and, on SmolLM2's own logits, each one's error against float64:
the transposed layout's float32 cross-entropy was biased low by about 5e-5 nats per token there.

Run:  .venv/bin/python benchmarks/bench_loss.py [--rounds 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from harness import (
    REPO,
    SMOLLM2_GGUF,
    SMOLLM2_PACKAGE,
    interleave,
    machine_line,
    paired_ratio,
    run_info,
    smollm2_missing,
    time_call,
    verdict,
    with_lora,
    write_report,
)

from crma_lightning.core.losses import IGNORE_INDEX, token_losses


def transposed_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The formulation before: slice the logits, cross-entropy over dim 1 of a transposed view."""
    targets = labels[:, 1:]
    scored = (targets != IGNORE_INDEX).float()
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp_min(0), reduction="none")
    return (nll * scored).sum()


def row_major_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    t = token_losses(logits, labels, accuracy=False)
    return (t.nll * t.scored).sum()


LOSSES = {"transposed": transposed_losses, "row_major": row_major_losses}


def loss_alone(vocab: int, rounds: int) -> dict:
    torch.manual_seed(0)
    logits = torch.randn(8, 128, vocab, requires_grad=True)
    labels = torch.randint(0, vocab, (8, 128))
    labels[:, :5] = IGNORE_INDEX  # a prompt, unscored

    def step(fn):
        def run() -> float:
            logits.grad = None
            return time_call(lambda: fn(logits, labels).backward()).wall_s

        return run

    got = {}
    for name, fn in LOSSES.items():
        logits.grad = None
        loss = fn(logits, labels)
        loss.backward()
        got[name] = (loss.detach(), logits.grad.clone())
    rounds_ = interleave({n: step(fn) for n, fn in LOSSES.items()}, rounds, warmup=1)
    return {
        "times": rounds_.values,
        "others_pct": rounds_.others_pct,
        "max_abs_loss_diff": float((got["row_major"][0] - got["transposed"][0]).abs()),
        "loss": float(got["transposed"][0]),
        "max_abs_grad_diff": float((got["row_major"][1] - got["transposed"][1]).abs().max()),
    }


def training_step(rounds: int) -> dict | None:
    if why := smollm2_missing():
        print(f"skipping the SmolLM2 step: {why}", file=sys.stderr)
        return None
    from transformers import AutoModelForCausalLM

    from crma_lightning.adapters.config import LoRAConfig
    from crma_lightning.backbone.hub import converted_gguf, resolve_path

    folder = converted_gguf(resolve_path(SMOLLM2_PACKAGE), SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    params = with_lora(model, "task", LoRAConfig(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    opt = torch.optim.AdamW(params, lr=1e-4)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (8, 128))

    def step(fn):
        def run() -> float:
            def once() -> None:
                logits = model(input_ids=ids, use_cache=False).logits
                (fn(logits, ids) / ids.numel()).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            return time_call(once).wall_s

        return run

    rounds_ = interleave({n: step(fn) for n, fn in LOSSES.items()}, rounds, warmup=1)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    return {"times": rounds_.values, "others_pct": rounds_.others_pct, "error": float64_error(logits, ids)}


def float64_error(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, dict[str, float]]:
    """Each layout's per-token loss against float64 on the same logits: mean error (its bias) and mean
    absolute error."""
    B, T, V = logits.shape
    ref = F.cross_entropy(logits[:, :-1].double().reshape(-1, V), labels[:, 1:].reshape(-1), reduction="none")
    per_token = {
        "transposed": F.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:], reduction="none"),
        "row_major": token_losses(logits, labels, accuracy=False).nll,
    }
    out = {}
    for name, nll in per_token.items():
        err = nll.double().reshape(-1) - ref
        out[name] = {"mean": float(err.mean()), "mean_abs": float(err.abs().mean())}
    return out


def section(title: str, res: dict) -> list[str]:
    t = res["times"]
    r = paired_ratio(t["row_major"], t["transposed"])
    lines = [
        f"## {title}",
        "",
        f"{len(t['row_major'])} interleaved rounds (one call per variant per round, after one warm-up round); "
        f"neighbours took {statistics.median([o for o in res['others_pct'] if o is not None] or [0.0]):.0f} % of the CPU "
        "(median over rounds).",
        "",
        "| variant | s per call (median) |",
        "|---|---|",
        *[f"| {n} | {statistics.median(v):.4f} |" for n, v in t.items()],
        "",
        f"row_major / transposed, paired by round: **{r.median:.3f}** (95 % CI {r.ci95[0]:.3f}–{r.ci95[1]:.3f}; "
        f"faster: {verdict(r.ci95, 1.0)}).",
        "",
    ]
    if "error" in res:
        e = res["error"]
        lines += ["Per-token loss against float64 on the model's logits of the benchmark batch, mean error (bias) / mean "
                  "absolute error: " + "; ".join(f"{n} {v['mean']:+.2e} / {v['mean_abs']:.2e}" for n, v in e.items())
                  + ".", ""]  # fmt: skip
    if "max_abs_loss_diff" in res:
        lines += [f"Loss {res['loss']:.2f} (summed over tokens): the layouts differ by {res['max_abs_loss_diff']:.1e}; the "
                  f"gradient on the logits by at most {res['max_abs_grad_diff']:.1e}.", ""]  # fmt: skip
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "loss_layout"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = run_info("benchmarks/bench_loss.py", sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    res = {f"loss_v{v}": loss_alone(v, args.rounds) for v in (49152, 512)}
    if (step := training_step(args.rounds)) is not None:
        res["smollm2_step"] = step
    lines = [
        "# The next-token loss's layout: transposed slice vs row-major view",
        "",
        f"`{info['command']}` ({info['date']}; {machine_line(info['machine'])}; {args.threads} thread(s); "
        f"{time.perf_counter() - start:.0f} s). Forward + backward, batch 8 x 128 tokens, fp32. `transposed`: the "
        "loss before (slice, cross-entropy over dim 1 of a (B, V, T - 1) view); `row_major`: "
        "crma_lightning.core.losses.token_losses now.",
        "",
        *section("The loss alone, SmolLM2's vocabulary (49152)", res["loss_v49152"]),
        *section("The loss alone, a tiny vocabulary (512)", res["loss_v512"]),
    ]
    if "smollm2_step" in res:
        lines += section("A whole SmolLM2-135M LoRA training step (r 8 on q/k/v/o, AdamW)", res["smollm2_step"])
    md, _ = write_report(args.out, "\n".join(lines), res | {"info": info})
    print("\n".join(lines))
    print(f"wrote {md}")


if __name__ == "__main__":
    main()
