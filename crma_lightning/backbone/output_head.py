"""Losses without the ``(B, T, V)`` logits: the model runs with its output head as the identity,
and :func:`crma_lightning.core.losses.head_token_stats` forms the loss (in training, its gradient; in
evaluation, the accuracy) from the final hidden states chunk by chunk (``model.fused_loss``).

Taken only where it is exactly the model's own loss: a plain, frozen, bias-free ``nn.Linear`` head
whose output the model returns as the logits (:func:`probe_matches` checks that on a probe batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from crma_lightning.core import losses

#: Model config fields that change the logits after the head (Gemma 2's soft-capping, Cohere's scale).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _identity(x: Tensor) -> Tensor:
    return x


@contextmanager
def head_as_identity(head: nn.Module) -> Iterator[None]:
    """Within the block, ``head(x)`` returns ``x``: the model's "logits" are its final hidden states."""
    head.forward = _identity  # an instance attribute shadows nn.Linear.forward
    try:
        yield
    finally:
        del head.forward


def batch_token_stats(
    forward: Callable[[], Tensor],
    head: nn.Linear | None,
    labels: Tensor,
    example_weight: Tensor | None,
    accuracy: bool,
) -> tuple[losses.TokenStats, Tensor | None]:
    """A batch's token statistics from ``forward()`` (the model's call, returning its logits): with
    ``head``, through the fused head (:func:`crma_lightning.core.losses.head_token_stats`, no logits:
    None in second place); without, from the logits, which are returned too."""
    if head is None:
        logits = forward()
        return losses.token_stats(logits, labels, example_weight, accuracy), logits
    with head_as_identity(head):  # never the (B, T, V) logits at once
        hidden = forward()
    return losses.head_token_stats(hidden, head.weight, labels, example_weight, accuracy), None


def head_problem(model: nn.Module) -> str | None:
    """Why the fused loss cannot be used with ``model`` (None: it can, subject to the probe)."""
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    if type(head) is not nn.Linear:
        return f"the output head is a {type(head).__name__}, not a plain nn.Linear"
    if head.bias is not None:
        return "the output head has a bias"
    if head.weight.requires_grad:
        return "the output head trains"
    if type(head.weight) is not nn.Parameter:  # FSDP's DTensor, bitsandbytes' Params4bit
        return "the output head's weight is sharded or quantised"
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return "the model transforms its logits after the head"
    return None


def probe_matches(model: nn.Module, vocab: int, device: torch.device) -> bool:
    """The head applied to what the model returns with the head as the identity equals the model's
    logits, on a 2 x 16 probe (modules in eval mode, no gradient).

    For the probe the head's weight is scaled by 2**8 (exactly undone after), so that the logits are
    large enough for a transform after the head (a soft-cap at 30, a scale) to show even on a
    randomly initialised model, whose logits are near 0.
    """
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    head = model.get_output_embeddings()
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            head.weight.mul_(256.0)
            logits = model(input_ids=ids, use_cache=False).logits
            with head_as_identity(head):
                hidden = model(input_ids=ids, use_cache=False).logits
            ours = torch.nn.functional.linear(hidden.to(head.weight.dtype), head.weight)
            return hidden.shape[:-1] == logits.shape[:-1] and bool(
                torch.allclose(ours.float(), logits.float(), rtol=1e-3, atol=1e-3)
            )
    finally:
        with torch.no_grad():
            head.weight.div_(256.0)
        for m, training in modes.items():
            m.training = training
