"""benchmarks/run.py end to end on the toy model (experiment files like benchmarks/experiments/*.yaml, on
configs/tiny.yaml): the reproduction's runs, resume, report, ablation and figure; the recipe comparison;
the methods table's selection on validation and its reuse of the reproduction's runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from crma_lightning.evaluation import metrics as clm
from crma_lightning.runs.rundir import read_matrix_csv

pytestmark = pytest.mark.e2e  # every test here runs a fit through train.py's CLI

REPO = Path(__file__).resolve().parents[2]
SIZES = ["--data.train_size", "32", "--data.holdout_size", "16", "--data.epochs_per_task", "1"]


def experiment(tmp_path: Path, name: str, **fields) -> Path:
    """An experiment file on the toy model (sizes: ``SIZES`` then ``fit``), runs in ``tmp_path/<runs>``,
    its record ``tmp_path/<name>.json``."""
    fit = [*SIZES, *fields.pop("fit", ())]
    runs = str(tmp_path / fields.pop("runs", "runs"))
    defaults = {
        "kind": "reproduction",
        "config": "configs/tiny.yaml",
        "methods": ["naive", "frozen", "modular"],
        "seeds": [0, 1],
        "fit_args": fit,
        "runs_dir": runs,
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**defaults, **fields, "out": str(tmp_path / f"{name}.json")}))
    return path


def bench(path: Path) -> subprocess.CompletedProcess:
    """``python benchmarks/run.py <experiment> --jobs 2 --threads 1``."""
    cmd = [sys.executable, "benchmarks/run.py", str(path), "--jobs", "2", "--threads", "1"]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def fitted_at(report: Path) -> set[str]:
    """The runs a report's ``code.run_commits`` lists, over every commit."""
    return {run for runs in json.loads(report.read_text())["code"]["run_commits"].values() for run in runs}


def reproduce(tmp_path: Path) -> subprocess.CompletedProcess:
    return bench(experiment(tmp_path, "repro"))


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
            assert res["validation"]["drift"][c]["per_seed"][k] == pytest.approx(
                clm.drift_pct(val), abs=1e-12
            )
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
    assert res["spectral"]["max_sigma"] <= 1
    md = (tmp_path / "repro.md").read_text()
    for heading in (
        "Loss-relative drift",
        "MODULAR vs FROZEN",
        "Final test loss",
        "Inference ablation",
        "Validation split",
        "Gradient norm",
        "Spectral bound",
        "Protocol",
        "+42.96 ± 5.50",
    ):
        assert heading in md, heading
    assert (tmp_path / "repro.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun reuses the finished runs (a killed reproduction resumes) and reports the same numbers
    proc = reproduce(tmp_path)
    assert proc.stdout.count("recorded:") == 6 and "train.py fit" not in proc.stdout
    again = json.loads((tmp_path / "repro.json").read_text())["results"]
    assert again["drift"] == res["drift"] and again["ablation"] == res["ablation"]
    # the report lists the commit(s) its runs were fitted at, from their records
    assert fitted_at(tmp_path / "repro.json") == {
        f"{c}_s{s}" for c in res["conditions"] for s in res["seeds"]
    }
    recipe_report_pairs_a_setting_with_the_reproduction(tmp_path, res)


def recipe_report_pairs_a_setting_with_the_reproduction(tmp_path: Path, current: dict) -> None:
    """A recipe experiment over the reproduction above and a MODULAR-only setting (PiSSA): the
    setting's MODULAR vs FROZEN takes FROZEN from the reproduction, seed by seed, on the test split."""
    pissa = experiment(
        tmp_path,
        "pissa",
        methods=["modular"],
        runs="pissa_runs",
        fit=("--config", "configs/recipe/pissa.yaml"),
    )
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "kind": "recipe",
                "current": str(tmp_path / "repro.yaml"),
                "settings": {"PiSSA": str(pissa)},
                "out": str(tmp_path / "recipe.json"),
            }
        )
    )
    proc = bench(recipe)
    assert proc.stdout.count("recorded:") == 6  # the reproduction's runs read from records, PiSSA's fitted
    out = tmp_path / "recipe.md"
    cur, pissa = json.loads((tmp_path / "recipe.json").read_text())["settings"]
    assert pissa["override"].endswith("--config configs/recipe/pissa.yaml")
    mod = pissa["conditions"]["modular"]
    assert list(pissa["conditions"]) == ["modular"] and mod["frozen_from"] == "the current recipe"

    def test_matrix(runs: str, cond: str, seed: int) -> np.ndarray:
        run = next((tmp_path / runs / f"{cond}_s{seed}").glob("version_*"))
        return read_matrix_csv(run / "continual" / "test" / "loss_matrix.csv")[2]

    for k, seed in enumerate((0, 1)):
        frozen, m = test_matrix("runs", "frozen", seed)[-1], test_matrix("pissa_runs", "modular", seed)[-1]
        assert mod["test"]["vs_frozen"][k] == pytest.approx(
            100 * np.mean((frozen[:-1] - m[:-1]) / frozen[:-1]), abs=1e-9
        )
        assert mod["test"]["drift"][k] == pytest.approx(
            clm.drift_pct(test_matrix("pissa_runs", "modular", seed)), abs=1e-12
        )
        assert cur["conditions"]["modular"]["test"]["drift"][k] == current["drift"]["modular"]["per_seed"][k]
        assert mod["crma_peak"][k] > 0 and mod["lora_peak"][k] > 0 and mod["clipped"][k] is None  # fixed clip
    # the PiSSA read projection starts CRMA elsewhere, so the runs differ from the reproduction's MODULAR
    assert mod["test"]["drift"] != cur["conditions"]["modular"]["test"]["drift"]
    md = out.read_text()
    for heading in (
        "## What ran",
        "CRMA init: pissa",
        "paired by seed",
        "## Validation split",
        "CRMA off at inference",
    ):
        assert heading in md, heading
    assert (tmp_path / "recipe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"current recipe: naive_s0", "PiSSA: modular_s1"} <= fitted_at(tmp_path / "recipe.json")


@pytest.mark.slow
def test_methods_comparison_selects_on_validation(tmp_path):
    runs = tmp_path / "runs"
    methods = experiment(
        tmp_path,
        "methods",
        kind="methods",
        methods=["frozen", "ewc"],
        task_id="both",
        grid={"ewc": [1000.0, 10000.0]},
    )
    bench(methods)
    res = json.loads((tmp_path / "methods.json").read_text())["results"]

    def matrix(run: Path, split: str, blind: bool = False) -> np.ndarray:
        sub = "continual/test" if split == "test" else "continual"
        return read_matrix_csv(run / sub / f"loss_matrix{'_no_task_id' if blind else ''}.csv")[2]

    # EWC: both grid values at the selection seed, only the kept one at the other; kept = the lowest
    # final average *validation* loss
    grid = {
        float(v): clm.final_avg_loss(
            matrix(next((runs / f"ewc_weight={v:g}_s0").glob("version_*")), "validation")
        )
        for v in (1000, 10000)
    }
    assert sorted(p.name for p in runs.glob("ewc_*")) == sorted(
        [f"ewc_weight={v:g}_s0" for v in grid] + [f"ewc_weight={min(grid, key=grid.get):g}_s1"]
    )
    ewc = res["methods"]["ewc"]
    assert ewc["value"] == min(grid, key=grid.get)
    for seed, p in ewc["per_seed"].items():  # test numbers recomputed from each run's own test matrix
        assert p["run"] == f"ewc_weight={ewc['value']:g}_s{seed}"
        loss = matrix(next((runs / p["run"]).glob("version_*")), "test")
        assert p["test"]["final_avg_loss"] == pytest.approx(clm.final_avg_loss(loss), abs=1e-12)
        assert p["test"]["drift_pct"] == pytest.approx(clm.drift_pct(loss), abs=1e-12)
        assert p["test"]["bwt"] == pytest.approx(-clm.bwt(loss), abs=1e-12)
        # a shared LoRA serves every input as it is: without the task id nothing changes
        assert p["no_task_id"] == "shared"
        assert p["test_no_task_id"]["final_avg_loss"] == pytest.approx(p["test"]["final_avg_loss"], abs=1e-6)
    frozen = res["methods"]["frozen"]["per_seed"]["1"]
    assert frozen["routing_acc"] is not None and frozen["no_task_id"] == "route"
    assert fitted_at(tmp_path / "methods.json") == {"frozen_s0", "frozen_s1", "ewc_weight=1000_s0"} | {
        "ewc_weight=10000_s0",
        f"ewc_weight={ewc['value']:g}_s1",
    }
    md = (tmp_path / "methods.md").read_text()
    for heading in ("Results (test split)", "The selection (seed 0)", "weight = 10000", "Protocol"):
        assert heading in md, heading
    # a rerun reads every run from its record: nothing is fitted again
    again = bench(methods)
    assert "train.py fit" not in again.stdout and again.stdout.count("recorded:") == 5
