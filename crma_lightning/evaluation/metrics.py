"""Continual-learning metrics from the raw loss and accuracy matrices (docs/method.md §4).

``L[j, i]`` is the mean holdout loss on task i after training task j, with row 0 the base model
before any training (shape ``(T + 1, T)``); ``A`` is the same for token accuracy. Pure numpy
functions; every summary number is computed from these matrices, and metrics undefined for T = 1
(no prior task) are None. The formulas are in docs/method.md §4 and on each function.

A cell may be unscored (``evaluation.schedule: seen`` or ``minimal``): ``None`` in a list of rows,
or masked in a ``numpy.ma`` array. Each metric reads only its own cells, and one whose cells are
unscored is None (absent, not wrong); a NaN cell is a metric that does not apply and propagates.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

Cells = Sequence[Sequence[float | None]] | np.ndarray


def as_masked(m: Cells) -> np.ma.MaskedArray:
    """A matrix as float64 with its unscored cells (None, or already masked) masked; NaN stays NaN."""
    if isinstance(m, np.ma.MaskedArray):
        return np.ma.masked_array(m.astype(np.float64), mask=np.ma.getmaskarray(m))
    raw = np.asarray(m, dtype=object)
    missing = np.frompyfunc(lambda v: v is None, 1, 1)(raw).astype(bool) if raw.size else raw.astype(bool)
    values = np.where(missing, np.nan, raw).astype(np.float64)
    return np.ma.masked_array(values, mask=missing)


def _matrix(m: Cells) -> np.ma.MaskedArray:
    a = as_masked(m)
    if a.ndim != 2 or a.shape[0] != a.shape[1] + 1:
        raise ValueError(f"expected a (T + 1, T) matrix with the base row first, got shape {a.shape}")
    return a


def _cells(a: np.ma.MaskedArray, rows, cols) -> np.ndarray | None:
    """The cells ``a[rows, cols]`` as a plain array, or None when any of them is unscored."""
    picked = a[rows, cols]
    return None if np.ma.getmaskarray(picked).any() else np.ma.getdata(picked)


def _none_if_nan(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def drift_pct(loss: np.ndarray) -> float | None:
    """Loss-relative drift, % (positive = forgetting): ``100 * mean_i (L[T, i] - L[i, i]) / L[i, i]``
    over i < T (inferred from the paper's wording, arXiv 2606.00382)."""
    L = _matrix(loss)
    T = L.shape[1]
    if T < 2:
        return None
    i = np.arange(T - 1)  # prior tasks, 0-based columns; their "just trained" row is i + 1
    final, trained = _cells(L, T, i), _cells(L, i + 1, i)
    if final is None or trained is None:
        return None
    return float(100.0 * np.mean((final - trained) / trained))


def bwt(acc: np.ndarray) -> float | None:
    """Backward transfer (Lopez-Paz & Ranzato 2017, positive = good): ``mean_i (A[T, i] - A[i, i])``
    over i < T."""
    A = _matrix(acc)
    T = A.shape[1]
    if T < 2:
        return None
    i = np.arange(T - 1)
    final, trained = _cells(A, T, i), _cells(A, i + 1, i)
    if final is None or trained is None:
        return None
    return float(np.mean(final - trained))


def fwt(acc: np.ndarray) -> float | None:
    """Forward transfer: ``mean_{i >= 2} (A[i - 1, i] - A[0, i])``."""
    A = _matrix(acc)
    T = A.shape[1]
    if T < 2:
        return None
    c = np.arange(1, T)  # 0-based columns of tasks 2..T; row c = after training the task before
    before, base = _cells(A, c, c), _cells(A, 0, c)
    if before is None or base is None:
        return None
    return float(np.mean(before - base))


def forgetting(acc: np.ndarray) -> float | None:
    """Forgetting (Chaudhry et al. 2018): ``mean_i (max_{1 <= k < T} A[k, i] - A[T, i])`` over i < T.

    The max runs over the scored rows k (every row under ``full``; under ``seen`` the rows since
    task i was trained; under ``minimal`` its diagonal row and the row before it); None when a
    final-row cell is unscored."""
    A = _matrix(acc)
    T = A.shape[1]
    if T < 2:
        return None
    i = np.arange(T - 1)
    final = _cells(A, T, i)
    earlier = A[1:T, :][:, i]  # rows k = 1..T-1
    if final is None or np.ma.getmaskarray(earlier).all(axis=0).any():
        return None
    # The max of each column's scored cells; NaN (a metric that does not apply) propagates as before.
    best = np.array([np.max(col.compressed()) for col in earlier.T])
    return float(np.mean(best - final))


def final_avg_loss(loss: np.ndarray) -> float | None:
    """The mean loss over every task after the last one: ``mean_i L[T, i]``."""
    return final_avg(loss)


def final_avg(m: Cells) -> float | None:
    """The mean of the final row (None when a cell of it is unscored)."""
    a = _matrix(m)
    last = _cells(a, a.shape[0] - 1, np.arange(a.shape[1]))
    return None if last is None else float(np.mean(last))


def modular_vs_frozen_pct(loss_frozen: np.ndarray, loss_modular: np.ndarray) -> float | None:
    """MODULAR-vs-FROZEN advantage, %: ``100 * mean_i (L_F[T, i] - L_M[T, i]) / L_F[T, i]`` over i < T."""
    LF, LM = _matrix(loss_frozen), _matrix(loss_modular)
    T = LF.shape[1]
    if T < 2:
        return None
    i = np.arange(T - 1)
    f, m = _cells(LF, T, i), _cells(LM, T, i)
    if f is None or m is None:
        return None
    return float(100.0 * np.mean((f - m) / f))


def summarize(loss: np.ndarray, acc: np.ndarray) -> dict[str, float | None]:
    """All single-run summary metrics, as written to ``continual/summary.json``."""
    return {
        "drift_pct": drift_pct(loss),
        "bwt": bwt(acc),
        "fwt": fwt(acc),
        "forgetting": forgetting(acc),
        "final_avg_loss": final_avg_loss(loss),
        "final_avg_accuracy": final_avg(acc),
    }


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else None)
