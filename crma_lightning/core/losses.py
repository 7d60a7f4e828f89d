"""The next-token loss, in one place: training, evaluation, routing and the benchmarks use it.

Labels follow the data pipeline's convention (``crma_lightning.data``): they are NOT shifted, so
position t of the logits predicts ``labels[:, t + 1]``, and ``IGNORE_INDEX`` (-100) marks tokens
that are not scored (padding, prompt tokens). The loss is computed in float32 whatever the model's
dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
"""Label value that the loss skips (``torch.nn.functional.cross_entropy``'s default ``ignore_index``)."""


@dataclass
class TokenLosses:
    """Per position of a batch, ``(B, T - 1)`` each: what position t predicts about token t + 1."""

    nll: Tensor
    """Next-token negative log-likelihood (float32; 0 where unscored)."""
    scored: Tensor
    """1.0 where the target token is scored, else 0.0 (float32)."""
    correct: Tensor | None
    """1.0 where the argmax prediction equals the target (float32); None when not asked for."""


@dataclass
class TokenStats:
    """Sums over the scored tokens of a batch (weighted by ``example_weight`` when given)."""

    loss_sum: Tensor
    tokens: Tensor
    correct: Tensor | None
    """None when accuracy was not asked for (training: the argmax over the vocabulary is skipped)."""
    rows: Tensor | None = None
    """``(B, 2)``: each example's own loss sum and token count, with accuracy (evaluation) only."""


def next_targets(labels: Tensor) -> Tensor:
    """Unshifted ``labels (B, T)`` -> what each position predicts, ``(B, T)``: ``labels[:, t + 1]``,
    and ``IGNORE_INDEX`` for the last position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def row_losses(logits: Tensor, targets: Tensor, accuracy: bool = True) -> TokenLosses:
    """Per row of ``logits (N, V)`` against already-shifted ``targets (N,)``: the float32 loss (0
    where unscored), scored and (unless ``accuracy=False``) argmax-correct."""
    nll = F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    scored = (targets != IGNORE_INDEX).float()
    return TokenLosses(nll, scored, (logits.argmax(-1) == targets).float() if accuracy else None)


def token_losses(logits: Tensor, labels: Tensor, accuracy: bool = True) -> TokenLosses:
    """``logits (B, T, V)`` and unshifted ``labels (B, T)`` -> per-position next-token losses.

    ``accuracy=False`` skips the argmax over the vocabulary (a pass over the (B, T, V) logits).
    """
    B, T, V = logits.shape
    # The targets move left instead of the logits (position t scored against labels[:, t + 1]), so
    # the loss reads the logits as one row-major (B * T, V) view, as transformers' own loss does.
    rows = row_losses(logits.reshape(B * T, V), next_targets(labels).reshape(-1), accuracy)

    def cut(x: Tensor | None) -> Tensor | None:  # (B * T,) -> (B, T - 1): the last position scores nothing
        return None if x is None else x.view(B, T)[:, :-1]

    return TokenLosses(cut(rows.nll), cut(rows.scored), cut(rows.correct))


def token_stats(
    logits: Tensor, labels: Tensor, example_weight: Tensor | None = None, accuracy: bool = True
) -> TokenStats:
    """Summed next-token loss, scored-token count and (unless ``accuracy=False``) correct
    predictions of a batch.

    ``example_weight (B,)`` scales each example's tokens (0 drops padding examples that only keep
    ranks' batch counts equal).
    """
    t = token_losses(logits, labels, accuracy)
    mask = t.scored
    if example_weight is not None:
        mask = mask * example_weight.float()[:, None]
    correct = (t.correct * mask).sum() if t.correct is not None else None
    rows = torch.stack([(t.nll * mask).sum(1), mask.sum(1)], -1) if accuracy else None
    return TokenStats((t.nll * mask).sum(), mask.sum(), correct, rows)


def sequence_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean next-token loss of each sequence over its scored tokens, ``(B,)`` float32.

    NaN for a sequence with no scored target (e.g. a 1-token prompt): 0 / 0.
    """
    t = token_losses(logits, labels, accuracy=False)
    return (t.nll * t.scored).sum(1) / t.scored.sum(1)


def labels_from_mask(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Score every real token of ``input_ids``: labels equal to the ids, ``IGNORE_INDEX`` on padding."""
    return input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)


class _HeadLoss(torch.autograd.Function):
    """``sum_i w_i * CE(hidden_i @ W^T, target_i)`` over rows, chunk by chunk, with the gradient
    with respect to ``hidden`` computed in the forward pass.

    The ``(N, V)`` logits, their log-softmax and their gradient never exist at once; a
    ``chunk x V`` block does. The head weight is frozen, so no gradient for it is formed.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, weights: Tensor, chunk: int) -> Tensor:
        grad = torch.empty_like(hidden) if hidden.requires_grad else None
        total = hidden.new_zeros((), dtype=torch.float32)
        for s in range(0, hidden.shape[0], chunk):
            logp = F.log_softmax(
                F.linear(hidden[s : s + chunk].to(weight.dtype), weight).float(), -1
            )  # (c, V)
            t, w = targets[s : s + chunk], weights[s : s + chunk]
            safe = t.clamp_min(0)[:, None]
            nll = -logp.gather(1, safe)[:, 0]
            total = total + torch.where(w != 0, nll * w, 0.0).sum()
            if grad is not None:
                p = logp.exp_()  # the softmax, in place of the log-softmax
                p.scatter_add_(1, safe, torch.full_like(nll[:, None], -1.0))
                grad[s : s + chunk] = ((p.to(weight.dtype) @ weight) * w[:, None]).to(grad.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None


def head_token_stats(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    example_weight: Tensor | None = None,
    accuracy: bool = False,
    chunk: int = 512,
) -> TokenStats:
    """:func:`token_stats` from the final hidden states ``(B, T, D)`` and the frozen output head's
    weight ``(V, D)`` instead of the logits: the loss, its gradient and (``accuracy``, evaluation
    only: no gradient) the argmax are formed ``chunk`` positions at a time (:class:`_HeadLoss`).
    Equal to ``token_stats(hidden @ weight.T, labels, example_weight, accuracy)`` up to float
    summation order."""
    B, T, D = hidden.shape
    targets = next_targets(labels)
    mask = (targets != IGNORE_INDEX).float()
    if example_weight is not None:
        mask = mask * example_weight.float()[:, None]
    h, t, w = hidden.reshape(B * T, D), targets.reshape(-1), mask.reshape(-1)
    if not accuracy:
        return TokenStats(_HeadLoss.apply(h, weight, t, w, chunk), mask.sum(), None)
    if torch.is_grad_enabled() and hidden.requires_grad:
        raise ValueError("head_token_stats: accuracy=True is for evaluation, under torch.no_grad()")
    loss_sum = correct = hidden.new_zeros((), dtype=torch.float32)
    nll = hidden.new_zeros(B * T, dtype=torch.float32)  # each position's weighted loss, for ``rows``
    for s in range(0, B * T, chunk):
        logits = F.linear(h[s : s + chunk].to(weight.dtype), weight)
        ws = w[s : s + chunk]
        stats = row_losses(logits, t[s : s + chunk])
        nll[s : s + chunk] = stats.nll * ws
        loss_sum = loss_sum + nll[s : s + chunk].sum()
        correct = correct + (stats.correct * ws).sum()
    return TokenStats(loss_sum, mask.sum(), correct, torch.stack([nll.view(B, T).sum(1), mask.sum(1)], -1))
