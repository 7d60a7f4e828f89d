"""Shared fixtures: tiny random-init causal LMs of every supported family and layout, built from configs;
the method presets' small fits, once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from crma_lightning.backbone.loading import BackboneConfig, load_backbone

# Tiny models: one intra-op thread is faster than two on 2 cores and keeps timings stable when
# subprocess tests run beside the pytest process.
torch.set_num_threads(1)

_COMMON = dict(vocab_size=128, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)

#: One tiny config per supported family (2 layers, width 32).
TINY_CONFIGS: dict[str, dict] = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_key_value_heads=2, **_COMMON),
    "mistral": dict(
        model_type="mistral", hidden_size=32, intermediate_size=64, num_key_value_heads=2, **_COMMON
    ),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_key_value_heads=2, **_COMMON),
    "gemma2": dict(
        model_type="gemma2",
        hidden_size=32,
        intermediate_size=64,
        num_key_value_heads=2,
        head_dim=8,
        **_COMMON,
    ),
    "phi3": dict(
        model_type="phi3",
        hidden_size=32,
        intermediate_size=64,
        num_key_value_heads=2,
        pad_token_id=0,
        **_COMMON,
    ),
    "gpt2": dict(
        model_type="gpt2",
        vocab_size=128,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    ),
    # Layouts other than model.layers / transformer.h (injection.LAYER_PATHS), and Gemma3's text model.
    "opt": dict(
        model_type="opt", ffn_dim=64, hidden_size=32, word_embed_proj_dim=32, **_COMMON
    ),  # model.decoder.layers
    "gpt_neox": dict(
        model_type="gpt_neox", hidden_size=32, intermediate_size=64, **_COMMON
    ),  # gpt_neox.layers
    "gemma3_text": dict(
        model_type="gemma3_text",
        hidden_size=32,
        intermediate_size=64,
        num_key_value_heads=2,
        head_dim=8,
        **_COMMON,
    ),
}


def tiny_model(family: str = "llama", seed: int = 0):
    model = load_backbone(BackboneConfig(config=TINY_CONFIGS[family], init_seed=seed))
    model.eval()
    return model


@pytest.fixture
def tokens() -> torch.Tensor:
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


CONFIGS = Path(__file__).resolve().parents[1] / "configs"

#: The small fit of every method preset: configs/tiny.yaml with 32 training and 16 holdout examples a
#: task, one epoch each.
PRESET_FIT = ["--data.train_size", "32", "--data.holdout_size", "16", "--data.epochs_per_task", "1"]


@pytest.fixture(scope="session")
def preset_run(tmp_path_factory):
    """``preset_run(name)``: the run directory of a fit of configs/tiny.yaml under
    configs/methods/<name>.yaml with PRESET_FIT, once per session, in-process through train.py's
    CLI (``crma_lightning.cli.fit.main``, as serve's fixtures fit): the presets' own test
    (tests/methods) and serve's test of the other strategies (tests/serve) only read it."""
    from crma_lightning.cli.fit import main as fit_main

    runs = {}

    def get(name: str):
        if name not in runs:
            save_dir = tmp_path_factory.mktemp(f"preset_{name}")
            cli = fit_main(
                [
                    "fit",
                    "--config",
                    str(CONFIGS / "tiny.yaml"),
                    "--config",
                    str(CONFIGS / "methods" / f"{name}.yaml"),
                    *PRESET_FIT,
                    "--trainer.logger.init_args.save_dir",
                    str(save_dir),
                    "--trainer.enable_progress_bar",
                    "false",
                ]
            )
            runs[name] = Path(cli.trainer.log_dir)
        return runs[name]

    return get
