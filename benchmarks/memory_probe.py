"""A callback measuring what a fit's training steps hold in memory, less the process's baseline (Linux,
``/proc/self``), for ``benchmarks/cost.py memory-plan``, given to ``train.py fit`` as
``--trainer.callbacks '[{"class_path": "benchmarks.memory_probe.PeakMemory", "init_args": {"out": PATH}}]'``.

Baseline: the RSS at ``setup`` (data set up, model not built). At ``on_train_start`` the pages of mapped
``*.safetensors`` checkpoints are paged out and the peak RSS is reset, so loading leaves no transient;
peak: the highest RSS (``VmHWM``) read after every training batch. Why: docs/decisions.md (Benchmarks).
"""

from __future__ import annotations

import ctypes
import json

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


def status_mib(key: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB."""
    with open("/proc/self/status", encoding="ascii") as f:
        line = next(ln for ln in f if ln.startswith(key + ":"))
    return int(line.split()[1]) / 1024


#: Linux's madvise advice: reclaim these pages now (5.4+).
MADV_PAGEOUT = 21


def page_out_checkpoints() -> int:
    """Page out every mapping of a ``*.safetensors`` file; returns the bytes advised."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    total = 0
    with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5].endswith(".safetensors"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                if libc.madvise(start, end - start, MADV_PAGEOUT) == 0:
                    total += end - start
    return total


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
        self.row["mapped_checkpoint_mib"] = page_out_checkpoints() / 2**20
        self.row["start_mib"] = status_mib("VmRSS")
        reset_peak()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        self.row["peak_mib"] = max(self.row.get("peak_mib", 0.0), status_mib("VmHWM"))
        self.row["steps"] += 1
        with open(self.out, "w", encoding="utf-8") as f:
            json.dump(self.row, f)
