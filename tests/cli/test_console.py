"""A fit prints only the run's own lines: no warning, no Lightning tip or per-module summary, a
progress bar named by its task."""

from __future__ import annotations

import re

import pytest
from subproc import run_train

pytestmark = pytest.mark.e2e  # every test here runs a fit through train.py's CLI

NOISE = (
    "litlogger",
    "FLOPs",
    "holdout_sums",
    "Training:",
    "Epoch ",
    "v_num",
    "eval mode",
    "LeafSpec",
    "Total length of",
    "GPU available",
)


def test_a_tiny_fit_prints_only_its_own_lines(tmp_path):
    proc = run_train(
        "fit",
        "--config",
        "configs/tiny.yaml",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path),
        "--data.train_size",
        "32",
        "--data.holdout_size",
        "16",
        env={"PYTHONWARNINGS": ""},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr
    assert not re.search(r"\.py:\d+: ", proc.stderr), proc.stderr  # a warning printed in any format
    assert proc.stderr.splitlines() == [
        f"open it in TensorBoard: tensorboard --logdir {tmp_path}/tiny/version_0"
    ]
    assert not [word for word in NOISE if word in proc.stdout]
    assert "modular: 3 tasks on 1 x cpu, precision 32-true" in proc.stdout
    assert re.search(r"LoRA alpha +\d.* trains in task 1", proc.stdout)
    assert re.search(r"CRMA +\d.* trains in every task \(2 layers\)", proc.stdout)
    assert "task 1/3 alpha trains LoRA alpha + CRMA" in proc.stdout
    assert "task 2/3 beta (epoch 2/2): 100%" in proc.stdout
