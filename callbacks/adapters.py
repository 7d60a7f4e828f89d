"""Save each task's adapters when the task ends: ``adapters/<task>/`` (PEFT) and ``adapters/crma/``.

``adapters/<task>/`` holds the LoRA used for that task (under NAIVE, the shared LoRA as it was at
the end of the task) in PEFT's format; ``adapters/crma/`` the latest CRMA state (safetensors +
JSON), rewritten after every task. Written by rank 0, atomically.

Distributed: every rank gathers the whole adapter tensors (under FSDP a collective over the
shards; under DDP each rank's own replica) and hashes them; the hashes are exchanged and the run
stops if any rank holds different adapters (replicas that diverged, e.g. a parameter left out of
the gradient all-reduce). ``adapters/ranks.json`` records, per task, every rank's hash.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch.distributed as dist

from callbacks.boundary import TaskBoundaryCallback, run_dir
from crma_lightning.checkpoint import (
    atomic_write_json,
    crma_state,
    fingerprint,
    lora_state,
    write_crma,
    write_lora,
)

RANKS_FILE = "ranks.json"


class RanksDivergedError(RuntimeError):
    """The ranks hold different adapter weights at a task end."""


class AdapterCheckpoint(TaskBoundaryCallback):
    """Writes the adapters of every completed task into ``<run dir>/<dirname>/``."""

    def __init__(self, dirname: str = "adapters"):
        """
        Args:
            dirname: folder inside the run directory.
        """
        super().__init__()
        self.dirname = dirname
        self.rank_hashes: dict[str, list[str]] = {}

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task_index: int) -> None:
        root = run_dir(trainer) / self.dirname  # on every rank: a collective
        task = trainer.datamodule.task_names[task_index]
        adapter = pl_module.adapter_for(task)
        lora = lora_state(pl_module.model, adapter)  # on every rank: gathers shards under FSDP
        crma = crma_state(pl_module.crma) if pl_module.crma is not None else {}
        hashes = self._all_hashes(fingerprint({**lora, **{f"crma.{k}": v for k, v in crma.items()}}))
        self.rank_hashes[task] = hashes
        if len(set(hashes)) > 1:
            raise RanksDivergedError(
                f"after task {task!r} the ranks hold different adapters (hashes {hashes}); the replicas diverged"
            )
        if not trainer.is_global_zero:
            return
        write_lora(pl_module.model, adapter, lora, root / task)
        if crma:
            extra = {"after_task": task, "strategy": pl_module.strategy, "tasks": list(pl_module.task_names)}
            write_crma(pl_module.crma, crma, root / "crma", extra)
        atomic_write_json(root / RANKS_FILE, self.rank_hashes)

    @staticmethod
    def _all_hashes(mine: str) -> list[str]:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return [mine]
        out: list[str | None] = [None] * dist.get_world_size()
        dist.all_gather_object(out, mine)
        return [str(h) for h in out]

    def state_dict(self) -> dict:
        return super().state_dict() | {"rank_hashes": dict(self.rank_hashes)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.rank_hashes = dict(state_dict.get("rank_hashes", {}))
