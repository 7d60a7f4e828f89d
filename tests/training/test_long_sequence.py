"""A 30-task run of configs/tiny.yaml keeps nothing per finished task but that task's LoRA weights.

Runs ``benchmarks/cost.py long-sequence`` (one ``train.py fit`` with the ResourceMonitor callback
and a checkpoint after every task) and checks its per-task series: the optimizer state never
grows (no finished task's moments are kept), the checkpoint grows at most linearly (the evaluation
rows and small per-task records) and by little, the training step does not slow down, and the
memory the process holds (after returning the allocator's free pages) grows at most linearly.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
from subproc import REPO

pytestmark = pytest.mark.e2e  # every test here runs a fit through train.py's CLI

sys.path.insert(0, str(REPO / "benchmarks"))


@pytest.mark.slow
def test_thirty_tasks_grow_at_most_linearly(tmp_path):
    import cost

    res = cost.main(["long-sequence", "--tasks", "30", "--out", str(tmp_path / "long"), "--timeout", "900"])
    s, g = res["series"], res["growth"]
    assert len(s["checkpoint_mb"]) == 30
    # Optimizer state: only the current task's LoRA and the CRMA, the same bytes every task.
    assert max(s["optimizer_state_mb"]) == min(s["optimizer_state_mb"]) > 0
    assert len(set(res["trainable_params"])) == 1
    # Checkpoint: linear (residual of a linear fit < 0.1 %) and under 4 KiB per task: the evaluation
    # state's new row (30 tasks x 7 metrics since task metrics, most of them NaN on these tasks) and
    # small per-task records, nothing like a copy of a LoRA (70 KiB here).
    assert g["checkpoint_mb"]["max_linear_residual_rel"] < 1e-3
    assert 0 <= g["checkpoint_mb"]["slope_per_task"] * 1024 < 4.0, g["checkpoint_mb"]
    # Step cost: flat. Process CPU time (wall time on a shared machine mostly measures neighbours):
    # the last tasks' median within 1.5x the first's, and no trend over 2 % of a step per task.
    steps = np.asarray(s["step_cpu_s_median"])
    assert np.median(steps[-5:]) <= 1.5 * np.median(steps[:5])
    assert g["step_cpu_s_median"]["slope_per_task"] < 0.02 * np.median(steps[:5])
    # Held memory: no faster than linear, and under 2 MiB per task (a finished LoRA here is 70 KiB).
    held = g["held_anon_mb"]
    assert held["slope_per_task"] < 2.0 and held["quadratic_coef"] < 0.05, held
