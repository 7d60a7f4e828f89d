"""Where a ``train.py fit`` spends its time: a sampling profile (py-spy) summarised by phase.

Issue 16 asks where the framework's step time goes before anything is optimised. This runs one
``train.py fit`` of the step-cost benchmark's shape (``bench_step_cost.fit_args``: one task, LoRA r 8
on q/k/v/o, batch 8 x 128 tokens; ``--model tiny`` or ``smollm2``) under ``py-spy record`` and sorts
every sample by the innermost phase it belongs to, from the Python stacks:

- start-up: imports, the CLI, building the model and data (everything before the fit loop);
- per training step: the model's forward, the loss (``losses.token_stats``; with ``model.fused_loss``
  ``losses.head_token_stats``, which also holds the output head's matmuls and the loss's
  gradient), the backward, the gradient callbacks before the optimizer step (clipping, gradient
  norms, non-finite checks), the optimizer, data loading, the callbacks' batch hooks, Lightning's
  logging, the rest of the loop;
- at task ends: the evaluation of every task, the routing statistics, checkpoints and adapters;
- other threads (TensorBoard's writer) and what is left.

py-spy samples wall-clock stacks of running threads (not idle ones) at ``--rate`` Hz, so the shares
are shares of busy time; a sample on a shared machine counts the same whether the core was ours or
not, which makes the *shares* robust to neighbours where a timing would not be. Install py-spy with
``pip install py-spy`` (it is not a dependency of the package).

    python benchmarks/profile_step.py --model tiny --strategy frozen --steps 300
    python benchmarks/profile_step.py --model smollm2 --strategy modular --steps 40 --out benchmarks/results/step_profile_smollm2

Writes ``<out>.md`` and ``<out>.json`` (default benchmarks/results/step_profile_<model>).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_step_cost import fit_args
from harness import REPO, machine_line, run_info, smollm2_missing, write_report

#: (phase, frame prefixes): a sample goes to the first phase whose frame it has, searched from the
#: innermost frame outwards within the training step, so "loss" wins over "forward".
STEP_PHASES: list[tuple[str, tuple[str, ...]]] = [
    ("loss (token_stats)", ("token_stats ", "head_token_stats ")),
    (
        "logging (self.log, logger connector)",
        ("LightningModule.log ", "_LoggerConnector.update_train_step_metrics "),
    ),
    ("forward", ("ContinualLM.training_step ",)),
    ("backward", ("_AutomaticOptimization._make_backward_fn.<locals>.backward_fn ",)),
    ("gradient callbacks (clip, norms, checks)", ("Precision._after_closure ",)),
    ("zero_grad", ("_AutomaticOptimization._make_zero_grad_fn.<locals>.zero_grad_fn ",)),
    ("optimizer (AdamW)", ("Precision.optimizer_step ",)),
    ("data loading", ("_PrefetchDataFetcher.__next__ ", "_DataFetcher.__next__ ")),
    ("callbacks' batch hooks", ("_call_callback_hooks ",)),
]
RUN_PHASES: list[tuple[str, tuple[str, ...]]] = [
    ("task ends: evaluation", ("ContinualEvaluation.",)),
    ("task ends: routing statistics", ("RoutingStatistics.", "gather_sums ")),
    ("checkpoints", ("Trainer.save_checkpoint ", "ModelCheckpoint.")),
    ("task ends: adapters", ("AdapterCheckpoint.",)),
    ("other trainer work", ("Trainer._run ",)),
]
STEP_LOOP = "_TrainingEpochLoop.advance "
_FRAME = re.compile(r" \((?:.*site-packages/)?(.*?):\d+\)$")


def classify(frames: list[str]) -> tuple[str, str | None]:
    """(phase, step phase or None) of one sample's stack (outermost frame first)."""
    names = [_FRAME.sub(r" (\1)", f) for f in frames]
    if not any(n.startswith("Trainer._run ") for n in names):
        if any(n.startswith(("_AsyncWriterThread", "Thread.run ")) for n in names):
            return "other threads (TensorBoard writer)", None
        return "start-up (imports, CLI, model and data)", None
    if any(n.startswith(STEP_LOOP) for n in names):
        for phase, prefixes in STEP_PHASES:
            if any(n.startswith(prefixes) for n in names):
                return "training steps", phase
        return "training steps", "rest of the loop"
    for phase, prefixes in RUN_PHASES:
        if any(n.startswith(prefixes) for n in names):
            return phase, None
    return "other trainer work", None


def summarise(raw: Path) -> dict:
    phases: collections.Counter[str] = collections.Counter()
    step: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        phase, sub = classify(stack.split(";"))
        phases[phase] += int(n)
        if sub:
            step[sub] += int(n)
    return {
        "samples": sum(phases.values()),
        "phases": dict(phases.most_common()),
        "step": dict(step.most_common()),
    }


def markdown(res: dict, info: dict, args: argparse.Namespace) -> str:
    total, in_step = res["samples"], sum(res["step"].values())
    lines = [
        f"# Where `train.py fit` spends its time: {args.model}, {args.strategy}, one task of {args.steps} steps",
        "",
        f"`{info['command']}` ({info['date']}; {machine_line(info['machine'])}; {args.threads} thread(s); "
        f"py-spy at {args.rate} Hz, {total} samples, the fit took {res['wall_s']:.1f} s). Shape: batch 8 x 128 tokens, "
        "LoRA r 8 on q/k/v/o, fp32 (bench_step_cost.py's). Shares of the samples of busy threads (module docstring).",
        "",
        "## The whole run",
        "",
        "| phase | share | ≈ seconds |",
        "|---|---|---|",
        *[
            f"| {p} | {100 * n / total:.1f} % | {res['wall_s'] * n / total:.1f} |"
            for p, n in res["phases"].items()
        ],
        "",
        "## Inside the training steps",
        "",
        "| part of a step | share of the steps | share of the run |",
        "|---|---|---|",
        *[f"| {p} | {100 * n / in_step:.1f} % | {100 * n / total:.1f} % |" for p, n in res["step"].items()],
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    ap.add_argument("--strategy", choices=["frozen", "modular"], default="frozen")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--out", default=None, help="report path without suffix")
    args = ap.parse_args(argv)
    if not (spy := shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))):
        raise SystemExit("py-spy is not installed: pip install py-spy")
    if args.model == "smollm2" and (why := smollm2_missing()):
        raise SystemExit(why)
    info = run_info("benchmarks/profile_step.py", sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "profile.raw"
        fit = fit_args(args.model, args.strategy, args.steps, 8, 128, 8, Path(tmp) / "runs")
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(args.threads),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
        }
        cmd = [spy, "record", "-r", str(args.rate), "-f", "raw", "-o", str(raw), "--",
               sys.executable, "train.py", "fit", *fit]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0 or not raw.is_file():
            raise SystemExit(
                f"py-spy / train.py fit failed (exit {done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
            )
        res = summarise(raw) | {"wall_s": wall, "args": vars(args)}
    text = markdown(res, info, args)
    write_report(args.out or REPO / "benchmarks" / "results" / f"step_profile_{args.model}", text, res)
    print(text)


if __name__ == "__main__":
    main()
