"""A layout, a regulariser and a callback defined outside the package, as a user's own module would: the
extension tests put this folder on PYTHONPATH and name the classes by ``class_path``."""

from __future__ import annotations

from typing import Any

import torch
from crma_lightning.callbacks.boundary import TaskBoundaryCallback, run_dir

from crma_lightning.methods.layouts import AdapterLayout
from crma_lightning.methods.regularizers import Regularizer


class SharedLoRAWithCRMA(AdapterLayout):
    """NAIVE with CRMA beneath: one LoRA trained on every task in turn, plus CRMA throughout."""

    name = "naive_crma"
    shared_lora = True
    crma = True
    no_task_id = "shared"


class L2ToTaskStart(Regularizer):
    """``weight`` x the squared distance of the shared parameters from their values at the task's start."""

    name = "l2_start"

    def __init__(self, weight: float = 1.0):
        self.weight = weight
        self.anchor: list[torch.Tensor] = []

    def on_task_start(self, module, task: str) -> None:
        self.anchor = [p.detach().clone() for p in module.shared_parameters()]

    def penalty(self, module, batch, logits, tokens):
        if not self.anchor:
            return None
        params = module.shared_parameters()
        return self.weight * sum(
            ((p - a.to(p.device)) ** 2).sum() for p, a in zip(params, self.anchor, strict=True)
        )

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": [a.cpu() for a in self.anchor]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor = list(state["anchor"])


class TaskEndLog(TaskBoundaryCallback):
    """Appends each finished task's name and the global step to ``<run dir>/task_ends.txt``."""

    def on_task_end(self, trainer, pl_module, task_index: int) -> None:
        path = run_dir(trainer).path / "task_ends.txt"
        if trainer.is_global_zero:
            with path.open("a") as f:
                f.write(f"{trainer.datamodule.task_names[task_index]} {trainer.global_step}\n")
