"""scripts/compare_runs.py says "same" only for bit-identical tensors and matrices."""

from __future__ import annotations

import importlib.util
import json

import torch
from safetensors.torch import save_file
from subproc import REPO

spec = importlib.util.spec_from_file_location("compare_runs", REPO / "scripts" / "compare_runs.py")
compare_runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_runs)


def fake_run(path, weight: float, loss: str, seconds: float):
    (path / "adapters" / "a").mkdir(parents=True)
    (path / "continual").mkdir()
    save_file({"w": torch.full((2, 2), weight)}, path / "adapters" / "a" / "adapter_model.safetensors")
    (path / "continual" / "loss_matrix.csv").write_text(f"after,a\nbase,{loss}\n")
    (path / "continual" / "summary.json").write_text(json.dumps({"drift_pct": 1.0, "evaluation_s": seconds}))
    return path


def test_same_only_when_bit_identical(tmp_path):
    a = fake_run(tmp_path / "a", 0.5, "4.25", 1.0)
    assert compare_runs.main([str(a), str(fake_run(tmp_path / "b", 0.5, "4.25", 2.0))]) == 0  # timings aside
    assert compare_runs.main([str(a), str(fake_run(tmp_path / "c", 0.5 + 1e-7, "4.25", 1.0))]) == 1
    assert (
        compare_runs.main([str(a), str(fake_run(tmp_path / "d", 0.5 + 1e-7, "4.25", 1.0)), "--atol", "1e-6"])
        == 0
    )
    assert compare_runs.main([str(a), str(fake_run(tmp_path / "e", 0.5, "4.26", 1.0))]) == 1


def test_a_cell_scored_in_one_run_only_is_a_difference_and_says_so(tmp_path, capsys):
    a = fake_run(tmp_path / "a", 0.5, "4.25", 1.0)
    b = fake_run(tmp_path / "b", 0.5, "", 1.0)  # the cell not scored (evaluation.schedule)
    assert compare_runs.main([str(a), str(b)]) == 1
    assert "1 cells scored in one run only" in capsys.readouterr().out
