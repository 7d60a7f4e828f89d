"""ZClip: adaptive gradient clipping by the z-score of the global gradient norm.

Kumar et al., "ZClip: Adaptive Spike Mitigation for LLM Pre-Training", arXiv 2504.02507, Algorithm 1,
following the maths and defaults of the authors' package ``zclip`` 1.0.0; the recipe uses it in place
of a fixed ``max_grad_norm`` (docs/method.md §3). Off by default: ``zclip: {enabled: true}`` with
``trainer.gradient_clip_val: null`` (``configs/recipe/zclip.yaml``).
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from crma_lightning.core.errors import ConfigError, raise_problems
from crma_lightning.methods.protocol import as_continual

ClipOption = Literal["adaptive_scaling", "mean"]


# -- the maths (pure) ----------------------------------------------------------------------------
def warmup_statistics(norms: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population variance (ddof = 0, as the package) of the warm-up norms ``(k,)``."""
    mean = norms.mean()
    return mean, ((norms - mean) ** 2).mean()


def zscore_threshold(
    norm: Tensor, mean: Tensor, var: Tensor, z_thresh: float, eps: float, option: ClipOption
) -> tuple[Tensor, Tensor, Tensor]:
    """``(g*, clipped, z)``: the norm to clip to (``norm`` itself when not a spike), whether it is a
    spike (z > z_thresh), and the z-score. All 0-dim tensors, no host sync."""
    std = var.sqrt()
    z = (norm - mean) / (std + eps)
    clipped = z > z_thresh
    # adaptive: μ + z_thresh·σ / (z / z_thresh), the farther out the spike, the closer to μ it is clipped.
    threshold = mean + z_thresh * std / (z / z_thresh) if option == "adaptive_scaling" else mean
    return torch.where(clipped, threshold, norm), clipped, z


def ema_update(mean: Tensor, var: Tensor, x: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """One EMA step of the mean and variance with the (clipped) norm ``x``; the variance uses the
    updated mean (ZClip, Algorithm 1)."""
    mean = alpha * mean + (1 - alpha) * x
    return mean, alpha * var + (1 - alpha) * (x - mean) ** 2


def clip_coefficient(norm: Tensor, target: Tensor) -> Tensor:
    """The factor that scales gradients of norm ``norm`` to ``target`` (1 when already below it)."""
    return torch.where(norm > target, target / (norm + 1e-6), torch.ones_like(norm))


# -- the callback --------------------------------------------------------------------------------
class ZClip(Callback):
    """Z-score adaptive gradient clipping of the global gradient norm (arXiv 2504.02507).

    Over the first ``warmup_steps`` optimizer steps the global norms g_t are collected, unclipped; their
    mean and (population) variance start the statistics. From then on, every step::

        z = (g − μ) / (σ + ε)                                           σ = sqrt(v)
        z > z_thresh:  g* = μ + z_thresh · σ / (z / z_thresh)   ('adaptive_scaling'; 'mean': g* = μ)
                       the gradients are scaled by g* / (g + 1e-6)
        otherwise:     g* = g, nothing changes
        μ ← α μ + (1 − α) g*,   v ← α v + (1 − α) (g* − μ)²             (the updated μ, as the paper)

    The norm is ``ContinualLM.gradient_norms()`` (None for a skipped step: the statistics are left
    untouched); the statistics are checkpointed. Logs ``zclip/clipped`` (1.0 on a clipped step),
    ``zclip/clip_events`` (the count so far), ``zclip/z``, ``zclip/threshold``, ``zclip/mean`` and
    ``zclip/std``; ``crma_lightning.callbacks.gradnorm`` counts the clipped steps per task in
    ``continual/grad_norm.json``.
    """

    def __init__(
        self,
        enabled: bool = False,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        clip_option: ClipOption = "adaptive_scaling",
        max_grad_norm: float | None = None,
        eps: float = 1e-6,
    ) -> None:
        """
        Args:
            enabled: clip with ZClip (then leave ``trainer.gradient_clip_val`` unset).
            alpha: EMA smoothing of the norm's mean and variance (the paper's 0.97).
            z_thresh: a step whose norm has z-score above this is a spike and is clipped (2.5).
            warmup_steps: optimizer steps whose norms start the statistics, unclipped (25).
            clip_option: 'adaptive_scaling' clips a spike to μ + z_thresh·σ/(z/z_thresh) (the
                paper's default); 'mean' clips it to μ.
            max_grad_norm: an additional fixed cap on every step, warm-up included (None: none;
                the package's default 1.0 would keep the fixed clip the recipe replaces).
            eps: added to σ in the z-score.
        """
        super().__init__()
        self.enabled = enabled
        self.alpha = alpha
        self.z_thresh = z_thresh
        self.warmup_steps = warmup_steps
        self.clip_option = clip_option
        self.max_grad_norm = max_grad_norm
        self.eps = eps
        raise_problems(self.problems(), "zclip configuration")
        self._reset()

    def problems(self) -> list[str]:
        p = []
        if not 0.0 < self.alpha < 1.0:
            p.append(f"zclip.alpha must lie in (0, 1) (got {self.alpha}); the paper's is 0.97.")
        if not self.z_thresh > 0:
            p.append(f"zclip.z_thresh must be > 0 (got {self.z_thresh}); the paper's is 2.5.")
        if not (isinstance(self.warmup_steps, int) and self.warmup_steps >= 1):
            p.append(
                f"zclip.warmup_steps must be an integer >= 1 (got {self.warmup_steps!r}); the paper's is 25."
            )
        if self.clip_option not in ("adaptive_scaling", "mean"):
            p.append(f"zclip.clip_option must be 'adaptive_scaling' or 'mean' (got {self.clip_option!r}).")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            p.append(f"zclip.max_grad_norm must be > 0 or null (got {self.max_grad_norm}).")
        if not self.eps >= 0:
            p.append(f"zclip.eps must be >= 0 (got {self.eps}).")
        return p

    def _reset(self) -> None:
        self.warmup: list[Tensor] = []  # the norms of the warm-up steps, float64
        self.mean: Tensor | None = None  # EMA statistics, float64 0-dim, once warmed up
        self.var: Tensor | None = None
        self.clip_events: Tensor | int = 0

    @property
    def warmed_up(self) -> bool:
        return self.mean is not None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.enabled and trainer.gradient_clip_val:
            raise ConfigError(
                f"zclip.enabled replaces trainer.gradient_clip_val (got {trainer.gradient_clip_val}); set "
                "trainer.gradient_clip_val: null, or zclip.max_grad_norm for a fixed cap on top of ZClip"
            )

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.enabled:
            return
        norms = as_continual(pl_module).gradient_norms()
        if norms is None:  # a skipped (non-finite) step: no gradients, statistics untouched
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        norm = norms.total.detach().double()
        target = self.step(norm)
        if target is not None:
            coef = clip_coefficient(norm, target).to(grads[0].dtype)
            for g in grads:  # DTensor shards too: the coefficient is the same on every rank
                g.mul_(coef)
        log = {
            "zclip/clipped": torch.as_tensor(self._last_clipped, dtype=torch.float32),
            "zclip/clip_events": torch.as_tensor(self.clip_events, dtype=torch.float32),
        }
        if self.warmed_up and self._last_z is not None:
            log |= {
                "zclip/z": self._last_z,
                "zclip/threshold": target,
                "zclip/mean": self.mean,
                "zclip/std": self.var.sqrt(),
            }
        for name, value in log.items():
            pl_module.log(name, value.float(), batch_size=1)

    def step(self, norm: Tensor) -> Tensor | None:
        """Feed one step's global norm (float64, 0-dim); returns the norm to clip to (None: leave the
        gradients alone) and updates the statistics."""
        self._last_clipped, self._last_z = torch.zeros((), device=norm.device), None
        if not self.warmed_up:
            self.warmup.append(norm)
            if len(self.warmup) >= self.warmup_steps:
                self.mean, self.var = warmup_statistics(torch.stack([w.to(norm.device) for w in self.warmup]))
                self.warmup = []
            return self._cap(norm) if self.max_grad_norm is not None else None
        mean, var = self.mean.to(norm.device), self.var.to(norm.device)
        target, clipped, self._last_z = zscore_threshold(
            norm, mean, var, self.z_thresh, self.eps, self.clip_option
        )
        self.mean, self.var = ema_update(mean, var, target, self.alpha)  # the clipped norm, as the paper
        self._last_clipped = clipped.to(norm.dtype)
        self.clip_events = self.clip_events + self._last_clipped
        return self._cap(target) if self.max_grad_norm is not None else target

    def _cap(self, target: Tensor) -> Tensor:
        return torch.clamp(target, max=self.max_grad_norm)

    # -- resumable state: plain floats (exact for float64) ------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        def f(t: Tensor | None) -> float | None:
            return None if t is None else float(t)

        return {
            "warmup": [float(t) for t in self.warmup],
            "mean": f(self.mean),
            "var": f(self.var),
            "clip_events": int(float(self.clip_events)),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        def t(x: float | None) -> Tensor | None:
            return None if x is None else torch.tensor(x, dtype=torch.float64)

        self.warmup = [t(x) for x in state_dict["warmup"]]
        self.mean, self.var = t(state_dict["mean"]), t(state_dict["var"])
        self.clip_events = state_dict["clip_events"]
