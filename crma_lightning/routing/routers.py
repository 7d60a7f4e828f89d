"""Routing without a task id from the frozen base model's features: the maths.

Per task k the float64 sufficient statistics (n_k, s_k, S_k) of pooled frozen-base features;
the router is linear discriminant analysis with one shared, shrunk covariance (docs/decisions.md).
docs/inference.md ("Routing") describes the use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

Pooling = Literal["mean", "last"]

SHORTEST_PREFIX = 4
"""Shortest prefix (tokens) whose feature enters a task's statistics."""

JITTER = 1e-9
"""Relative ridge added to the shrunk covariance (times its mean variance), so that a feature that
never varies (a dead dimension) cannot make it singular."""


# -- prompts and pooling -----------------------------------------------------------------------
def prefix_lengths(n: int, shortest: int = SHORTEST_PREFIX) -> list[int]:
    """The prefix lengths of an ``n``-token text whose features are gathered: the powers of two from
    ``shortest`` below ``n``, and ``n`` itself (``n = 64``: 4, 8, 16, 32, 64; ``n = 3``: 3)."""
    if n < 1:
        raise ValueError(f"a prompt has at least one token, got n = {n}")
    out, p = [], shortest
    while p < n:
        out.append(p)
        p *= 2
    return [*out, n]


def prefix_pool(hidden: Tensor, lengths: Tensor, pooling: Pooling = "mean") -> Tensor:
    """Pooled features of prefixes: ``hidden (B, T, D)``, ``lengths (B, M)`` int (0 = no prefix)
    -> ``(B, M, D)`` float64, row (b, m) pooling the first ``lengths[b, m]`` tokens of sequence b
    (zeros where the length is 0). Right padding only: a prefix never reaches the padding."""
    if pooling not in ("mean", "last"):
        raise ValueError(f"pooling must be 'mean' or 'last', got {pooling!r}")
    h = hidden.double()
    batch, _, dim = h.shape
    index = (lengths.long() - 1).clamp_min(0)[..., None].expand(batch, -1, dim)  # (B, M, D)
    if pooling == "last":
        out = h.gather(1, index)
    else:
        out = h.cumsum(1).gather(1, index) / lengths.clamp_min(1)[..., None].double()
    return out * (lengths > 0)[..., None]


# -- per-task sufficient statistics ------------------------------------------------------------
@dataclass(frozen=True)
class FeatureSums:
    """Weighted count, sum and sum of outer products of one task's features, float64."""

    count: Tensor
    """``()``: total weight (number of features when every weight is 1)."""
    total: Tensor
    """``(D,)``: sum of the features."""
    outer: Tensor
    """``(D, D)``: sum of the features' outer products."""

    @property
    def dim(self) -> int:
        return self.total.shape[0]

    @property
    def mean(self) -> Tensor:
        return self.total / self.count

    @staticmethod
    def zeros(dim: int, device: torch.device | str | None = None) -> FeatureSums:
        z = torch.zeros((), dtype=torch.float64, device=device)
        return FeatureSums(
            z,
            torch.zeros(dim, dtype=torch.float64, device=device),
            torch.zeros(dim, dim, dtype=torch.float64, device=device),
        )

    def __add__(self, other: FeatureSums) -> FeatureSums:
        return FeatureSums(self.count + other.count, self.total + other.total, self.outer + other.outer)

    def flat(self) -> Tensor:
        """All three in one ``(1 + D + D*D,)`` tensor: one all-reduce instead of three."""
        return torch.cat([self.count.reshape(1), self.total, self.outer.reshape(-1)])

    @staticmethod
    def from_flat(flat: Tensor, dim: int) -> FeatureSums:
        flat = flat.double()
        return FeatureSums(flat[0], flat[1 : 1 + dim], flat[1 + dim :].reshape(dim, dim))

    def tensors(self) -> dict[str, Tensor]:
        """For a safetensors file (contiguous, on the CPU)."""
        return {
            "count": self.count.reshape(1).cpu(),
            "total": self.total.contiguous().cpu(),
            "outer": self.outer.contiguous().cpu(),
        }

    @staticmethod
    def from_tensors(t: dict[str, Tensor]) -> FeatureSums:
        return FeatureSums(t["count"].double().reshape(()), t["total"].double(), t["outer"].double())


def feature_sums(x: Tensor, weight: Tensor | None = None) -> FeatureSums:
    """The statistics of features ``x (N, D)``, each weighted by ``weight (N,)`` (default 1)."""
    x = x.double()
    w = torch.ones(x.shape[0], dtype=torch.float64, device=x.device) if weight is None else weight.double()
    wx = x * w[:, None]  # (N, D)
    return FeatureSums(w.sum(), wx.sum(0), wx.T @ x)


# -- the shared-covariance classifier ----------------------------------------------------------
def pooled_covariance(sums: Sequence[FeatureSums]) -> Tensor:
    """Within-task covariance shared by all tasks, ``(D, D)``: the scatter of every task's features
    around its own mean, over ``sum_k n_k - K`` degrees of freedom (at least 1)."""
    scatter = sum(s.outer - s.count * torch.outer(s.mean, s.mean) for s in sums)
    dof = max(float(sum(s.count for s in sums)) - len(sums), 1.0)
    cov = scatter / dof
    return (cov + cov.T) / 2  # exactly symmetric (the subtraction rounds each side on its own)


def shrink(cov: Tensor, shrinkage: float) -> Tensor:
    """``(1 - l) C + l diag(C)``: the off-diagonal covariances pulled toward 0, variances kept."""
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
    return (1 - shrinkage) * cov + shrinkage * torch.diag(torch.diagonal(cov))


@dataclass(frozen=True)
class LinearRouter:
    """``scores = x @ weight + bias``, one column per task: the LDA discriminants g_k."""

    weight: Tensor
    """``(D, K)`` float64: C_l^-1 mu_k per column."""
    bias: Tensor
    """``(K,)`` float64: -mu_k^T C_l^-1 mu_k / 2."""

    def scores(self, x: Tensor) -> Tensor:
        """``(N, D)`` features -> ``(N, K)`` discriminants (float64)."""
        return x.double().to(self.weight.device) @ self.weight + self.bias


def fit_lda(sums: Sequence[FeatureSums], shrinkage: float) -> LinearRouter:
    """The shared-covariance discriminant of the tasks whose statistics are ``sums`` (in order)."""
    if not sums:
        raise ValueError("need the statistics of at least one task")
    if any(float(s.count) <= 0 for s in sums):
        raise ValueError("every task needs features with positive total weight")
    means = torch.stack([s.mean for s in sums])  # (K, D)
    cov = shrink(pooled_covariance(sums), shrinkage)
    scale = float(torch.diagonal(cov).mean()) or 1.0
    cov = cov + JITTER * scale * torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device)
    factor = torch.linalg.cholesky(cov)
    weight = torch.cholesky_solve(means.T, factor)  # (D, K) = C_l^-1 mu_k
    bias = -0.5 * (means.T * weight).sum(0)  # (K,)
    return LinearRouter(weight, bias)


# -- decisions ---------------------------------------------------------------------------------
def posterior(scores: Tensor) -> Tensor:
    """``(N, K)`` discriminants or log-likelihoods -> task probabilities under uniform priors.
    Rows with a NaN stay NaN (no decision possible)."""
    return torch.softmax(scores.double(), dim=1)


def loss_scores(losses: Tensor, tokens: Tensor) -> Tensor:
    """Log-likelihood of each prompt under each task's adapter, ``(N, K)``, from the mean next-token
    losses ``(N, K)`` and the number of predicted tokens per prompt ``(N,)``: the loss router's
    scores, whose posterior is Bayes' rule over the adapters as models of the prompt."""
    return -losses.double() * tokens.double()[:, None]


def decide(scores: Tensor) -> tuple[Tensor, Tensor]:
    """``(N, K)`` scores -> the chosen task index ``(N,)`` and its posterior probability ``(N,)``
    (the confidence, in [1/K, 1]; NaN for a row with a NaN score)."""
    p = posterior(scores)
    confidence, choice = torch.nan_to_num(p, nan=-1.0).max(dim=1)
    return choice, torch.where(confidence < 0, torch.nan, confidence)
