"""Save each task's adapters when the task ends: ``adapters/<task>/`` (PEFT) and ``adapters/crma/``.

Also ``adapters/crma_history/<task>/`` (the CRMA as it was after that task, to rebuild each matrix
row) and ``adapters/ranks.json``; written by rank 0, atomically, where ``crma_lightning.runs.rundir``
says. Every rank hashes its gathered adapters and the run stops if the ranks differ.
"""

from __future__ import annotations

import lightning.pytorch as pl
from crma_lightning.callbacks.boundary import TaskBoundaryCallback, run_dir

from crma_lightning.core.atomic import atomic_write_json
from crma_lightning.core.dist import all_gather_strings
from crma_lightning.methods.protocol import as_continual
from crma_lightning.runs.checkpoint import crma_state, fingerprint, lora_state, write_crma, write_lora


class RanksDivergedError(RuntimeError):
    """The ranks hold different adapter weights at a task end."""


class AdapterCheckpoint(TaskBoundaryCallback):
    """Writes the adapters of every completed task into the run directory's ``adapters/``.

    ``adapters/<task>/`` holds the LoRA used for that task (under NAIVE, the shared LoRA as it was at
    the end of the task) in PEFT's format; ``adapters/crma/`` the latest CRMA state (safetensors +
    JSON), rewritten after every task. Every rank gathers the whole adapter tensors (under FSDP a
    collective over the shards) and hashes them; the hashes are exchanged, recorded per task in
    ``adapters/ranks.json``, and :class:`RanksDivergedError` stops the run if any rank differs
    (replicas that diverged, e.g. a parameter left out of the gradient all-reduce).
    """

    def __init__(self) -> None:
        super().__init__()
        self.rank_hashes: dict[str, list[str]] = {}

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task_index: int) -> None:
        run = run_dir(trainer)  # on every rank: a collective
        module = as_continual(pl_module)
        task = trainer.datamodule.task_names[task_index]
        adapter = module.adapter_for(task)
        lora = lora_state(module.model, adapter)  # on every rank: gathers shards under FSDP
        crma = crma_state(module.crma) if module.crma is not None else {}
        hashes = all_gather_strings(fingerprint({**lora, **{f"crma.{k}": v for k, v in crma.items()}}))
        self.rank_hashes[task] = hashes
        if len(set(hashes)) > 1:
            raise RanksDivergedError(
                f"after task {task!r} the ranks hold different adapters (hashes {hashes}); the replicas "
                "diverged"
            )
        if not trainer.is_global_zero:
            return
        write_lora(module.model, adapter, lora, run.adapter(task))
        if crma:
            extra = {"after_task": task, "strategy": module.strategy, "tasks": list(module.task_names)}
            write_crma(module.crma, crma, run.crma, extra)
            write_crma(module.crma, crma, run.crma_after(task), extra)
        atomic_write_json(run.ranks_file, self.rank_hashes)

    def state_dict(self) -> dict:
        return super().state_dict() | {"rank_hashes": dict(self.rank_hashes)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.rank_hashes = dict(state_dict.get("rank_hashes", {}))
