"""Benchmark: where the main job's wall time goes (``train.py fit --config configs/smollm2.yaml``).

One ``fit`` runs in this process under cProfile; its wall time is split into shares by the
cumulative time of the functions that own each phase (matched by name, so the same script reads a
checkout of an older commit: ``--repo``): imports, model load, data set-up (tokenisation, split),
training steps (forward, backward, optimizer and the per-step callbacks, the latter also on their
own), evaluation of every task after every task, reports (CSV, heatmaps, TensorBoard), adapter
writes and checkpoints, and the rest. cProfile slows Python-heavy code more than torch's kernels,
so the shares of the per-step Python work are upper bounds; the total wall time is also given
without the profiler (``--no-profile``). The start-up is the time from the interpreter's start
(the process's creation) to the first training step.

Run:  .venv/bin/python benchmarks/bench_main_job.py [--config configs/smollm2.yaml] [--repo PATH]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path

#: Phase -> (file suffix, function name) pairs whose cumulative times add up to it (no nesting
#: between the pairs of one phase).
PHASES = {
    "model load": [("backbone.py", "load_backbone")],
    "data set-up": [("module.py", "setup"), ("data.py", "setup")],
    "training steps": [("automatic.py", "run")],
    "  of which per-step callbacks": [("spectral.py", "on_train_batch_end"), ("gradnorm.py", "on_train_batch_end"),
                                      ("progress.py", "on_train_batch_end"), ("resources.py", "on_train_batch_end")],
    "evaluation": [("evaluation.py", "evaluate")],
    "reports (CSV, figures, TensorBoard)": [("evaluation.py", "_publish")],
    "adapter writes": [("adapters.py", "on_task_end")],
    "checkpoints": [("trainer.py", "save_checkpoint")],
}  # fmt: skip


def first_step_marker():
    """A callback that records when the first training batch starts (the end of start-up)."""
    from lightning.pytorch.callbacks import Callback

    class FirstStep(Callback):
        at: float | None = None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if FirstStep.at is None:
                FirstStep.at = time.perf_counter()

    return FirstStep


def commit(repo: str) -> str:
    """The checkout's commit (the report names it rather than a path on this machine)."""
    import subprocess

    out = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/smollm2.yaml")
    ap.add_argument(
        "--repo", default=str(Path(__file__).resolve().parents[1]), help="checkout to run (default: this one)"
    )
    ap.add_argument("--save-dir", default="/tmp/bench_main_job")
    ap.add_argument("--no-profile", action="store_true", help="time the fit without cProfile")
    ap.add_argument("--out", default=None, help="write the shares as JSON here")
    args = ap.parse_args()
    out = Path(args.out).resolve() if args.out else None  # before chdir: relative to where it was run
    os.chdir(args.repo)
    sys.path.insert(0, args.repo)
    import psutil

    since_process = time.time() - psutil.Process().create_time()  # interpreter start -> now
    t0 = time.perf_counter()
    from crma_lightning.cli import fit as cli

    imports_s = time.perf_counter() - t0
    FirstStep = first_step_marker()
    original = cli.ContinualCLI._instantiate_trainer

    def with_marker(self, config, callbacks):
        config["callbacks"] = list(config.get("callbacks") or []) + [FirstStep()]
        return original(self, config, callbacks)

    cli.ContinualCLI._instantiate_trainer = with_marker
    argv = ["fit", "--config", args.config, "--trainer.logger.init_args.save_dir", args.save_dir]
    profiler = cProfile.Profile()
    start = time.perf_counter()
    if args.no_profile:
        cli.main(argv)
    else:
        profiler.runcall(cli.main, argv)
    fit_s = time.perf_counter() - start
    wall = since_process + (time.perf_counter() - t0)
    shares = {"imports": imports_s}
    if not args.no_profile:
        stats = pstats.Stats(profiler).stats  # {(file, line, func): (cc, nc, tt, ct, callers)}
        for phase, keys in PHASES.items():
            shares[phase] = sum(v[3] for (f, _, fn), v in stats.items() for suffix, name in keys
                                if f.endswith(suffix) and fn == name)  # fmt: skip
    counted = sum(v for k, v in shares.items() if not k.startswith("  "))
    shares["rest (CLI, Lightning's loop, logging)"] = wall - counted
    report = {
        "config": args.config, "commit": commit(args.repo), "profiled": not args.no_profile, "wall_s": wall, "fit_s": fit_s,
        "startup_to_first_step_s": (FirstStep.at - t0 + since_process) if FirstStep.at else None,
        "shares_s": shares, "shares_pct": {k: 100 * v / wall for k, v in shares.items()},
    }  # fmt: skip
    print(json.dumps(report, indent=2))
    if out:
        from crma_lightning.core.atomic import atomic_write_json

        atomic_write_json(out, report)


if __name__ == "__main__":
    main()
