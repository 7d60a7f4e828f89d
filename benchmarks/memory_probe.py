"""A callback that measures what a fit's training steps hold in memory, less the process's baseline.

For benchmarks/bench_memory_plan.py, given to ``train.py fit`` as
``--trainer.callbacks '[{"class_path": "benchmarks.memory_probe.PeakMemory", "init_args": {"out": PATH}}]'``.
Linux only (``/proc/self``).

- baseline: the resident memory (RSS) at the callbacks' ``setup``, after the data are set up and
  before ``configure_model`` builds the model: Python, torch, Lightning, the tokenizer and the data;
- the peak RSS is reset (``/proc/self/clear_refs`` ``5``) at ``on_train_start``, so loading the
  weights and the fused-loss probe (transients before training) do not count;
- peak: the highest RSS since then, read after every training batch (``VmHWM``); the evaluation at
  the task's end comes after the last batch and is not read.

``peak - baseline`` is what the training steps hold: weights, adapters, gradients, optimizer state,
activations, and the allocator's own slack, as a GPU's ``max_memory_allocated`` would count them
(less the slack).
"""

from __future__ import annotations

import json

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


def status_mib(key: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(ln for ln in f if ln.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


class PeakMemory(Callback):
    """Baseline, start-of-training and peak RSS of a fit (MiB), written to ``out`` as JSON."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.row: dict[str, float] = {"steps": 0}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.row["baseline_mib"] = status_mib("VmRSS")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.row["start_mib"] = status_mib("VmRSS")
        reset_peak()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        self.row["peak_mib"] = max(self.row.get("peak_mib", 0.0), status_mib("VmHWM"))
        self.row["steps"] += 1
        with open(self.out, "w", encoding="utf-8") as f:
            json.dump(self.row, f)
