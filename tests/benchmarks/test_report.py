"""benchmarks/report.py's paired interval: method A minus method B on the same test examples, with a
bootstrap over seeds and, within each seed, examples."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from subproc import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

from report import paired_interval  # noqa: E402


def runs(p: dict[str, float], seeds=(0, 1, 2), n: int = 300, key: str = "task_id") -> dict:
    """Per seed, per task, ``n`` 0/1 scores with success rate ``p[task]`` (a fixed generator)."""
    rng = np.random.default_rng(7)
    return {
        s: {"examples": {key: {t: (rng.random(n) < q).astype(float).tolist() for t, q in p.items()}}}
        for s in seeds
    }


def test_the_point_is_the_mean_difference_of_the_average_accuracy():
    a, b = runs({"x": 0.9, "y": 0.5}), runs({"x": 0.6, "y": 0.5})
    point, lo, hi = paired_interval(a, b, [0, 1, 2], "task_id")
    want = np.mean(
        [
            np.mean(
                [
                    np.mean(a[s]["examples"]["task_id"][t]) - np.mean(b[s]["examples"]["task_id"][t])
                    for t in "xy"
                ]
            )
            for s in (0, 1, 2)
        ]
    )
    assert point == pytest.approx(100 * want) and lo < point < hi
    assert lo > 0  # 15 points apart on 900 examples a task: told apart


def test_a_method_against_itself_is_zero_and_an_unknown_split_is_none():
    a = runs({"x": 0.7, "y": 0.4})
    assert paired_interval(a, a, [0, 1, 2], "task_id") == (0.0, 0.0, 0.0)
    assert paired_interval(a, a, [0, 1, 2], "no_task_id") is None  # no per-example scores kept there
    b = runs({"x": 0.7, "y": 0.4}, n=200)  # other examples: not paired
    assert paired_interval(a, b, [0, 1, 2], "task_id") is None
