"""Continual-learning metrics on hand-computed matrices (docs/method.md §4)."""

from __future__ import annotations

import numpy as np
import pytest

from crma_lightning.evaluation import metrics as m

# base row, then after task 1, 2, 3
LOSS = np.array(
    [
        [4.0, 4.0, 4.0],
        [2.0, 3.5, 3.9],
        [2.5, 2.0, 3.0],
        [3.0, 2.2, 1.0],
    ]
)
ACC = np.array(
    [
        [0.1, 0.2, 0.0],
        [0.8, 0.3, 0.1],
        [0.6, 0.9, 0.4],
        [0.5, 0.7, 0.95],
    ]
)


def test_drift_is_mean_relative_loss_increase_on_prior_tasks():
    # task 1: (3.0 - 2.0) / 2.0 = 0.5; task 2: (2.2 - 2.0) / 2.0 = 0.1 -> mean 0.3 -> 30 %
    assert m.drift_pct(LOSS) == pytest.approx(30.0)


def test_bwt_fwt_forgetting():
    assert m.bwt(ACC) == pytest.approx(((0.5 - 0.8) + (0.7 - 0.9)) / 2)
    # FWT: task 2 after task 1 vs base (0.3 - 0.2), task 3 after task 2 vs base (0.4 - 0.0)
    assert m.fwt(ACC) == pytest.approx(((0.3 - 0.2) + (0.4 - 0.0)) / 2)
    # forgetting: task 1 best of rows 1..2 = 0.8 -> 0.8 - 0.5; task 2 best 0.9 -> 0.9 - 0.7
    assert m.forgetting(ACC) == pytest.approx(((0.8 - 0.5) + (0.9 - 0.7)) / 2)
    assert m.final_avg_loss(LOSS) == pytest.approx((3.0 + 2.2 + 1.0) / 3)


def test_frozen_oracle_has_zero_drift_and_modular_advantage():
    frozen = LOSS.copy()
    frozen[2, 0] = frozen[3, 0] = frozen[1, 0]
    frozen[3, 1] = frozen[2, 1]
    assert m.drift_pct(frozen) == 0.0
    modular = frozen.copy()
    modular[3, :2] *= 0.98  # prior tasks 2 % better at the end
    assert m.modular_vs_frozen_pct(frozen, modular) == pytest.approx(2.0)
    assert m.drift_pct(modular) == pytest.approx(-2.0)


def test_single_task_and_shape_errors():
    one = np.array([[3.0], [1.0]])
    s = m.summarize(one, one / 4)
    assert s["drift_pct"] is None and s["bwt"] is None and s["fwt"] is None and s["forgetting"] is None
    assert s["final_avg_loss"] == 1.0
    with pytest.raises(ValueError, match="base row"):
        m.drift_pct(np.ones((3, 3)))


def test_mean_sd_uses_sample_sd():
    mean, sd = m.mean_sd([38.1, 41.7, 49.0])  # the paper's NAIVE drift per seed
    assert mean == pytest.approx(42.933, abs=1e-3)
    assert sd == pytest.approx(5.554, abs=1e-3)  # the paper reports 42.96 +- 5.5
    assert m.mean_sd([1.0]) == (1.0, None)


def _unscored(a: np.ndarray, cells: list[tuple[int, int]]) -> list[list[float | None]]:
    rows = a.tolist()
    for r, c in cells:
        rows[r][c] = None
    return rows


def test_a_metric_reads_only_its_cells_and_is_none_when_one_is_unscored():
    full = m.summarize(LOSS, ACC)
    # ``seen``: the upper triangle unscored. FWT needs it; the rest equal the full matrices'.
    seen = [(1, 1), (1, 2), (2, 2)]
    s = m.summarize(_unscored(LOSS, seen), _unscored(ACC, seen))
    assert s["fwt"] is None
    for key in ("drift_pct", "bwt", "final_avg_loss", "final_avg_accuracy"):
        assert s[key] == pytest.approx(full[key]), key
    # Forgetting over the scored rows since each task was trained: task 1 max(0.8, 0.6), task 2 0.9.
    assert s["forgetting"] == pytest.approx(np.mean([0.8 - 0.5, 0.9 - 0.7]))
    # ``minimal``: the diagonal, superdiagonal and final row; a cell of the final row unscored
    # leaves BWT, drift and the final averages absent, not wrong.
    minimal = [(2, 0)]
    s = m.summarize(_unscored(LOSS, minimal), _unscored(ACC, minimal))
    assert s["fwt"] == pytest.approx(full["fwt"]) and s["bwt"] == pytest.approx(full["bwt"])
    gone = [(3, 1)]
    s = m.summarize(_unscored(LOSS, gone), _unscored(ACC, gone))
    assert {
        k: s[k] for k in ("drift_pct", "bwt", "forgetting", "final_avg_loss", "final_avg_accuracy")
    } == dict.fromkeys(("drift_pct", "bwt", "forgetting", "final_avg_loss", "final_avg_accuracy"))
    assert m.modular_vs_frozen_pct(_unscored(LOSS, gone), LOSS) is None
    # NaN is "does not apply", not unscored: it propagates as before.
    nan = ACC.copy()
    nan[3, 0] = np.nan
    assert np.isnan(m.bwt(nan))
