"""Routing statistics of every task, gathered when the task ends: ``routing/<task>.*`` of the run.

The statistics are the sums of the frozen base's pooled features of the task's training examples
(``crma_lightning.routing.routers``), written by ``crma_lightning.routing.stats``; ``serve`` builds the
router from them.
"""

from __future__ import annotations

import time
from typing import Literal

import lightning.pytorch as pl
from crma_lightning.callbacks.boundary import TaskBoundaryCallback, run_dir

from crma_lightning.backbone.sharding import is_sharded
from crma_lightning.core.errors import ConfigError
from crma_lightning.methods.protocol import as_continual
from crma_lightning.routing.routers import FeatureSums
from crma_lightning.routing.stats import (
    DEFAULT_MAX_EXAMPLES,
    gather_sums,
    num_layers,
    read_task_stats,
    resolve_layer,
    stats_meta,
    write_task_stats,
)


class RoutingStatistics(TaskBoundaryCallback):
    """Writes each completed task's routing statistics (frozen-base features of its training data).

    At each task end the first ``max_examples`` of the task's training set
    (``ContinualDataModule.train_examples``: this rank's shard, every example once, padding examples
    of weight 0 so that all ranks run the same number of forward passes) go through the frozen base
    (LoRA and CRMA off, the base's dtype, no autocast); the sums of their pooled features are
    all-reduced in float64 and written by rank 0. Which tasks are done is resumable state: a run
    resumed from a checkpoint taken before a task's end gathers that task again, with the same
    result.
    """

    def __init__(
        self,
        layer: int | None = None,
        pooling: Literal["mean", "last"] = "mean",
        max_examples: int | None = DEFAULT_MAX_EXAMPLES,
        batch_size: int | None = None,
        enabled: bool = True,
    ):
        """
        Args:
            layer: the feature is the residual stream after this many decoder layers (1-based; -1 is
                the last); null: a third of the depth (routing_stats.default_layer).
            pooling: mean over the prompt's tokens, or the last token's state.
            max_examples: training examples per task to gather from (the first ones of its
                training set); null: all of them.
            batch_size: examples per forward pass (default: data.eval_batch_size).
            enabled: gather nothing when false (task="auto" then needs router="loss" or
                ``train.py route --build-stats`` later).
        """
        super().__init__()
        problems = []
        if pooling not in ("mean", "last"):
            problems.append(f"routing.pooling must be 'mean' or 'last', got {pooling!r}")
        if max_examples is not None and max_examples < 1:
            problems.append(f"routing.max_examples must be >= 1 or null, got {max_examples}")
        if batch_size is not None and batch_size < 1:
            problems.append(f"routing.batch_size must be >= 1 or null, got {batch_size}")
        if layer == 0:
            problems.append(
                "routing.layer counts decoder layers from 1 (or from the end: -1); 0 is not a layer"
            )
        if problems:
            raise ConfigError("; ".join(problems))
        self.layer = layer
        self.pooling = pooling
        self.max_examples = max_examples
        self.batch_size = batch_size
        self.enabled = enabled
        self.seconds: dict[str, float] = {}
        self.sums: dict[str, FeatureSums] = {}
        """Each task's statistics gathered by this process (on every rank): what evaluation without
        the task id routes with. Not resumable state (it can be large): a resumed run reads them
        back from the run's files (:meth:`task_stats`)."""
        self.meta: dict | None = None
        """How the statistics were gathered (layer, pooling), the same for every task."""

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.enabled:  # a layer the model does not have fails now, not after the first task
            resolve_layer(self.layer, num_layers(as_continual(pl_module).model))

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task_index: int) -> None:
        run = run_dir(trainer)  # on every rank: a collective
        if not self.enabled:
            return
        start = time.perf_counter()
        module = as_continual(pl_module)
        dm = trainer.datamodule
        task = dm.task_names[task_index]
        model = module.model
        layer = resolve_layer(self.layer, num_layers(model))
        batches = dm.train_examples(
            task, trainer.global_rank, trainer.world_size, self.batch_size, self.max_examples
        )
        was_training = pl_module.training
        pl_module.eval()
        try:
            sums = gather_sums(
                model,
                module.crma,
                batches,
                layer,
                self.pooling,
                stop=not is_sharded(model),
                device=pl_module.device,
            )
        finally:
            pl_module.train(was_training)
        # Every rank's sums, added in float64: the statistics of all the examples, whatever the world size.
        sums = FeatureSums.from_flat(trainer.strategy.reduce(sums.flat(), reduce_op="sum"), sums.dim)
        self.seconds[task] = time.perf_counter() - start
        examples = min(dm.num_train_examples(task), self.max_examples or dm.num_train_examples(task))
        meta = stats_meta(task, model, layer, self.pooling, examples, self.max_examples)
        self.sums[task], self.meta = FeatureSums.from_flat(sums.flat().cpu(), sums.dim), meta
        if not trainer.is_global_zero:
            return
        write_task_stats(run, task, sums, meta)
        for logger in trainer.loggers:
            logger.log_metrics({"routing/seconds": self.seconds[task]}, step=task_index + 1)

    def task_stats(self, trainer: pl.Trainer, tasks: list[str]) -> tuple[list[FeatureSums], dict]:
        """The statistics of ``tasks`` (all completed) and their meta (layer, pooling): gathered by
        this process, or for tasks completed before a resume, read from the run's files (every rank
        reads them: the run directory is shared, as for resuming from its checkpoints)."""
        missing = [t for t in tasks if t not in self.sums]
        if missing:
            run = run_dir(trainer)  # a collective: every rank calls task_stats alike
            for task in missing:
                self.sums[task], self.meta = read_task_stats(run, task)
        return [self.sums[t] for t in tasks], self.meta

    def state_dict(self) -> dict:
        return super().state_dict() | {"seconds": dict(self.seconds)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.seconds = dict(state_dict.get("seconds", {}))
