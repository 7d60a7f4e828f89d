"""Distributed helpers used across the library: whole tensors from shards, small all-gathers.

One place for "give me the whole tensor": under FSDP2 parameters are ``DTensor`` shards and
``full_tensor()`` is a collective that every rank must call; elsewhere it is the tensor itself.
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor: gathered from every rank for a ``DTensor`` (a collective), else ``t``."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def whole_cpu(t: Tensor) -> Tensor:
    """``t`` detached, whole (see :func:`full_tensor`), contiguous, on the CPU: ready to save or hash."""
    return full_tensor(t.detach()).contiguous().cpu()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather_strings(mine: str) -> list[str]:
    """Every rank's ``mine``, in rank order (``[mine]`` without a process group). A collective."""
    if not is_distributed():
        return [mine]
    out: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return [str(x) for x in out]
