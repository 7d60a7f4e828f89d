"""Per-task LoRA adapters through peft's functional API, on a plain transformers model.

One fresh LoRA per task (or one shared for NAIVE), exactly one active at a time, as peft named
adapters; files stay in PEFT's format.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from peft import LoraConfig as PeftLoraConfig
from peft.functional import inject_adapter_in_model, set_adapter
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from crma_lightning.adapters.config import LoRAConfig
from crma_lightning.core.errors import ConfigError

#: Adapter name of the single LoRA that the NAIVE condition trains on every task.
SHARED_ADAPTER = "shared"


def peft_config(spec: LoRAConfig, base_model_name_or_path: str | None = None) -> PeftLoraConfig:
    spec.validate()
    return PeftLoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        base_model_name_or_path=base_model_name_or_path,
        **spec.extra,
    )


def tuner_layers(model: nn.Module) -> Iterator[tuple[str, BaseTunerLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, BaseTunerLayer):
            yield name, module


def add_lora(model: nn.Module, adapter: str, spec: LoRAConfig) -> list[str]:
    """Inject a fresh LoRA named ``adapter``; returns the qualified names of the modules it adapts."""
    if adapter in getattr(model, "peft_config", {}):
        raise ConfigError(f"a LoRA adapter named {adapter!r} already exists on this model")
    config = peft_config(spec, getattr(model.config, "_name_or_path", None) or None)
    with warnings.catch_warnings():
        # Several named adapters on one model is exactly what we want.
        warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
        try:
            inject_adapter_in_model(config, model, adapter_name=adapter)
        except ValueError as e:
            raise ConfigError(
                f"LoRA target modules {spec.target_modules!r} do not fit {type(model).__name__}: {e} "
                "Set lora.target_modules to names of linear layers of this model (e.g. [q_proj, v_proj])."
            ) from None
    touched = [name for name, layer in tuner_layers(model) if adapter in _adapter_dicts(layer)]
    if not touched:
        raise ConfigError(
            f"lora.target_modules {spec.target_modules!r} matched no module of {type(model).__name__}"
        )
    return touched


def _adapter_dicts(layer: BaseTunerLayer) -> set[str]:
    names: set[str] = set()
    for attr in layer.adapter_layer_names:
        names |= set(getattr(layer, attr).keys())
    return names


def lora_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The parameters of one named adapter, via peft's declared ``adapter_layer_names``."""
    params: list[nn.Parameter] = []
    for _, layer in tuner_layers(model):
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr)
            if adapter in container:
                item = container[adapter]
                params += [item] if isinstance(item, nn.Parameter) else list(item.parameters())
    return params


def lora_down_weights(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The ``lora_A`` weight ``(r, in_features)`` of ``adapter`` in every adapted layer, in module order."""
    return [
        layer.lora_A[adapter].weight
        for _, layer in tuner_layers(model)
        if adapter in getattr(layer, "lora_A", {})
    ]


def adapter_names(model: nn.Module) -> list[str]:
    return list(getattr(model, "peft_config", {}).keys())


def activate_lora(model: nn.Module, adapter: str | list[str]) -> None:
    """Make ``adapter`` the one active LoRA, or the LoRAs of a list all active together (their
    updates summed, as peft sums active adapters); an empty list: no LoRA (the base model, plus CRMA
    if injected), until the next call. Trainability (``requires_grad``) is left exactly as it was: it
    is the freezing policy's job, not a side effect of switching (peft's own set_adapter would make
    the active adapter trainable)."""
    names = [adapter] if isinstance(adapter, str) else list(adapter)
    unknown = [a for a in names if a not in adapter_names(model)]
    if unknown or (isinstance(adapter, str) and not adapter):
        raise ConfigError(
            f"no LoRA adapter named {unknown or names!r}; this model has {adapter_names(model)}"
        )
    layers = [layer for _, layer in tuner_layers(model)]
    params = [p for layer in layers for p in layer.parameters()]
    flags = [p.requires_grad for p in params]
    for layer in layers:
        if layer.disable_adapters == bool(names):  # an earlier empty list turned them off
            layer.enable_adapters(bool(names))
    if names:
        set_adapter(model, names[0] if len(names) == 1 else names, inference_mode=True)
    for p, flag in zip(params, flags, strict=True):
        p.requires_grad_(flag)


def active_lora(model: nn.Module) -> str | None:
    for _, layer in tuner_layers(model):
        return layer.active_adapters[0] if layer.active_adapters else None
    return None


@contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Temporarily run the model without any LoRA (the base model, plus CRMA if injected)."""
    layers = [layer for _, layer in tuner_layers(model)]
    # peft's enable_adapters() also flips requires_grad; keep the freezing policy's flags intact.
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, flag in flags:
            p.requires_grad_(flag)


def dense_weight(module: nn.Module) -> Tensor | None:
    """The ``(out, in)`` weight of a linear layer as float32: ``nn.Linear``, transformers' ``Conv1D``
    (stored ``(in, out)``), a bitsandbytes ``Linear4bit`` (dequantised), or any of them wrapped by a
    peft LoRA layer (its base weight). None for any other module."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    if is_linear4bit(module):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    if isinstance(module, nn.Linear):
        return module.weight.detach().float()
    if isinstance(module, Conv1D):
        return module.weight.detach().float().T
    return None


def is_linear4bit(module: nn.Module) -> bool:
    if importlib.util.find_spec("bitsandbytes") is None:
        return False
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)
