"""Adapter files: PEFT-format LoRA round trip through peft itself, CRMA round trip, clear mismatches."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from peft import PeftModel

from crma_lightning.adapters.config import CRMAConfig, LoRAConfig
from crma_lightning.adapters.injection import inject_crma
from crma_lightning.adapters.lora import activate_lora, add_lora
from crma_lightning.core.errors import ConfigError
from crma_lightning.runs.checkpoint import (
    CRMA_CONFIG,
    CRMA_WEIGHTS,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    atomic_directory,
    load_crma,
    load_lora,
    save_crma,
    save_lora,
)


def _trained(model, tasks=("a", "b"), seed=0):
    for t in tasks:
        add_lora(model, t, LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    handle = inject_crma(model, CRMAConfig())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or ".crma." in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    return handle


def test_lora_loads_in_peft_with_identical_logits(tmp_path, tokens):
    model = tiny_model("llama")
    handle = _trained(model)
    activate_lora(model, "b")
    with handle.disabled():
        ours = model(tokens).logits
    out = save_lora(model, "b", tmp_path / "b")
    assert (out / PEFT_CONFIG).is_file() and (out / PEFT_WEIGHTS).is_file()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp leftovers

    peft_model = PeftModel.from_pretrained(tiny_model("llama"), str(out)).eval()
    theirs = peft_model(tokens).logits
    assert torch.equal(theirs, ours)  # the same peft layers and weights: bit-identical (measured)
    # and the other task's LoRA really differs (measured 0.62), so the check above is not vacuous
    activate_lora(model, "a")
    with handle.disabled():
        assert (model(tokens).logits - ours).abs().max() > 1e-4


def test_lora_round_trip_into_our_model(tmp_path, tokens):
    model = tiny_model("llama")
    handle = _trained(model)
    activate_lora(model, "a")
    expected = model(tokens).logits
    save_lora(model, "a", tmp_path / "a")
    save_crma(handle, tmp_path / "crma")

    fresh = tiny_model("llama")
    load_lora(fresh, "a", tmp_path / "a")
    activate_lora(fresh, "a")
    load_crma(fresh, tmp_path / "crma")
    fresh.eval()
    assert torch.equal(fresh(tokens).logits, expected)


def test_crma_files_and_metadata(tmp_path):
    model = tiny_model("qwen2")
    handle = _trained(model, tasks=("a",))
    save_crma(handle, tmp_path / "crma", extra={"strategy": "modular"})
    meta = json.loads((tmp_path / "crma" / CRMA_CONFIG).read_text())
    assert meta["base_model"]["model_type"] == "qwen2" and meta["layers"] == list(handle.blocks)
    assert meta["crma"]["streams"] == 4 and meta["strategy"] == "modular"
    assert (tmp_path / "crma" / CRMA_WEIGHTS).stat().st_size > 0
    # overwrite in place keeps one complete directory
    save_crma(handle, tmp_path / "crma")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crma"]


def test_mismatches_fail_clearly(tmp_path):
    model = tiny_model("llama")
    handle = _trained(model, tasks=("a",))
    save_crma(handle, tmp_path / "crma")
    save_lora(model, "a", tmp_path / "a")

    with pytest.raises(ConfigError, match="another base model.*model_type"):
        load_crma(tiny_model("gpt2"), tmp_path / "crma")
    other = tiny_model("llama")
    wrong_n = inject_crma(other, CRMAConfig(streams=2))
    with pytest.raises(ConfigError, match="streams=4.*streams=2"):
        load_crma(other, tmp_path / "crma", handle=wrong_n)
    with pytest.raises(ConfigError, match="does not fit this model"):
        load_lora(tiny_model("gpt2"), "a", tmp_path / "a")
    with pytest.raises(ConfigError, match="not a PEFT LoRA directory"):
        load_lora(tiny_model("llama"), "missing", tmp_path / "nope")
    with pytest.raises(ConfigError, match="cannot save LoRA 'zzz'"):
        save_lora(model, "zzz", tmp_path / "zzz")
    (tmp_path / "crma" / CRMA_WEIGHTS).write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="corrupted"):
        load_crma(tiny_model("llama"), tmp_path / "crma")


def test_atomic_directory_leaves_old_content_on_failure(tmp_path):
    target = tmp_path / "out"
    with atomic_directory(target) as d:
        (d / "f").write_text("one")
    with pytest.raises(RuntimeError), atomic_directory(target) as d:
        (d / "f").write_text("half")
        raise RuntimeError("crash while writing")
    assert (target / "f").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
