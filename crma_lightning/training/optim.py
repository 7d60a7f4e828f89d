"""Adam and AdamW on torch's fused kernel by default (the same update up to float rounding)."""

from __future__ import annotations

import inspect

import torch
from torch.distributed.tensor import DTensor

#: Devices torch's fused Adam runs on.
_FUSED_DEVICES = ("cpu", "cuda", "xpu", "mps")


def fused_adam(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` rebuilt with ``fused=True`` when it is a plain Adam or AdamW whose ``foreach``
    and ``fused`` were left unset and every parameter can take the fused kernel (floating point, on
    a supported device, not a DTensor); otherwise ``optimizer`` unchanged."""
    kind = type(optimizer)
    d = optimizer.defaults
    if (
        kind not in (torch.optim.Adam, torch.optim.AdamW)
        or d.get("fused") is not None
        or d.get("foreach") is not None
    ):
        return optimizer
    if d.get("differentiable") or d.get("capturable"):
        return optimizer
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not params or any(
        isinstance(p, DTensor) or not p.is_floating_point() or p.device.type not in _FUSED_DEVICES
        for p in params
    ):
        return optimizer
    accepted = inspect.signature(kind.__init__).parameters
    defaults = {k: v for k, v in d.items() if k in accepted and k != "foreach"}
    groups = [{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in optimizer.param_groups]
    return kind(groups, **{**defaults, "fused": True})
