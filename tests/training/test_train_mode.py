"""The base trains in train mode from the first step, resumed or not: ``from_pretrained`` returns a
model in eval mode, and a run resumed mid-task runs no evaluation before it trains on."""

from __future__ import annotations

import signal
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from kills import KILLS, artefacts, callbacks_with, train
from transformers import LlamaConfig, LlamaForCausalLM


def pretrained_with_dropout(folder: Path) -> Path:
    """configs/tiny.yaml's model with attention dropout 0.1, saved and to be loaded as a pretrained one."""
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attention_dropout=0.1,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_a_pretrained_base_is_in_train_mode_at_the_first_step(tmp_path):
    from builders import build
    from lightning.pytorch.callbacks import Callback

    modes = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if not modes:
                modes.extend(m.training for m in pl_module.modules())

    module, dm, trainer = build("modular", tmp_path, callbacks=[Record()])
    module.configure_model()
    module.model.eval()  # as from_pretrained leaves it
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.fit(module, dm)
    assert modes and all(modes)
    assert not [w for w in seen if "eval mode" in str(w.message)]


@pytest.mark.e2e
@pytest.mark.slow
def test_a_run_killed_mid_task_on_a_base_with_dropout_resumes_to_the_uninterrupted_result(tmp_path):
    base = (
        "--model.backbone.config",
        "null",
        "--model.backbone.name_or_path",
        str(pretrained_with_dropout(tmp_path / "base")),
    )
    full = train(tmp_path / "full", *base)
    assert full.returncode == 0, full.stderr[-3000:]
    assert "eval mode" not in full.stderr
    killed = train(tmp_path / "killed", *base, *callbacks_with(KILLS["mid-task"]))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    lr_monitor = '{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor"}'
    resumed = train(tmp_path / "killed", *base, *callbacks_with(lr_monitor), "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want, got = (
        artefacts(tmp_path / "full" / "tiny" / "version_0"),
        artefacts(tmp_path / "killed" / "tiny" / "version_0"),
    )
    assert got.keys() == want.keys()
    for k, v in want.items():
        np.testing.assert_allclose(got[k], v, atol=1e-6, rtol=0, err_msg=k)
