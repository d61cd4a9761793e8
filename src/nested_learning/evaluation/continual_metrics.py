"""Continual-learning metrics from the accuracy matrix.

``R[i, j]`` is the accuracy on the test set of task j after learning tasks 0..i (``T`` tasks, 0-based; entries with
j > i are not defined in the class-incremental setting and are stored as NaN).

* Average accuracy (Lopez-Paz & Ranzato 2017, "Gradient Episodic Memory", ACC; Chaudhry et al. 2018, "Riemannian
  Walk", A_T): ``mean_j R[T-1, j]``.
* Forgetting (Chaudhry et al. 2018, F_T): ``mean_{j < T-1} ( max_{i in [j, T-2]} R[i, j] - R[T-1, j] )``: how far
  each old task fell from its best accuracy before the last task.
* Backward transfer (Lopez-Paz & Ranzato 2017, BWT): ``mean_{j < T-1} ( R[T-1, j] - R[j, j] )``; negative values
  are forgetting measured from the accuracy right after learning the task.
* Average incremental accuracy (Rebuffi et al. 2017, iCaRL): ``mean_i mean_{j <= i} R[i, j]``; its terms, the
  accuracy on everything seen so far after each task, form the curve the report plots.

With a single task, forgetting and backward transfer are undefined and returned as NaN.
"""

from __future__ import annotations

import numpy as np


def _check(R) -> np.ndarray:
    R = np.asarray(R, dtype=float)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"the accuracy matrix must be square and non-empty, got shape {R.shape}")
    if np.isnan(np.diag(R)).any() or np.isnan(R[-1]).any():
        raise ValueError("R must be defined on the diagonal and on its last row")
    return R


def average_accuracy(R) -> float:
    """``mean_j R[T-1, j]``: accuracy on all tasks after the last one."""
    return float(_check(R)[-1].mean())


def forgetting(R) -> float:
    """``mean_{j<T-1} max_{j<=i<=T-2} R[i, j] - R[T-1, j]`` (Chaudhry et al. 2018)."""
    R = _check(R)
    T = R.shape[0]
    if T < 2:
        return float("nan")
    drops = [np.nanmax(R[j : T - 1, j]) - R[T - 1, j] for j in range(T - 1)]
    return float(np.mean(drops))


def backward_transfer(R) -> float:
    """``mean_{j<T-1} R[T-1, j] - R[j, j]`` (Lopez-Paz & Ranzato 2017)."""
    R = _check(R)
    T = R.shape[0]
    if T < 2:
        return float("nan")
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))


def seen_accuracy_curve(R) -> list[float]:
    """``[mean_{j<=i} R[i, j] for i in range(T)]``: accuracy on the tasks seen so far, after each task."""
    R = _check(R)
    return [float(np.nanmean(R[i, : i + 1])) for i in range(R.shape[0])]


def average_incremental_accuracy(R) -> float:
    """Mean of :func:`seen_accuracy_curve` (Rebuffi et al. 2017)."""
    return float(np.mean(seen_accuracy_curve(R)))


def summarize(R) -> dict[str, float | list[float]]:
    """Every metric above in one dict (NaN-free JSON: undefined values become None)."""
    out = {
        "average_accuracy": average_accuracy(R),
        "forgetting": forgetting(R),
        "backward_transfer": backward_transfer(R),
        "average_incremental_accuracy": average_incremental_accuracy(R),
        "seen_accuracy_curve": seen_accuracy_curve(R),
    }
    return {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in out.items()}


def matrix_to_json(R) -> list[list[float | None]]:
    return [[None if np.isnan(v) else float(v) for v in row] for row in np.asarray(R, dtype=float)]


def matrix_from_json(rows) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)
