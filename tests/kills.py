"""`train.py fit` of configs/tiny.yaml with a fault injected (tests/faults.py), and the artefacts
that must equal an uninterrupted run's: shared by the resume tests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
from safetensors.torch import load_file
from subproc import REPO, run_train

from crma_lightning.runs.rundir import read_matrix_csv

FAST = [
    "--data.train_size",
    "128",
    "--data.holdout_size",
    "48",
    "--model.lr.lora",
    "0.02",
    "--model.lora.dropout",
    "0.1",
]


def train(save_dir: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return run_train(
        "fit",
        "--config",
        "configs/tiny.yaml",
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        *FAST,
        *args,
        timeout=timeout,
        env={"PYTHONPATH": str(REPO / "tests")},
    )


def callbacks_with(fault: str) -> list[str]:
    """The trainer.callbacks list (JSON): the fault injector (it runs after the method's callbacks,
    so after evaluation and adapter saving) and the config's ModelCheckpoint."""
    items = [json.loads(fault)]
    items.append(
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"save_last": True, "save_top_k": 0, "every_n_train_steps": 10},
        }
    )
    return ["--trainer.callbacks", json.dumps(items)]


def artefacts(run_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for name in ("loss_matrix.csv", "accuracy_matrix.csv"):
        matrix = read_matrix_csv(run_dir / "continual" / name)
        assert matrix.rows == ["base", "alpha", "beta", "gamma"]
        out[name] = matrix.values
    for f in [
        *sorted((run_dir / "adapters").rglob("*.safetensors")),
        *sorted((run_dir / "routing").glob("*.safetensors")),
    ]:
        for k, v in load_file(f).items():
            out[f"{f.parent.name}/{f.name}/{k}"] = v.numpy()
    return out


KILLS = {
    "mid-task": '{"class_path": "faults.KillAtStep", "init_args": {"step": 25}}',
    "after-task-boundary": '{"class_path": "faults.KillAtEpochStart", "init_args": {"epoch": 2}}',
    "during-evaluation": '{"class_path": "faults.KillDuringEvaluation", "init_args": {"row": 3}}',
}
