"""Which evaluated cells can be copied instead of scored again: digests of what serves a task.

A cell (split, task) depends on the frozen base, the held-out examples and the tensors that serve
the task: the LoRAs its layout activates for it and CRMA's, when injected. When their bytes are
the same as when the cell was last scored, scoring again would repeat the same computation, so
the evaluation callback copies it (docs/decisions.md, "Evaluation schedules and reuse").
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn

from crma_lightning.adapters.lora import lora_parameters


def tensor_digest(tensors: Iterable[Tensor]) -> str:
    """SHA-256 of the tensors' dtypes, shapes and bytes, in order (this rank's shard of a sharded one)."""
    h = hashlib.sha256()
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard
        local = local.detach()
        h.update(f"{local.dtype}{tuple(local.shape)};".encode())
        h.update(local.contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


class ServingDigests:
    """The digest of what serves each task at one moment (one evaluated row): each LoRA's tensors
    hashed once, whichever tasks it serves."""

    def __init__(self, model: nn.Module, crma: nn.Module | None) -> None:
        self.model = model
        self._lora: dict[str, str] = {}
        # CRMA serves every task alike; whether it is switched on is part of what serves.
        self._crma = (
            "no crma"
            if crma is None
            else f"{getattr(crma, 'enabled', True)}:{tensor_digest(p for p in crma.parameters())}"
        )

    def lora(self, adapter: str) -> str:
        if adapter not in self._lora:
            self._lora[adapter] = tensor_digest(lora_parameters(self.model, adapter))
        return self._lora[adapter]

    def of(self, active: Sequence[str]) -> str:
        """The digest of a task served by the LoRAs ``active`` (none: the base) and CRMA."""
        parts = [self._crma, *(f"{a}={self.lora(a)}" for a in active)]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()
