"""benchmarks/reproduce.py end to end on the toy model: runs, resume, report, ablation, figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crma_lightning import metrics as clm
from crma_lightning.rundir import read_matrix_csv

REPO = Path(__file__).resolve().parents[1]
SIZES = ["--data.train_size", "32", "--data.holdout_size", "16", "--data.epochs_per_task", "1"]


def reproduce(tmp_path: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "benchmarks/reproduce.py", "--config", "configs/tiny.yaml", "--seeds", "0,1",
           "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "repro.md"), "--jobs", "2",
           "--threads", "1", "--", *SIZES]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_reproduction_on_the_tiny_model(tmp_path):
    reproduce(tmp_path)
    res = json.loads((tmp_path / "repro.json").read_text())["results"]
    assert res["conditions"] == ["naive", "frozen", "modular"] and res["seeds"] == [0, 1]
    for c in res["conditions"]:
        for k, seed in enumerate(res["seeds"]):
            run = next((tmp_path / "runs" / f"{c}_s{seed}").glob("version_*"))
            loss = read_matrix_csv(run / "continual" / "test" / "loss_matrix.csv")[2]
            val = read_matrix_csv(run / "continual" / "loss_matrix.csv")[2]
            # every number in the report is recomputed from the run's own matrix: test reported,
            # validation (where settings are chosen) beside it
            assert res["drift"][c]["per_seed"][k] == pytest.approx(clm.drift_pct(loss), abs=1e-12)
            assert res["final_loss"][c]["per_seed"][k] == pytest.approx(loss[-1].tolist())
            assert res["validation"]["drift"][c]["per_seed"][k] == pytest.approx(clm.drift_pct(val), abs=1e-12)
            assert not np.allclose(loss, val)
            assert set(res["grad_norm"][c][str(seed)]) == set(res["tasks"])
    # FROZEN is the exact oracle: nothing a prior task uses changes
    assert res["split"] == "test" and res["drift"]["frozen"]["per_seed"] == [0.0, 0.0]
    mean, sd = clm.mean_sd(res["drift"]["naive"]["per_seed"])
    assert (res["drift"]["naive"]["mean"], res["drift"]["naive"]["sd"]) == pytest.approx((mean, sd))
    assert res["drift"]["naive"]["mean"] > 0  # the synthetic tasks are built so that NAIVE forgets
    # the ablation, each run loaded through serve, gives the run's own last row with CRMA on (the CSV
    # keeps 8 significant digits), and differs off
    assert res["ablation"]["max_diff_vs_run"] < 1e-6
    assert not np.allclose(res["ablation"]["on_mean"], res["ablation"]["off_mean"], rtol=0, atol=1e-7)
    assert res["spectral"]["max_sigma"] <= 1 + 1e-6
    md = (tmp_path / "repro.md").read_text()
    for heading in ("Loss-relative drift", "MODULAR vs FROZEN", "Final test loss", "Inference ablation", "Validation split",
                    "Gradient norm", "Spectral bound", "Protocol", "+42.96 ± 5.50"):  # fmt: skip
        assert heading in md, heading
    assert (tmp_path / "repro.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun reuses the finished runs (a killed reproduction resumes) and reports the same numbers
    proc = reproduce(tmp_path)
    assert proc.stdout.count("already finished") == 6
    again = json.loads((tmp_path / "repro.json").read_text())["results"]
    assert again["drift"] == res["drift"] and again["ablation"] == res["ablation"]
