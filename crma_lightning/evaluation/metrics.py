"""Continual-learning metrics from the raw loss and accuracy matrices (docs/method.md §4).

``L[j, i]`` is the mean holdout loss on task i after training task j, with row 0 the base model
before any training (shape ``(T + 1, T)``); ``A`` is the same for token accuracy. Pure numpy
functions; every summary number is computed from these matrices, and metrics undefined for T = 1
(no prior task) are None. The formulas are in docs/method.md §4 and on each function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _matrix(m: Sequence[Sequence[float]] | np.ndarray) -> np.ndarray:
    a = np.asarray(m, dtype=np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1] + 1:
        raise ValueError(f"expected a (T + 1, T) matrix with the base row first, got shape {a.shape}")
    return a


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
    return float(100.0 * np.mean((L[T, i] - L[i + 1, i]) / L[i + 1, i]))


def bwt(acc: np.ndarray) -> float | None:
    """Backward transfer (Lopez-Paz & Ranzato 2017, positive = good): ``mean_i (A[T, i] - A[i, i])``
    over i < T."""
    A = _matrix(acc)
    T = A.shape[1]
    if T < 2:
        return None
    i = np.arange(T - 1)
    return float(np.mean(A[T, i] - A[i + 1, i]))


def fwt(acc: np.ndarray) -> float | None:
    """Forward transfer: ``mean_{i >= 2} (A[i - 1, i] - A[0, i])``."""
    A = _matrix(acc)
    T = A.shape[1]
    if T < 2:
        return None
    c = np.arange(1, T)  # 0-based columns of tasks 2..T; row c = after training the task before
    return float(np.mean(A[c, c] - A[0, c]))


def forgetting(acc: np.ndarray) -> float | None:
    """Forgetting (Chaudhry et al. 2018): ``mean_i (max_{1 <= k < T} A[k, i] - A[T, i])`` over i < T."""
    A = _matrix(acc)
    T = A.shape[1]
    if T < 2:
        return None
    i = np.arange(T - 1)
    best = A[1:T, :][:, i].max(axis=0)  # max over rows k = 1..T-1
    return float(np.mean(best - A[T, i]))


def final_avg_loss(loss: np.ndarray) -> float:
    """The mean loss over every task after the last one: ``mean_i L[T, i]``."""
    L = _matrix(loss)
    return float(np.mean(L[-1]))


def modular_vs_frozen_pct(loss_frozen: np.ndarray, loss_modular: np.ndarray) -> float | None:
    """MODULAR-vs-FROZEN advantage, %: ``100 * mean_i (L_F[T, i] - L_M[T, i]) / L_F[T, i]`` over i < T."""
    LF, LM = _matrix(loss_frozen), _matrix(loss_modular)
    T = LF.shape[1]
    if T < 2:
        return None
    i = np.arange(T - 1)
    return float(100.0 * np.mean((LF[T, i] - LM[T, i]) / LF[T, i]))


def summarize(loss: np.ndarray, acc: np.ndarray) -> dict[str, float | None]:
    """All single-run summary metrics, as written to ``continual/summary.json``."""
    return {
        "drift_pct": drift_pct(loss),
        "bwt": bwt(acc),
        "fwt": fwt(acc),
        "forgetting": forgetting(acc),
        "final_avg_loss": final_avg_loss(loss),
        "final_avg_accuracy": float(np.mean(_matrix(acc)[-1])),
    }


def mean_sd(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for a single value)."""
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), (float(a.std(ddof=1)) if a.size > 1 else None)
