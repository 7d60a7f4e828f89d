"""Typed, self-documenting configuration of the CRMA adapter and the per-task LoRAs.

Attribute docstrings become LightningCLI ``--help``. ``validate()`` reports every problem at once,
each naming the field and the fix. Defaults that the paper (arXiv 2606.00382) leaves open are this
project's decisions; docs/method.md §5 lists them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from crma_lightning.adapters.projection import MAX_BIRKHOFF_N
from crma_lightning.core.errors import raise_problems, type_problems


@dataclass
class CRMAConfig:
    """The Constrained Residual Mixing Adapter placed on every decoder layer (docs/method.md §5)."""

    streams: int = 4
    """Number of mixing streams n (the size of the doubly-stochastic matrix M). >= 2."""
    form: Literal["additive", "subspace"] = "additive"
    """'additive': h + g * W (M s - s), s = R h (cheap; the authors' description).
    'subspace': h + g * U (M - I) U^T h with orthonormal U and g in [0, 1]: the whole block is
    non-expansive, a bound on the adapter's entire effect."""
    projection: Literal["sinkhorn", "birkhoff"] = "sinkhorn"
    """'sinkhorn': log-domain Sinkhorn-Knopp plus the certifying rescale. 'birkhoff': exact convex
    combination of all n! permutation matrices (n <= 5)."""
    sinkhorn_iters: int = 20
    """Sinkhorn iterations per forward pass (20, as in DeepSeek's mHC). >= 1."""
    temperature: float = 1.0
    """Temperature tau of the projection; smaller is closer to a permutation. > 0."""
    mix_init: float = 0.0
    """Initial logit margin of the identity in the mixing logits; 0 starts M at the uniform J/n.
    [decision] 0: with W = 0 at init, M near I would make both W's and M's first gradients vanish."""
    gate_init: float | None = None
    """Initial gate value g. None: 1.0 for 'additive' (g = exp(log_gate)), 0.0 for 'subspace'
    (g clamped to [0, 1]; 0 makes the block exactly the identity at step 0)."""
    placement: Literal["block_output", "block_input"] = "block_output"
    """Where on each decoder layer the block acts on the residual stream. [decision] output."""
    layers: list[int] | None = None
    """Indices of the decoder layers that get a block (negative counts from the end); None = all."""
    batched_projection: bool = True
    """Project all layers' logits in one batched call per forward pass instead of one call per
    layer. Needs every layer's logits at the model's entry, so it is off under FSDP sharding."""
    init: Literal["orthogonal", "pissa"] = "orthogonal"
    """How the read projection R (the subspace basis U) starts. 'orthogonal': random orthonormal
    rows (seeded by init_seed). 'pissa': the top-n right singular vectors of the frozen weights
    that next read the residual stream the block writes (PiSSA's principal subspace; the weights
    are named by pissa_modules, docs/method.md §5). Either way W = 0 (g = 0): identity at step 0."""
    pissa_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "qkv_proj", "c_attn", "query_key_value"]
    )
    """init 'pissa': names (last component) of the linear layers whose stacked weights give the
    principal directions: those of the decoder layer that next reads h (the next layer for
    block_output, the last layer its own; the same layer for block_input). The default names the
    attention input projections of the supported families."""
    init_seed: int = 0
    """Seed of the read/write projection initialisation (same adapter on every rank and rerun)."""
    compile: bool = False
    """torch.compile the CRMA write and projection (opt-in; on CPU it does not pay, see
    docs/decisions.md)."""

    def resolved_gate_init(self) -> float:
        if self.gate_init is not None:
            return self.gate_init
        return 1.0 if self.form == "additive" else 0.0

    def problems(self, prefix: str = "crma") -> list[str]:
        # Types first: the range checks below would raise TypeError on, e.g., streams: "4".
        p = type_problems(self, prefix)
        if p:
            return p
        if self.streams < 2:
            p.append(f"{prefix}.streams must be >= 2 (got {self.streams}); n = 1 mixes nothing. Use 4.")
        if self.sinkhorn_iters < 1:
            p.append(f"{prefix}.sinkhorn_iters must be >= 1 (got {self.sinkhorn_iters}); the default is 20.")
        if not self.temperature > 0:
            p.append(f"{prefix}.temperature must be > 0 (got {self.temperature}); the default is 1.0.")
        if self.form not in ("additive", "subspace"):
            p.append(f"{prefix}.form must be 'additive' or 'subspace' (got {self.form!r}).")
        if self.projection not in ("sinkhorn", "birkhoff"):
            p.append(f"{prefix}.projection must be 'sinkhorn' or 'birkhoff' (got {self.projection!r}).")
        if self.projection == "birkhoff" and self.streams > MAX_BIRKHOFF_N:
            p.append(
                f"{prefix}.projection 'birkhoff' supports streams <= {MAX_BIRKHOFF_N} "
                f"(got {self.streams}); use projection 'sinkhorn' or fewer streams."
            )
        if self.init not in ("orthogonal", "pissa"):
            p.append(f"{prefix}.init must be 'orthogonal' or 'pissa' (got {self.init!r}).")
        if self.init == "pissa" and not self.pissa_modules:
            p.append(
                f"{prefix}.pissa_modules is empty; name the layers to take principal directions from (e.g. "
                "[q_proj])."
            )
        if self.placement not in ("block_output", "block_input"):
            p.append(f"{prefix}.placement must be 'block_output' or 'block_input' (got {self.placement!r}).")
        g = self.resolved_gate_init()
        if self.form == "subspace" and not 0.0 <= g <= 1.0:
            p.append(f"{prefix}.gate_init must lie in [0, 1] for the subspace form (got {g}).")
        if self.form == "additive" and not g > 0:
            p.append(f"{prefix}.gate_init must be > 0 for the additive form, g = exp(log_gate) (got {g}).")
        return p

    def validate(self) -> CRMAConfig:
        raise_problems(self.problems(), "CRMA config")
        return self

    def to_dict(self) -> dict:
        return asdict(self)


#: peft ``init_lora_weights`` values that rewrite the base weight with the adapter's initial value
#: (PiSSA and its fast SVD variants, OLoRA, CorDA, LoftQ): refused, see LoRAConfig.problems.
BASE_REWRITING_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass
class LoRAConfig:
    """Low-rank adapters (peft LoRA): one fresh adapter per task, or one shared (NAIVE)."""

    r: int = 8
    """LoRA rank. >= 1."""
    alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / r)."""
    dropout: float = 0.05
    """Dropout on the LoRA input, in [0, 1)."""
    target_modules: list[str] | str | None = None
    """Module names (or peft's 'all-linear') to adapt; None uses peft's default for the model type
    (q_proj, v_proj for Llama-like models, c_attn for GPT-2)."""
    extra: dict = field(default_factory=dict)
    """Further peft.LoraConfig arguments (e.g. use_rslora: true)."""

    def problems(self, prefix: str = "lora") -> list[str]:
        # Types first: the range checks below would raise TypeError on, e.g., r: "8".
        p = type_problems(self, prefix)
        if p:
            return p
        if self.r < 1:
            p.append(f"{prefix}.r must be >= 1 (got {self.r}).")
        if not self.alpha > 0:
            p.append(f"{prefix}.alpha must be > 0 (got {self.alpha}).")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"{prefix}.dropout must lie in [0, 1) (got {self.dropout}).")
        if isinstance(self.target_modules, list) and not self.target_modules:
            p.append(f"{prefix}.target_modules is an empty list; give module names or leave it unset.")
        init = self.extra.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
            p.append(
                f"{prefix}.extra.init_lora_weights {init!r} rewrites the frozen base weight (W <- W - BA); "
                "with a LoRA per task that would change the base under every earlier task's LoRA, and a "
                "shared LoRA's files would no longer fit the original base. Use crma.init: pissa for CRMA's "
                "read projection, and the default LoRA initialisation (docs/method.md §5)."
            )
        return p

    def validate(self) -> LoRAConfig:
        raise_problems(self.problems(), "LoRA config")
        return self


@dataclass
class GroupLR:
    """Learning rate of each parameter group (the optimizer's own ``lr`` is not used)."""

    lora: float = 2e-4
    """All LoRA matrices."""
    crma_proj: float = 1e-3
    """CRMA read/write projections (or the subspace basis)."""
    crma_mix: float = 1e-2
    """CRMA mixing logits (no weight decay: decay would pull M toward the uniform J/n)."""
    crma_gate: float = 1e-2
    """CRMA gate (no weight decay)."""

    def problems(self, prefix: str = "model.lr") -> list[str]:
        return [
            f"{prefix}.{k} must be >= 0 (got {v}); learning rates cannot be negative."
            for k, v in vars(self).items()
            if not (isinstance(v, int | float) and v >= 0 and math.isfinite(v))
        ]


NO_DECAY = ("crma_mix", "crma_gate")
"""Parameter groups that get no weight decay."""
