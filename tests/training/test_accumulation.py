"""Gradient accumulation takes the token mean over the whole window: batch 8 accumulated twice
trains exactly as batch 16, also when examples score different numbers of tokens (as DDP does
over its ranks)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import TINY_CONFIGS
from distributed_helpers import fit
from keyword_tasks import KEYWORDS, write_task
from safetensors.torch import load_file

from crma_lightning.runs.rundir import read_matrix_csv


@pytest.mark.e2e
def test_two_micro_batches_of_8_train_as_one_batch_of_16(tmp_path):
    # "Sports" and "Business" labels score 4 and 7 tokens, so a mean of the two micro-batch means
    # weights them differently: measured then, adapters 4.7e-5 and losses 9.3e-6 apart; now 9e-10 and 0.
    tasks = [
        {"name": t, "source": write_task(tmp_path, t), "format": "classification", "text_field": "sentence"}
        for t in KEYWORDS
    ]
    backbone = {**TINY_CONFIGS["llama"], "vocab_size": 512, "max_position_embeddings": 128}
    common = [
        "--config",
        "configs/tiny.yaml",
        "--config",
        "configs/methods/frozen.yaml",
        "--model.backbone.config",
        json.dumps(backbone),
        "--data.tasks",
        json.dumps(tasks),
        "--data.tokenizer",
        "tiny",
        "--data.max_length",
        "64",
        "--data.train_size",
        "64",
        "--data.holdout_size",
        "8",
        "--data.test_size",
        "8",
        "--data.epochs_per_task",
        "3",
        "--trainer.callbacks",
        "[]",
        "--model.optimizer",
        json.dumps({"class_path": "torch.optim.SGD", "init_args": {"lr": 2.0}}),
    ]
    whole = fit(tmp_path / "whole", *common, "--data.batch_size", "16")
    accumulated = fit(
        tmp_path / "micro", *common, "--data.batch_size", "8", "--trainer.accumulate_grad_batches", "2"
    )
    for name in ("loss_matrix.csv", "test/loss_matrix.csv"):
        a, b = (
            read_matrix_csv(whole / "continual" / name)[2],
            read_matrix_csv(accumulated / "continual" / name)[2],
        )
        np.testing.assert_allclose(b, a, atol=1e-7, rtol=0, err_msg=name)
    files = sorted((whole / "adapters").rglob("*.safetensors"))
    assert files
    for f in files:
        want, got = load_file(f), load_file(accumulated / f.relative_to(whole))
        for k, v in want.items():
            np.testing.assert_allclose(got[k].numpy(), v.numpy(), atol=1e-8, rtol=0, err_msg=f"{f.name}/{k}")
