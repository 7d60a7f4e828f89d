"""Projection of mixing logits onto (sub-)doubly-stochastic matrices, with a certified spectral bound.

Pure functions over tensors, batched over any leading dimensions, so all layers' ``(L, n, n)``
logits are projected in one call. Reference: CRMA, arXiv 2606.00382 (docs/method.md §5); the exact
Birkhoff construction follows mHC-lite, arXiv 2601.05732.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

ProjectionKind = Literal["sinkhorn", "birkhoff"]

#: Largest n for the Birkhoff construction: n! permutation matrices are materialised (5! = 120).
MAX_BIRKHOFF_N = 5


@dataclass(frozen=True)
class Diagnostics:
    """Per-matrix health of a projected mixing matrix, in float64; every field has the batch shape of M."""

    row_err: Tensor
    """max_i |sum_j M_ij - 1|."""
    col_err: Tensor
    """max_j |sum_i M_ij - 1|."""
    rescale: Tensor
    """The certifying divisor c (1 when the projection was already inside the bound with the margin)."""
    sigma_max: Tensor
    """Spectral norm ||M||_2 of M as stored (float64 SVD)."""
    sigma_2: Tensor
    """Second singular value; -> 0 means collapse toward the uniform matrix J/n."""


def _float32(logits: Tensor) -> Tensor:
    # Float32 even under bf16/fp16 autocast: in bf16 the row/column sums are lost.
    return logits.to(torch.float32)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """``torch.autocast(device_type, enabled=False)`` when autocast is on there, else a no-op
    (entering an autocast context costs as much as a few kernels at ``(L, 4, 4)``)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


#: Relative margin of the certifying divisor (see :func:`certify`).
CERTIFY_MARGIN = 2.0**-21


def certify(m: Tensor, *, detach_rescale: bool = False) -> tuple[Tensor, Tensor]:
    """Divide non-negative float32 (or float64) ``m (..., n, n)`` by ``c = max(b (1 + 2^-21), 1)``.

    ``b`` is the largest row or column sum of ``m``, summed in float64. Returns ``(m / c, c)``, ``c``
    float64 of shape ``(...)``. Every row and column of the returned matrix, as stored, sums to less
    than 1, hence ``||m / c||_2 < 1``; a matrix already inside the bound with room to spare is
    returned unchanged (``c == 1``). ``detach_rescale`` treats ``c`` as a constant in the backward
    (for a ``c`` whose gradient is zero in exact arithmetic, as Birkhoff's).
    """
    # The margin outlasts every float32/float64 rounding on the way (docs/decisions.md).
    if m.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"certify needs a float32 or float64 matrix, got {m.dtype}")
    with torch.no_grad() if detach_rescale else contextlib.nullcontext():
        m64 = m.to(torch.float64)
        b = torch.maximum(m64.sum(dim=-1), m64.sum(dim=-2)).amax(dim=-1)  # (...)
        c = b.mul(1 + CERTIFY_MARGIN).clamp_min(1.0)
    return m / c.to(m.dtype).view(*c.shape, 1, 1), c


def _iterates(x: Tensor, iters: int) -> list[Tensor]:
    """The ``2 * iters`` log-domain half-iterations of ``x (..., n, n)``, alternately rows and columns.

    ``log_softmax(x, dim)`` is ``x - logsumexp(x, dim)`` in one kernel: rows (then columns) of
    ``exp`` of the result sum to 1.
    """
    out = []
    for _ in range(iters):
        x = torch.log_softmax(x, dim=-1)  # rows sum to 1
        out.append(x)
        x = torch.log_softmax(x, dim=-2)  # columns sum to 1
        out.append(x)
    return out


class _LogSinkhorn(torch.autograd.Function):
    """``exp`` of the last Sinkhorn iterate of float32 ``x (..., n, n)``; the backward replays the iterations.

    Autograd of the unrolled loop records ``2K + 1`` nodes and stores every iterate. This Function
    stores the same iterates (each half-step's backward needs its own output) but no graph, and its
    backward calls ``torch._log_softmax_backward_data``, the kernel autograd's ``LogSoftmaxBackward``
    uses, in the same order: the gradient is bit-identical to autograd's (tested).
    """

    @staticmethod
    def forward(ctx, x: Tensor, iters: int) -> Tensor:
        its = _iterates(x, iters)
        m = its[-1].exp()
        ctx.save_for_backward(m, *its)
        return m

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_m: Tensor) -> tuple[Tensor, None]:
        m, *its = ctx.saved_tensors
        g = grad_m * m  # through exp
        for i in reversed(range(len(its))):
            dim = -1 if i % 2 == 0 else -2
            g = torch._log_softmax_backward_data(g, its[i], dim, g.dtype)
        return g, None


def sinkhorn(
    logits: Tensor, iters: int = 20, tau: float = 1.0, *, certified: bool = True, custom_backward: bool = True
) -> Tensor:
    """Log-domain Sinkhorn–Knopp: ``(..., n, n)`` logits -> doubly (sub-)stochastic matrices.

    Computed in float32 with autocast disabled; the result is float32. ``tau`` is the temperature
    (smaller = closer to a permutation). With ``certified`` the output goes through :func:`certify`:
    its spectral norm, as stored in float32, is provably below 1.
    ``custom_backward=False`` differentiates the unrolled iterations with autograd instead of
    :class:`_LogSinkhorn`: the same values and gradients, slower, but twice differentiable and
    traceable by ``torch.compile``.
    """
    if iters < 1:
        raise ValueError(f"sinkhorn iters must be >= 1, got {iters}")
    if tau <= 0:
        raise ValueError(f"sinkhorn tau must be > 0, got {tau}")
    with autocast_off(logits.device.type):
        x = _float32(logits) / tau
        m = _LogSinkhorn.apply(x, iters) if custom_backward else _iterates(x, iters)[-1].exp()
        if certified:
            m, _ = certify(m)
    return m


@cache
def _permutation_matrices(n: int) -> Tensor:
    perms = list(itertools.permutations(range(n)))
    eye = torch.eye(n)
    return torch.stack([eye[list(p)] for p in perms])  # (n!, n, n)


def permutation_matrices(n: int, device: torch.device | str | None = None) -> Tensor:
    """All ``n!`` permutation matrices of size n, shape ``(n!, n, n)``, float32 (n <= 5)."""
    if not 1 <= n <= MAX_BIRKHOFF_N:
        raise ValueError(
            f"the Birkhoff projection enumerates all n! permutations and supports n <= {MAX_BIRKHOFF_N} "
            f"(got n={n}, {math.factorial(n) if n < 13 else 'too many'} permutations); "
            "use projection 'sinkhorn' for more streams"
        )
    return _permutation_matrices(n).to(device)


def birkhoff(logits: Tensor, n: int, tau: float = 1.0, *, certified: bool = True) -> Tensor:
    """Doubly-stochastic matrices as convex combinations of permutation matrices, float32.

    ``logits (..., n!)`` -> ``M (..., n, n) = sum_k softmax(logits / tau)_k P_k``: doubly stochastic
    by construction (Birkhoff–von Neumann), but in float32 only up to rounding, so with ``certified``
    the result goes through :func:`certify` as Sinkhorn's does.
    """
    perms = permutation_matrices(n, logits.device)
    if logits.shape[-1] != perms.shape[0]:
        raise ValueError(
            f"birkhoff logits for n={n} need last dim {perms.shape[0]} (= n!), got {logits.shape[-1]}"
        )
    if tau <= 0:
        raise ValueError(f"birkhoff tau must be > 0, got {tau}")
    with autocast_off(logits.device.type):
        w = torch.softmax(_float32(logits) / tau, dim=-1)
        m = torch.einsum("...k,kij->...ij", w, perms)
        if certified:
            # Every row and column sums to sum_k w_k = 1 for any logits: c's gradient is zero.
            m, _ = certify(m, detach_rescale=True)
    return m


def logits_shape(kind: ProjectionKind, n: int) -> tuple[int, ...]:
    """Shape of one layer's mixing logits for a projection kind."""
    if kind == "sinkhorn":
        return (n, n)
    if kind == "birkhoff":
        permutation_matrices(n)  # raises a clear error above MAX_BIRKHOFF_N
        return (math.factorial(n),)
    raise ValueError(f"unknown projection kind {kind!r}; choose 'sinkhorn' or 'birkhoff'")


def identity_logits(kind: ProjectionKind, n: int, strength: float) -> Tensor:
    """Logits whose projection is close to the identity (``strength`` = logit margin of the identity)."""
    if kind == "sinkhorn":
        return torch.eye(n) * strength
    logits = torch.zeros(logits_shape(kind, n))
    logits[0] = strength  # itertools.permutations yields the identity first
    return logits


def project(
    logits: Tensor, kind: ProjectionKind, n: int, *, iters: int = 20, tau: float = 1.0, compiled: bool = False
) -> Tensor:
    """Dispatch to :func:`sinkhorn` or :func:`birkhoff`, both certified; returns ``(..., n, n)`` float32.

    ``compiled`` runs a ``torch.compile`` of this function instead (opt-in; the first call per
    shape compiles).
    """
    if compiled:
        return _compiled_project()(logits, kind, n, iters=iters, tau=tau)
    if kind == "sinkhorn":
        return sinkhorn(logits, iters=iters, tau=tau, certified=True)
    if kind == "birkhoff":
        return birkhoff(logits, n, tau=tau)
    raise ValueError(f"unknown projection kind {kind!r}; choose 'sinkhorn' or 'birkhoff'")


def _project_unrolled(logits: Tensor, kind: ProjectionKind, n: int, *, iters: int, tau: float) -> Tensor:
    if kind == "sinkhorn":
        return sinkhorn(logits, iters=iters, tau=tau, certified=True, custom_backward=False)
    return project(logits, kind, n, iters=iters, tau=tau)


@cache
def _compiled_project() -> Callable[..., Tensor]:
    # Dynamo traces the unrolled iterations and derives the backward itself; the custom Function's
    # Python backward would be opaque to the compiler.
    return torch.compile(_project_unrolled)


@torch.no_grad()
def diagnostics(m: Tensor, rescale: Tensor | None = None) -> Diagnostics:
    """Row/column errors, spectral norm and second singular value of ``m (..., n, n)`` (docs/method.md §6).

    Computed in float64 from ``m`` as stored (a float32 SVD could report a certified matrix above
    1); the fields are float64. ``rescale`` is the certifying divisor if
    known; otherwise ``max(1, largest row or column sum)``, 1 for any matrix inside the bound.
    """
    m = m.detach().to(torch.float64)
    row, col = m.sum(dim=-1), m.sum(dim=-2)
    if rescale is None:
        rescale = torch.maximum(row, col).amax(dim=-1).clamp_min(1.0)
    sv = torch.linalg.svdvals(m)  # (..., n), descending
    return Diagnostics(
        row_err=(row - 1).abs().amax(dim=-1),
        col_err=(col - 1).abs().amax(dim=-1),
        rescale=rescale,
        sigma_max=sv[..., 0],
        sigma_2=sv[..., 1] if sv.shape[-1] > 1 else torch.zeros_like(sv[..., 0]),
    )


def project_with_diagnostics(
    logits: Tensor, kind: ProjectionKind, n: int, *, iters: int = 20, tau: float = 1.0
) -> tuple[Tensor, Diagnostics]:
    """:func:`project` plus its diagnostics; ``rescale`` is the divisor :func:`certify` applied."""
    if kind == "sinkhorn":
        raw = sinkhorn(logits, iters=iters, tau=tau, certified=False)
    elif kind == "birkhoff":
        raw = birkhoff(logits, n, tau=tau, certified=False)
    else:
        raise ValueError(f"unknown projection kind {kind!r}; choose 'sinkhorn' or 'birkhoff'")
    m, c = certify(raw, detach_rescale=kind == "birkhoff")
    return m, diagnostics(m, rescale=c.detach())
