"""Adapter checkpoints: a task's LoRA in PEFT's format, CRMA as safetensors + JSON; atomic writes.

A LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``) loads with
``peft.PeftModel.from_pretrained(base, dir)``; a CRMA directory (``crma_config.json`` +
``crma.safetensors``) with :func:`load_crma`. Loading checks the base architecture and shapes and
says what differs. Lightning checkpoints hold only the adapters (:func:`adapter_only_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft.functional import get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from crma_lightning.adapters.config import CRMAConfig
from crma_lightning.adapters.injection import CRMAInjection, find_decoder_layers, hidden_size_of, inject_crma
from crma_lightning.adapters.lora import adapter_names
from crma_lightning.core.atomic import atomic_directory, atomic_write_json
from crma_lightning.core.dist import whole_cpu
from crma_lightning.core.errors import ConfigError

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
CRMA_CONFIG = "crma_config.json"
CRMA_WEIGHTS = "crma.safetensors"
# PeftModel nests the transformers model as base_model.model; its files use that prefix.
PEFT_PREFIX = "base_model.model."


# -- base-model identity -------------------------------------------------------------------
def base_model_signature(model: nn.Module) -> dict[str, Any]:
    """What an adapter must match: architecture, hidden size, decoder layer count, name."""
    path, layers = find_decoder_layers(model)
    return {
        "name_or_path": getattr(model.config, "_name_or_path", "") or "",
        "model_type": getattr(model.config, "model_type", ""),
        "hidden_size": hidden_size_of(model),
        "num_layers": len(layers),
        "layer_path": path,
    }


def check_signature(saved: dict[str, Any], model: nn.Module, what: str) -> None:
    here = base_model_signature(model)
    diffs = [
        f"{k}: saved {saved.get(k)!r}, this model {here[k]!r}"
        for k in ("model_type", "hidden_size", "num_layers")
        if saved.get(k) != here[k]
    ]
    if diffs:
        raise ConfigError(
            f"{what} was made for another base model ({saved.get('name_or_path') or 'unnamed'}): "
            + "; ".join(diffs)
            + ". Load it onto the base model it was trained with."
        )


# -- LoRA in PEFT format ---------------------------------------------------------------------
def lora_state(model: nn.Module, adapter: str) -> dict[str, Tensor]:
    """One named LoRA's tensors, whole, on CPU, keyed as in PEFT's file. Under FSDP the shards are
    gathered from every rank: a collective, so every rank must call it."""
    if adapter not in adapter_names(model):
        raise ConfigError(f"cannot save LoRA {adapter!r}: this model has {adapter_names(model)}")
    state = get_peft_model_state_dict(model, adapter_name=adapter)
    return {PEFT_PREFIX + k: whole_cpu(v) for k, v in state.items()}


def save_lora(model: nn.Module, adapter: str, directory: str | os.PathLike, write: bool = True) -> Path:
    """Write one named LoRA as a PEFT adapter directory (loads with ``PeftModel.from_pretrained``).

    Distributed: call on every rank (sharded tensors are gathered); only ranks with ``write`` write.
    """
    state = lora_state(model, adapter)
    if write:
        write_lora(model, adapter, state, directory)
    return Path(directory)


def write_lora(
    model: nn.Module, adapter: str, state: dict[str, Tensor], directory: str | os.PathLike
) -> Path:
    """Write ``state`` (from :func:`lora_state`) with the adapter's PEFT config, atomically."""
    config = model.peft_config[adapter]
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        config.save_pretrained(str(tmp))
        save_file(state, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
    return directory


def load_lora(model: nn.Module, adapter: str, directory: str | os.PathLike) -> None:
    """Load a PEFT adapter directory onto ``model`` as the named LoRA ``adapter`` (created if absent)."""
    directory = Path(directory)
    cfg_file, weights = directory / PEFT_CONFIG, directory / PEFT_WEIGHTS
    if not cfg_file.is_file() or not weights.is_file():
        raise ConfigError(
            f"{directory} is not a PEFT LoRA directory (needs {PEFT_CONFIG} and {PEFT_WEIGHTS})"
        )
    config = PeftLoraConfig.from_pretrained(str(directory))
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(str(weights)).items()}
    if adapter not in adapter_names(model):
        try:
            inject_adapter_in_model(config, model, adapter_name=adapter)
        except ValueError as e:  # peft's NoMatchingPeftModuleError
            raise ConfigError(
                f"LoRA {directory} does not fit this model ({type(model).__name__}): {e} "
                f"It was made for {config.base_model_name_or_path!r}; load it onto that base model."
            ) from None
    expected = get_peft_model_state_dict(model, adapter_name=adapter)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    bad_shape = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or bad_shape:
        raise ConfigError(
            f"LoRA {directory} does not fit this model ({type(model).__name__}): "
            f"{len(missing)} missing tensors (e.g. {missing[:2]}), {len(unexpected)} unexpected "
            f"(e.g. {unexpected[:2]}), {len(bad_shape)} of other shape (e.g. {bad_shape[:2]}). "
            f"It was made for {config.base_model_name_or_path!r}; load it onto that base model."
        )
    set_peft_model_state_dict(model, state, adapter_name=adapter)


# -- CRMA ------------------------------------------------------------------------------------
def crma_state(handle: CRMAInjection) -> dict[str, Tensor]:
    """The CRMA blocks' tensors, whole, on CPU (gathered under FSDP: call on every rank)."""
    return {k: whole_cpu(v) for k, v in handle.state_dict().items()}


def save_crma(
    handle: CRMAInjection,
    directory: str | os.PathLike,
    extra: dict[str, Any] | None = None,
    write: bool = True,
) -> Path:
    """Write the CRMA blocks (safetensors) and their config plus the base signature (JSON).

    Distributed: call on every rank (sharded tensors are gathered); only ranks with ``write`` write.
    """
    state = crma_state(handle)
    if write:
        write_crma(handle, state, directory, extra)
    return Path(directory)


def write_crma(
    handle: CRMAInjection,
    state: dict[str, Tensor],
    directory: str | os.PathLike,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``state`` (from :func:`crma_state`) with its config and the base signature, atomically."""
    directory = Path(directory)
    meta = {
        "crma": handle.config.to_dict(),
        "layers": list(handle.blocks),
        "base_model": base_model_signature(handle.model),
        **(extra or {}),
    }
    with atomic_directory(directory) as tmp:
        save_file(state, str(tmp / CRMA_WEIGHTS), metadata={"format": "pt"})
        atomic_write_json(tmp / CRMA_CONFIG, meta)
    return directory


def fingerprint(state: dict[str, Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``state``: equal iff bit-identical."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_crma_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / CRMA_CONFIG
    if not path.is_file():
        raise ConfigError(f"{directory} is not a CRMA directory (no {CRMA_CONFIG})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is corrupted ({e}); re-export the adapter") from None


def load_crma(
    model: nn.Module, directory: str | os.PathLike, handle: CRMAInjection | None = None
) -> CRMAInjection:
    """Load a CRMA directory onto ``model``: injects the blocks (unless ``handle`` is given) and
    loads their weights strictly, after checking the base model and the shapes."""
    directory = Path(directory)
    meta = read_crma_meta(directory)
    check_signature(meta["base_model"], model, f"CRMA adapter {directory}")
    config = CRMAConfig(**meta["crma"])
    if handle is None:
        handle = inject_crma(model, config, principal_init=False)  # the weights are loaded below
    elif handle.config.streams != config.streams or handle.config.form != config.form:
        raise ConfigError(
            f"CRMA adapter {directory} has streams={config.streams}, form={config.form}; the model's CRMA "
            f"has streams={handle.config.streams}, form={handle.config.form}. Use matching crma settings."
        )
    try:
        state = load_file(str(directory / CRMA_WEIGHTS))
    except Exception as e:  # safetensors raises several types for a damaged file
        raise ConfigError(
            f"{directory / CRMA_WEIGHTS} cannot be read ({e}); the file is missing or corrupted"
        ) from None
    ours = handle.state_dict()
    missing = sorted(set(ours) - set(state))
    bad = [k for k in ours if k in state and state[k].shape != ours[k].shape]
    if missing or bad or set(state) - set(ours):
        raise ConfigError(
            f"CRMA adapter {directory} does not match this model's blocks: missing {missing[:3]}, "
            f"shape mismatch {bad[:3]}, unexpected {sorted(set(state) - set(ours))[:3]}."
        )
    handle.load_state_dict(state)
    return handle


# -- Lightning checkpoints: adapters only ------------------------------------------------------
def adapter_only_checkpoint(checkpoint: dict, keep: set[str], identity: dict[str, Any]) -> None:
    """Drop every tensor but the adapters (``keep``) from a Lightning checkpoint, in place, and
    record ``identity`` (tasks, strategy, counters) under ``checkpoint["continual"]``."""
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
    checkpoint["continual"] = dict(identity)


def check_resumable(checkpoint: dict, identity: dict[str, Any], needed: set[str]) -> dict[str, Any]:
    """The ``continual`` record of a checkpoint this run can resume from; a clear error otherwise."""
    saved = checkpoint.get("continual")
    if saved is None:
        raise ConfigError(
            "this checkpoint was not written by crma-lightning's ContinualLM; pass one from <run "
            "dir>/checkpoints/"
        )
    if saved["tasks"] != identity["tasks"] or saved["strategy"] != identity["strategy"]:
        raise ConfigError(
            f"the checkpoint was trained with tasks {saved['tasks']} (strategy {saved['strategy']}); this "
            f"run has data.tasks {identity['tasks']} (strategy {identity['strategy']}). Resume with the same "
            "task list and strategy, or start a new run without --ckpt_path."
        )
    missing = sorted(needed - set(checkpoint["state_dict"]))
    if missing:
        raise ConfigError(
            f"the checkpoint lacks {len(missing)} adapter tensors of this model (e.g. {missing[:2]}); it was "
            "written with other LoRA/CRMA settings. Resume with the run's own config.yaml."
        )
    return saved


class AdapterOnlyCheckpoints:
    """Lightning checkpoint hooks that keep the adapters only; mixed into ``ContinualLM``, which
    provides ``ever_trainable_parameters``, ``task_names``, ``strategy``, ``nonfinite_skipped`` and
    ``regularizers``."""

    def adapter_state_names(self) -> set[str]:
        """State-dict keys of every adapter tensor (what checkpoints keep)."""
        keep = {id(p) for p in self.ever_trainable_parameters()}
        return {name for name, p in self.named_parameters() if id(p) in keep}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The frozen base is bit-identical to what configure_model() loads, so it is left out:
        # a Mistral-7B checkpoint is then megabytes of adapters, not 14 GB of base weights.
        adapter_only_checkpoint(checkpoint, self.adapter_state_names(), self.resume_identity())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = check_resumable(checkpoint, self.resume_identity(), self.adapter_state_names())
        self.nonfinite_skipped = saved["nonfinite_skipped"]
        for reg in self.regularizers:
            reg.load_state_dict(saved.get("regularizers", {}).get(reg.name, {}))

    def resume_identity(self) -> dict[str, Any]:
        """What a checkpoint must share with this module to resume it (and the counters it carries)."""
        return {
            "tasks": list(self.task_names),
            "strategy": self.strategy,
            "nonfinite_skipped": self.nonfinite_skipped,
            "regularizers": {reg.name: reg.state_dict() for reg in self.regularizers},
        }
