"""The CRMA block: a residual adapter whose n x n mixing matrix is (sub-)doubly stochastic.

Reference: CRMA, arXiv 2606.00382; method.md §5. For one decoder layer, on every token's hidden
state h in R^d:

    additive:  s = R h,  h' = h + g * W (M s - s)            R (n, d), W (d, n) = 0 at init
    subspace:  h' = h + g * U (M - I) U^T h                   U (d, n) orthonormal, g in [0, 1]

M = P(log_mix) is recomputed by the projection at every forward pass, so ||M||_2 <= 1 always. Both
forms are exactly the identity at step 0 (W = 0, resp. g = 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from crma_lightning.config import CRMAConfig
from crma_lightning.projection import Diagnostics, identity_logits, project, project_with_diagnostics

#: Names of the parameter groups every block declares; freezing, optimizer groups and
#: checkpoints go through :meth:`CRMABlock.param_groups`, never through parameter-name matching.
CRMA_GROUPS = ("crma_proj", "crma_mix", "crma_gate")


class CRMABlock(nn.Module):
    """One layer's CRMA adapter. Acts on ``(..., d)`` hidden states; holds no reference to its host."""

    def __init__(self, hidden_size: int, config: CRMAConfig, generator: torch.Generator | None = None):
        super().__init__()
        config.validate()
        self.config = config
        self.hidden_size = hidden_size
        n = config.streams
        self.log_mix = nn.Parameter(identity_logits(config.projection, n, config.mix_init))
        if config.form == "additive":
            # Orthonormal read rows keep s = R h at the scale of h; W = 0 makes the block the identity.
            read = torch.empty(n, hidden_size)
            nn.init.orthogonal_(read, generator=generator)
            self.read = nn.Parameter(read)
            self.write = nn.Parameter(torch.zeros(hidden_size, n))
            self.log_gate = nn.Parameter(torch.tensor(math.log(config.resolved_gate_init())))
        else:
            basis = torch.empty(hidden_size, n)
            nn.init.orthogonal_(basis, generator=generator)
            self.basis = nn.Parameter(basis)
            self.gate = nn.Parameter(torch.tensor(float(config.resolved_gate_init())))
        # The model-level batched projection may hand the block its M for the current forward pass.
        self.step_mix: Tensor | None = None
        self.enabled = True

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
        return project(self.log_mix, c.projection, c.streams, iters=c.sinkhorn_iters, tau=c.temperature)

    @torch.no_grad()
    def diagnostics(self) -> Diagnostics:
        """Health of the current M, including the certifying rescale actually applied (method.md §6)."""
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

    def forward(self, h: Tensor) -> Tensor:
        if not self.enabled:
            return h
        m = self.mixing_matrix()
        g = self.gate_value()
        if self.config.form == "additive":
            s = F.linear(h, self.read.to(h.dtype))  # (..., n)
            mixed = s @ m.to(s.dtype).T - s  # (..., n): M s - s per token
            delta = F.linear(mixed, self.write.to(h.dtype))  # (..., d)
        else:
            u, _ = torch.linalg.qr(self.basis.float())  # (d, n) orthonormal columns
            u = u.to(h.dtype)
            s = h @ u  # (..., n) = U^T h
            eye = torch.eye(m.shape[-1], device=m.device, dtype=m.dtype)
            delta = (s @ (m - eye).to(h.dtype).T) @ u.T  # (..., d)
        return h + g.to(h.dtype) * delta

    def extra_repr(self) -> str:
        c = self.config
        return f"d={self.hidden_size}, n={c.streams}, form={c.form}, projection={c.projection}"
