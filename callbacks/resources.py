"""What each task costs in time and memory: step time, resident memory, optimizer state.

An optional callback (``trainer.callbacks: - class_path:
crma_lightning.callbacks.resources.ResourceMonitor``); writes ``continual/resources.json`` and logs
``resources/*``.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import statistics
import time

import lightning.pytorch as pl
from crma_lightning.callbacks.boundary import TaskBoundaryCallback, run_dir

from crma_lightning.core.atomic import atomic_write_json


def resident_mb() -> float:
    """This process's resident memory now, in MiB (Linux ``/proc/self/statm``; 0 elsewhere)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            pages = int(f.read().split()[1])
    except OSError:
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def held_anonymous_mb() -> float:
    """Anonymous resident memory (``RssAnon``: heap, tensors; not mapped files or libraries) after
    collecting cyclic garbage and asking glibc to return its free heap pages (``malloc_trim``):
    what the process holds, rather than what its allocator and the cyclic collector have yet to
    free. 0 where ``/proc/self/status`` does not exist."""
    gc.collect()  # objects in reference cycles (matplotlib figures) wait for the cyclic collector
    with contextlib.suppress(OSError, AttributeError):  # no glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            line = next(ln for ln in f if ln.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0.0
    return int(line.split()[1]) / 1024  # kB


def peak_resident_mb() -> float:
    """The process's peak resident memory so far, in MiB (``ru_maxrss`` is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ResourceMonitor(TaskBoundaryCallback):
    """Per task: median step time, resident memory, optimizer-state bytes, trainable parameters.

    At every task end it records, per task: the median training-step time (the interval between
    consecutive batch starts, the task's first step excluded since it follows the boundary work), in
    wall and in this process's CPU time; the process's resident memory now, its anonymous memory after
    returning the allocator's free pages to the system (what it really holds) and its peak resident
    memory; the bytes held in optimizer state, and how many parameters train. They are logged as
    ``resources/*`` at step = tasks trained and written to ``continual/resources.json`` (rank 0,
    atomically). A long task sequence should show the step time and the memory flat, and the optimizer
    state holding only the current task's adapters.
    """

    def __init__(self) -> None:
        super().__init__()
        self.per_task: dict[str, dict[str, float]] = {}
        self._starts: list[tuple[float, float]] = []  # (wall, process CPU) at each batch start

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int
    ) -> None:
        self._starts.append((time.perf_counter(), time.process_time()))

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task_index: int) -> None:
        out = run_dir(trainer).resources_file  # on every rank: a collective
        task = trainer.datamodule.task_names[task_index]
        # The task's first step follows the boundary work (evaluation, saving): left out.
        gaps = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(self._starts[1:], self._starts[2:], strict=False)]
        state_bytes = sum(
            t.numel() * t.element_size()
            for opt in trainer.optimizers
            for s in opt.state.values()
            for t in s.values()
            if hasattr(t, "numel")
        )
        row = {
            "step_s_median": statistics.median(g[0] for g in gaps) if gaps else None,
            # CPU time of this process: what the step itself costs, less what neighbours take.
            "step_cpu_s_median": statistics.median(g[1] for g in gaps) if gaps else None,
            "steps_timed": len(gaps),
            "rss_mb": resident_mb(),
            "held_anon_mb": held_anonymous_mb(),
            "peak_rss_mb": peak_resident_mb(),
            "optimizer_state_mb": state_bytes / 2**20,
            "trainable_params": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
        }
        self.per_task[task] = row
        self._starts = []
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"resources/{k}": v for k, v in row.items() if v is not None}, step=task_index + 1
            )
        if trainer.is_global_zero:
            atomic_write_json(out, self.per_task)

    def state_dict(self) -> dict:
        return super().state_dict() | {"per_task": {k: dict(v) for k, v in self.per_task.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.per_task = {k: dict(v) for k, v in state_dict["per_task"].items()}
