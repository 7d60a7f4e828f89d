"""The lifecycle of the module's regularisers (``model.regularizers``): their task-start and
task-end hooks (LwF's snapshot, EWC's Fisher pass). The module only adds their penalties to the loss.
"""

from __future__ import annotations

import time

import lightning.pytorch as pl
from crma_lightning.callbacks.boundary import TaskBoundaryCallback

from crma_lightning.core.clock import TaskClock
from crma_lightning.methods.protocol import as_continual


class RegularizerHooks(TaskBoundaryCallback):
    """Calls every regulariser's ``on_task_start`` before a task's first step (from the second task
    on) and its ``on_task_end`` with the finished task's training batches.

    At a task end every regulariser sees that task's training set in a fixed batching (the same batches
    whatever the number of ranks; this rank's share of them), with the task's own adapters active, and
    may update its state (EWC: the Fisher of the shared parameters and their anchor); it all-reduces its
    sums through ``reduce``. The progress is resumable state; the regularisers' own state goes into the
    checkpoint with the module.
    """

    role = "regularization"

    def __init__(self, batch_size: int | None = None):
        """
        Args:
            batch_size: batch size of the task-end passes (default: data.eval_batch_size).
        """
        super().__init__()
        self.batch_size = batch_size
        self.seconds: dict[str, float] = {}  # per task: time spent in the task-end passes

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int
    ) -> None:
        # Per batch, not per epoch: Lightning skips on_train_epoch_start when it resumes from a
        # checkpoint taken on an epoch's last step.
        module = as_continual(pl_module)
        k = TaskClock.of(trainer).task_index(trainer.current_epoch)
        if module.regularizers and k > 0 and trainer.global_step == module.task_start_step(k):
            for reg in module.regularizers:
                reg.on_task_start(module, module.task_names[k])

    def on_task_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, task_index: int) -> None:
        module = as_continual(pl_module)
        if not module.regularizers:
            return
        dm = trainer.datamodule
        task = dm.task_names[task_index]
        current = module.current_task()
        batch_size = self.batch_size or dm.eval_batch_size
        start = time.perf_counter()
        module.use_task(task)  # the finished task's adapters, as its last step saw them
        try:
            for reg in module.regularizers:
                batches = dm.train_batches(
                    task,
                    trainer.global_rank,
                    trainer.world_size,
                    batch_size,
                    limit=getattr(reg, "max_batches", None),
                )
                batches = [{k: v.to(pl_module.device) for k, v in b.items()} for b in batches]
                reg.on_task_end(module, task, batches, lambda t: trainer.strategy.reduce(t, reduce_op="sum"))
        finally:
            module.use_task(current)
        self.seconds[task] = time.perf_counter() - start
        for logger in trainer.loggers:
            logger.log_metrics({"regularization/task_end_s": self.seconds[task]}, step=task_index + 1)

    def state_dict(self) -> dict:
        return super().state_dict() | {"seconds": dict(self.seconds)}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.seconds = dict(state_dict.get("seconds", {}))
