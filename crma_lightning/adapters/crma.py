"""The CRMA block: a residual adapter whose n x n mixing matrix is (sub-)doubly stochastic.

Reference: CRMA, arXiv 2606.00382; docs/method.md §5. :class:`CRMABlock` is one decoder layer's
adapter; :func:`low_rank_residual` its fused write.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from crma_lightning.adapters.config import CRMAConfig
from crma_lightning.adapters.projection import (
    Diagnostics,
    autocast_off,
    identity_logits,
    project,
    project_with_diagnostics,
)

#: Names of the parameter groups every block declares; freezing, optimizer groups and
#: checkpoints go through :meth:`CRMABlock.param_groups`, never through parameter-name matching.
CRMA_GROUPS = ("crma_proj", "crma_mix", "crma_gate")


class _LowRankResidual(torch.autograd.Function):
    """``h + (h read^T) write^T`` for ``h (N, d)``, ``read (n, d)``, ``write (d, n)``, one dtype.

    Autograd of the same two matmuls would add the two gradients of h in a separate pass over
    ``(N, d)``; here the input gradient is one ``addmm``: ``grad + (grad write) read``.
    """

    @staticmethod
    def forward(ctx, h: Tensor, read: Tensor, write: Tensor) -> Tensor:
        s = h @ read.T  # (N, n)
        ctx.save_for_backward(h, read, write, s)
        return torch.addmm(h, s, write.T)  # (N, d)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        h, read, write, s = ctx.saved_tensors
        need_h, need_read, need_write = ctx.needs_input_grad
        grad_s = grad @ write if need_h or need_read else None  # (N, n)
        grad_h = torch.addmm(grad, grad_s, read) if need_h else None  # (N, d)
        grad_read = grad_s.T @ h if need_read else None  # (n, d)
        # (s^T grad)^T, not grad^T s: a (d, n) GEMM output with n = 4 columns is several times slower.
        grad_write = (s.T @ grad).T if need_write else None  # (d, n)
        return grad_h, grad_read, grad_write


def low_rank_residual(h: Tensor, read: Tensor, write: Tensor, *, custom_backward: bool = True) -> Tensor:
    """``h + write @ (read @ h)`` per token: ``h (..., d)``, ``read (n, d)``, ``write (d, n)``, one dtype.

    Exactly ``h`` when ``write`` is zero. ``custom_backward=False`` lets autograd differentiate the
    same ``addmm`` (the reference the custom backward is tested against; also what
    ``torch.compile`` traces).
    """
    d = h.shape[-1]
    h2 = h.reshape(-1, d)  # (N, d), N = prod(...)
    if custom_backward:
        out = _LowRankResidual.apply(h2, read, write)
    else:
        out = torch.addmm(h2, F.linear(h2, read), write.T)
    return out.view(h.shape)


@cache
def _compiled_residual() -> Callable[..., Tensor]:
    # torch.compile's default dynamic=None: the first call specialises on its shape, a second shape
    # recompiles once with symbolic sizes (B and T change between batches).
    return torch.compile(lambda h, read, write: low_rank_residual(h, read, write, custom_backward=False))


def principal_directions(weight: Tensor, n: int) -> Tensor:
    """The top-``n`` right singular vectors of ``weight (out, d)`` as orthonormal rows ``(n, d)``, float32.

    PiSSA's principal subspace (Meng et al., arXiv 2404.02948) of a frozen weight: the input
    directions it reads most strongly. Computed as the top eigenvectors of the Gram matrix WᵀW in
    float64 (d × d, whatever ``out``); each vector's largest-magnitude entry is made positive, so
    the result does not depend on the solver's sign choice.
    """
    w = weight.detach().double()
    _, vecs = torch.linalg.eigh(w.T @ w)  # eigenvalues ascending: the principal ones are last
    top = vecs[:, -n:].flip(-1).T  # (n, d), largest singular value first
    sign = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))  # (n, 1)
    return (top * sign).float().contiguous()


class CRMABlock(nn.Module):
    """One layer's CRMA adapter. Acts on ``(..., d)`` hidden states; holds no reference to its host.

    On every token's hidden state h in R^d::

        additive:  s = R h,  h' = h + g * W (M s - s)            R (n, d), W (d, n) = 0 at init
        subspace:  h' = h + g * U (M - I) U^T h                   U (d, n) orthonormal, g in [0, 1]

    M = P(log_mix) is recomputed by the projection at every forward pass, so ||M||_2 <= 1 always.
    Both forms are exactly the identity at step 0 (W = 0, resp. g = 0).
    """

    def __init__(
        self,
        hidden_size: int,
        config: CRMAConfig,
        generator: torch.Generator | None = None,
        *,
        compiled: bool = False,
        principal: Tensor | None = None,
    ):
        """``principal (n, d)``: orthonormal rows to start the read projection R (the subspace
        basis U = principalᵀ) from, e.g. :func:`principal_directions` (``crma.init: pissa``);
        None draws a random orthonormal one from ``generator``."""
        super().__init__()
        config.validate()
        self.config = config
        self.hidden_size = hidden_size
        n = config.streams
        if principal is not None and tuple(principal.shape) != (n, hidden_size):
            raise ValueError(
                f"principal directions must be ({n}, {hidden_size}), got {tuple(principal.shape)}"
            )
        self.log_mix = nn.Parameter(identity_logits(config.projection, n, config.mix_init))
        if config.form == "additive":
            # Orthonormal read rows keep s = R h at the scale of h; W = 0 makes the block the identity
            # whatever R is (PiSSA's principal rows or random ones).
            read = torch.empty(n, hidden_size)
            if principal is None:
                nn.init.orthogonal_(read, generator=generator)
            else:
                read.copy_(principal)
            self.read = nn.Parameter(read)
            self.write = nn.Parameter(torch.zeros(hidden_size, n))
            self.log_gate = nn.Parameter(torch.tensor(math.log(config.resolved_gate_init())))
        else:
            basis = torch.empty(hidden_size, n)
            if principal is None:
                nn.init.orthogonal_(basis, generator=generator)
            else:
                basis.copy_(principal.T)
            self.basis = nn.Parameter(basis)
            self.gate = nn.Parameter(torch.tensor(float(config.resolved_gate_init())))
        # The model-level batched projection may hand the block its M for the current forward pass.
        self.step_mix: Tensor | None = None
        self.enabled = True
        #: torch.compile the write and this block's own projection (opt-in).
        self.compiled = compiled

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """This block's parameters by group: projections, mixing logits, gate."""
        if self.config.form == "additive":
            return {
                "crma_proj": [self.read, self.write],
                "crma_mix": [self.log_mix],
                "crma_gate": [self.log_gate],
            }
        return {"crma_proj": [self.basis], "crma_mix": [self.log_mix], "crma_gate": [self.gate]}

    def mixing_matrix(self) -> Tensor:
        """M (n, n), float32: the batched result of this step when available, else projected here."""
        if self.step_mix is not None:
            return self.step_mix
        c = self.config
        return project(
            self.log_mix,
            c.projection,
            c.streams,
            iters=c.sinkhorn_iters,
            tau=c.temperature,
            compiled=self.compiled,
        )

    @torch.no_grad()
    def diagnostics(self) -> Diagnostics:
        """Health of the current M, including the certifying rescale actually applied (docs/method.md §6)."""
        c = self.config
        return project_with_diagnostics(
            self.log_mix, c.projection, c.streams, iters=c.sinkhorn_iters, tau=c.temperature
        )[1]

    def gate_value(self) -> Tensor:
        if self.config.form == "additive":
            return self.log_gate.exp()
        # Clamped to [0, 1] for the non-expansive bound; the straight-through gradient keeps a gate
        # that was pushed below 0 able to come back (a plain clamp would freeze it at 0 forever).
        g = self.gate
        return g + (g.clamp(0.0, 1.0) - g).detach()

    def factors(self) -> tuple[Tensor, Tensor]:
        """The block as one rank-n update ``h' = h + W' R h``: ``(R (n, d), W' (d, n))``, float32.

        ``W' = g W (M - I)``; for the subspace form ``R = U^T`` and ``W = U``.
        """
        m, g = self.mixing_matrix(), self.gate_value().float()
        if self.config.form == "additive":
            read, write = self.read.float(), self.write.float()
        else:
            u, _ = torch.linalg.qr(self.basis.float())  # (d, n) orthonormal columns
            read, write = u.T, u
        return read, g * (write @ m - write)  # (n, d), (d, n)

    def forward(self, h: Tensor) -> Tensor:
        if not self.enabled:
            return h
        read, write = self.factors()
        # In h's dtype, autocast or not: the output is the residual stream, which bf16 autocast
        # would otherwise round (and the rank-n matmuls are memory-bound, so fp32 costs nothing).
        with autocast_off(h.device.type):
            read, write = read.to(h.dtype), write.to(h.dtype)
            if self.compiled:
                return _compiled_residual()(h, read, write)
            return low_rank_residual(h, read, write)

    def extra_repr(self) -> str:
        c = self.config
        return f"d={self.hidden_size}, n={c.streams}, form={c.form}, projection={c.projection}"
