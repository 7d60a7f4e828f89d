"""A training step's gradients: the non-finite policy and the per-group norms before clipping.

Mixed into :class:`crma_lightning.training.module.ContinualLM` (``model.nonfinite``). A non-finite
loss on any rank makes every rank take a zero-weighted step, whose gradients are dropped before the
optimizer moves anything, as is a non-finite gradient. The norms are computed once per optimizer
step, for whichever asks first, and are global (the same on every rank, under DDP and FSDP2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from crma_lightning.backbone.sharding import average_replicated_grads
from crma_lightning.methods.protocol import GradNorms

__all__ = ["GradientSteps", "NonFiniteError", "global_grad_norm"]


class NonFiniteError(RuntimeError):
    """Training met a NaN/inf loss or gradient and ``model.nonfinite`` is 'stop'."""


def global_grad_norm(params: list[nn.Parameter], device: torch.device | None = None) -> Tensor:
    """The 2-norm of the gradients of ``params``, whole: FSDP2 shards (DTensors) are combined
    across ranks (a collective), whole gradients (DDP after its all-reduce, FSDP2's replicated
    0-dim parameters) are used as they are. 0 (on ``device``) for an empty list."""
    sharded = [p.grad for p in params if isinstance(p.grad, DTensor)]
    whole = [p.grad for p in params if not isinstance(p.grad, DTensor)]
    parts = []
    if sharded:
        norm = torch.nn.utils.get_total_norm(sharded, foreach=False)
        parts.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    if whole:
        parts.append(torch.nn.utils.get_total_norm(whole, foreach=False))
    if not parts:
        return torch.zeros((), device=device)
    return parts[0] if len(parts) == 1 else torch.linalg.vector_norm(torch.stack(parts))


def _drop_grads(params: list[nn.Parameter]) -> None:
    for p in params:
        p.grad = None


class GradientSteps:
    """The module's gradient hooks; needs ``nonfinite``, ``nonfinite_skipped``, ``crma``,
    ``adapter_parameters`` and the FSDP2 bookkeeping (``_replicated``, ``_dp_mesh``) set by
    ``configure_model``, and ``_skip_step`` set by ``training_step``."""

    _skip_step = False  # set by training_step on a non-finite loss
    _window_tokens: Tensor | None = None  # scored tokens of an accumulation window (training_step)
    _grad_norms: GradNorms | None = None  # this optimizer step's (gradient_norms)
    _grad_norms_step = -1

    def _nonfinite(self, what: str) -> None:
        """Stop with a clear error, or count a skipped step (model.nonfinite)."""
        step = self.trainer.global_step
        if self.nonfinite == "stop":
            raise NonFiniteError(
                f"non-finite {what} at step {step}; stopped (the last checkpoint is kept). Lower the "
                "learning rates (model.lr.*), clip gradients (trainer.gradient_clip_val), or set "
                "model.nonfinite: skip."
            )
        self.nonfinite_skipped += 1
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), batch_size=1)

    def gradient_norms(self) -> GradNorms | None:
        """This optimizer step's gradient norms, before any clipping; None when the step is skipped.

        Computed once per step by whichever asks first (a clipping callback's or this module's
        ``on_before_optimizer_step``): FSDP2's replicated gradients are averaged, a step with a
        non-finite loss or gradient drops every gradient (the optimizer then moves nothing) and
        returns None, and the norms are global: after the all-reduce (DDP) or over all shards
        (FSDP2), so the same on every rank.
        """
        step = self.trainer.global_step
        if self._grad_norms_step != step:
            self._grad_norms_step = step
            self._grad_norms = self._reduce_and_measure_gradients()
        return self._grad_norms

    def _reduce_and_measure_gradients(self) -> GradNorms | None:
        if self._replicated:
            average_replicated_grads(self._replicated, self._dp_mesh)
        lora = [p for p in self.adapter_parameters("lora") if p.grad is not None]
        crma = [p for p in self.adapter_parameters("crma") if p.grad is not None]
        window, self._window_tokens = self._window_tokens, None
        if self._skip_step:  # a non-finite loss on some rank (training_step): no update anywhere
            self._skip_step = False
            _drop_grads(lora + crma)
            return None
        if window is not None:  # accumulated sums: the window's token mean (training_step)
            scale = 1.0 / max(float(window), 1.0)
            for p in lora + crma:
                p.grad.mul_(scale)
        if not lora and not crma:
            return None
        device = (lora + crma)[0].grad.device
        lora_norm = global_grad_norm(lora, device)
        crma_norm = global_grad_norm(crma, device) if self.crma is not None else None
        total = (
            lora_norm if crma_norm is None else torch.linalg.vector_norm(torch.stack([lora_norm, crma_norm]))
        )
        if not torch.isfinite(total):
            self._nonfinite("gradient")
            _drop_grads(lora + crma)  # no gradient: the optimizer leaves these parameters untouched
            return None
        return GradNorms(lora=lora_norm, crma=crma_norm, total=total)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        norms = self.gradient_norms()
        if norms is None:
            return
        # Tensors, not floats: Lightning reads them when it logs, so no extra host sync per step.
        self.log("train/grad_norm", norms.total, batch_size=1)
        self.log("train/grad_norm/lora", norms.lora, batch_size=1)
        if norms.crma is not None:
            self.log("train/grad_norm/crma", norms.crma, batch_size=1)
