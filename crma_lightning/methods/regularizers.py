"""Regularisers added to the training loss: EWC, LwF and O-LoRA's orthogonality, as composable parts.

A method is a layout (:mod:`crma_lightning.methods.layouts`), any of these (``model.regularizers``,
a list of ``class_path`` entries) and, on the data side, replay (``data.replay``). Each term's maths
is a pure function below; each is logged as ``train/reg/<name>`` and its state (anchors, Fisher,
snapshots) goes into the checkpoint. What each computes: docs/baselines.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from crma_lightning.adapters.lora import lora_down_weights
from crma_lightning.core.errors import ConfigError
from crma_lightning.methods.protocol import ContinualModule


# -- the maths ---------------------------------------------------------------------------------
def ewc_penalty(params: list[Tensor], anchors: list[Tensor], fisher: list[Tensor]) -> Tensor:
    """``1/2 * sum_i F_i * (theta_i - theta*_i)^2`` over every element of every parameter."""
    total = params[0].new_zeros(())
    for p, a, f in zip(params, anchors, fisher, strict=True):
        total = total + (f * (p - a) ** 2).sum()
    return 0.5 * total


def orthogonality(earlier: list[Tensor], new: Tensor) -> Tensor:
    """``sum_i |A_i A_new^T|_1``: LoRA down-projections ``(r, d)``; 0 when the row spaces are orthogonal."""
    total = new.new_zeros(())
    for a in earlier:
        total = total + (a @ new.T).abs().sum()  # (r_i, r)
    return total


def distillation(student: Tensor, teacher: Tensor, mask: Tensor, temperature: float) -> Tensor:
    """Summed over positions with ``mask`` 1: ``T^2 * KL(softmax(teacher/T) || softmax(student/T))``.

    ``student``, ``teacher`` ``(..., V)`` logits; ``mask`` ``(...)``. The ``T^2`` keeps gradient
    magnitudes comparable across temperatures (Hinton et al. 2015).
    """
    t = temperature
    log_p_student = F.log_softmax(student.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # (...)
    return t * t * (kl * mask).sum()


# -- the parts ---------------------------------------------------------------------------------
class Regularizer:
    """A term added to the training loss, with hooks at task boundaries. Subclasses set ``name``."""

    name: ClassVar[str] = "regularizer"
    reads_logits: ClassVar[bool] = False
    """True when :meth:`penalty` reads the logits (the training step then forms them: model.fused_loss)."""

    def problems(self, module: ContinualModule) -> list[str]:
        """What makes this regulariser meaningless with the module's layout (one line each)."""
        return []

    def on_task_start(self, module: ContinualModule, task: str) -> None:
        """Before the first step of ``task`` (not the first task's only)."""

    def on_task_end(
        self, module: ContinualModule, task: str, batches: Iterable[dict[str, Tensor]], reduce
    ) -> None:
        """After ``task``'s last step; ``batches`` are this rank's share of a fixed batching of its
        training set, ``reduce(tensor)`` sums a tensor over ranks."""

    def penalty(
        self, module: ContinualModule, batch: dict[str, Tensor], logits: Tensor | None, tokens: Tensor
    ) -> Tensor | None:
        """The term for this step (None: nothing yet). ``tokens`` is the global count of scored
        tokens; ``logits`` is None unless the class sets ``reads_logits``."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def penalties(
    module: ContinualModule, batch: dict[str, Tensor], logits: Tensor | None, tokens: Tensor
) -> Tensor | None:
    """The sum of every regulariser's term for this step (None without one), each logged as
    ``train/reg/<name>``."""
    total = None
    for reg in module.regularizers:
        term = reg.penalty(module, batch, logits, tokens)
        if term is not None:
            module.log(f"train/reg/{reg.name}", term.detach(), batch_size=1)
            total = term if total is None else total + term
    return total


def _shared_problems(name: str, module: ContinualModule) -> list[str]:
    if module.layout.shared_lora or module.layout.crma:
        return []
    return [
        f"model.regularizers: {name} protects parameters shared across tasks, and model.strategy "
        f"{module.strategy!r} has none (each task has its own LoRA); use naive or modular"
    ]


class EWC(Regularizer):
    """Elastic weight consolidation on the parameters shared across tasks."""

    name = "ewc"

    def __init__(self, weight: float = 1000.0, max_batches: int | None = None):
        """
        Args:
            weight: lambda, the strength of the quadratic penalty.
            max_batches: estimate the Fisher from at most this many of the task's training batches
                (global count; None: all of them).
        """
        if not weight >= 0:
            raise ConfigError(f"model.regularizers: EWC weight must be >= 0 (got {weight})")
        self.weight = weight
        self.max_batches = max_batches
        self.fisher: list[Tensor] = []
        self.anchors: list[Tensor] = []

    def problems(self, module: ContinualModule) -> list[str]:
        return _shared_problems("EWC", module)

    def on_task_end(self, module, task, batches, reduce) -> None:
        params = module.shared_parameters()
        sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        count = torch.zeros((), dtype=torch.float64, device=params[0].device)
        was_training = module.training
        module.eval()  # no dropout: the Fisher of the model as it is
        try:
            with torch.enable_grad():
                for batch in batches:
                    stats = module.token_stats(batch, accuracy=False)
                    grads = torch.autograd.grad(stats.loss_sum / stats.tokens.clamp_min(1), params)
                    for s, g in zip(sums, grads, strict=True):
                        s += g.float() ** 2
                    count += 1
        finally:
            module.train(was_training)
        count = reduce(count)
        fisher = [reduce(s) / count.clamp_min(1).float() for s in sums]
        self.fisher = fisher if not self.fisher else [a + b for a, b in zip(self.fisher, fisher, strict=True)]
        self.anchors = [p.detach().float().clone() for p in params]

    def penalty(self, module, batch, logits, tokens) -> Tensor | None:
        if not self.fisher:
            return None
        params = module.shared_parameters()
        fisher = [f.to(p.device) for f, p in zip(self.fisher, params, strict=True)]
        anchors = [a.to(p.device) for a, p in zip(self.anchors, params, strict=True)]
        return self.weight * ewc_penalty(list(params), anchors, fisher)

    def state_dict(self) -> dict[str, Any]:
        return {"fisher": [f.cpu() for f in self.fisher], "anchors": [a.cpu() for a in self.anchors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.fisher, self.anchors = list(state.get("fisher", [])), list(state.get("anchors", []))


class LwF(Regularizer):
    """Learning without forgetting: distil the model as it was at the task boundary on the new inputs."""

    name = "lwf"
    reads_logits = True

    def __init__(self, weight: float = 1.0, temperature: float = 2.0):
        """
        Args:
            weight: strength of the distillation term.
            temperature: softmax temperature T of both distributions.
        """
        if not weight >= 0 or not temperature > 0:
            raise ConfigError(
                f"model.regularizers: LwF needs weight >= 0 and temperature > 0 (got {weight}, {temperature})"
            )
        self.weight = weight
        self.temperature = temperature
        self.snapshot: list[Tensor] = []

    def problems(self, module: ContinualModule) -> list[str]:
        return _shared_problems("LwF", module)

    def on_task_start(self, module, task) -> None:
        self.snapshot = [p.detach().clone() for p in module.shared_parameters()]

    @torch.no_grad()
    def teacher_logits(self, module: ContinualModule, batch: dict[str, Tensor]) -> Tensor:
        """The boundary model's logits: one no-grad forward with the shared parameters replaced by
        their snapshot for the call (``torch.func.functional_call``; the live ones are untouched,
        so the student's autograd graph stays valid)."""
        names = {id(p): n for n, p in module.model.named_parameters()}
        swapped = {
            names[id(p)]: s.to(p.device)
            for p, s in zip(module.shared_parameters(), self.snapshot, strict=True)
        }
        kwargs = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch.get("attention_mask"),
            "use_cache": False,
        }
        return torch.func.functional_call(module.model, swapped, (), kwargs).logits

    def penalty(self, module, batch, logits, tokens) -> Tensor | None:
        if not self.snapshot:
            return None
        teacher = self.teacher_logits(module, batch)
        mask = (batch["labels"][:, 1:] != -100).float()
        if "example_weight" in batch:
            mask = mask * batch["example_weight"].float()[:, None]
        kl = distillation(logits[:, :-1], teacher[:, :-1], mask, self.temperature)
        # Normalised like the loss (the global token mean under DDP; see ContinualModule.training_step).
        return self.weight * kl * module.trainer.world_size / tokens.clamp_min(1)

    def state_dict(self) -> dict[str, Any]:
        return {"snapshot": [s.cpu() for s in self.snapshot]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.snapshot = list(state.get("snapshot", []))


class OrthogonalLoRA(Regularizer):
    """O-LoRA: the new task's LoRA orthogonal to every earlier task's, and small."""

    name = "olora"

    def __init__(self, l1: float = 0.5, l2: float = 0.0):
        """
        Args:
            l1: weight of the orthogonality term sum_i |A_i A_t^T|_1.
            l2: weight of the squared norm of the new task's LoRA.
        """
        if not l1 >= 0 or not l2 >= 0:
            raise ConfigError(f"model.regularizers: OrthogonalLoRA needs l1, l2 >= 0 (got {l1}, {l2})")
        self.l1 = l1
        self.l2 = l2

    def problems(self, module: ContinualModule) -> list[str]:
        if module.layout.shared_lora:
            return [
                "model.regularizers: OrthogonalLoRA keeps each task's LoRA orthogonal to the earlier ones, "
                f"and model.strategy {module.strategy!r} has one shared LoRA; use inc_lora (O-LoRA) or frozen"
            ]
        return []

    def penalty(self, module, batch, logits, tokens) -> Tensor | None:
        task = module.current_task()
        index = module.task_names.index(task)
        down = {
            t: lora_down_weights(module.model, t) for t in module.task_names[: index + 1]
        }  # A (r, d) per layer
        new = down[task]
        total = tokens.new_zeros((), dtype=torch.float32)
        if self.l1 and index > 0:
            for layer, a_new in enumerate(new):
                total = total + self.l1 * orthogonality(
                    [down[t][layer].detach() for t in module.task_names[:index]], a_new
                )
        if self.l2:
            total = total + self.l2 * sum(
                (p.float() ** 2).sum() for p in module.adapter_parameters("lora", task)
            )
        return total
