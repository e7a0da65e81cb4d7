"""Multi-label metrics, as pure functions of 0/1 matrices (N stacks x 28 locations).

Macro F1 weighs every location equally, so rare locations count as much as Nucleoplasm.
Rule for locations absent from a split: a location with no true positives and no predicted
positives has no defined F1 and is left out of the mean (reported as NaN and counted); one
with no true positives but predicted positives scores 0, so false alarms are never free.
"""

from __future__ import annotations

import numpy as np


def f1_per_location(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """F1 per column; NaN where the column has neither true nor predicted positives."""
    y_true, y_pred = _check(y_true, y_pred)
    tp = (y_true & y_pred).sum(axis=0).astype(np.float64)
    fp = (~y_true & y_pred).sum(axis=0).astype(np.float64)
    fn = (y_true & ~y_pred).sum(axis=0).astype(np.float64)
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean F1 over the locations where it is defined (see the module's rule)."""
    scores = f1_per_location(y_true, y_pred)
    return float(np.nanmean(scores)) if np.isfinite(scores).any() else float("nan")


def chance_macro_f1(y_true: np.ndarray) -> float:
    """Expected macro F1 of guessing each location at random at its own prevalence.

    For a location of prevalence p, random guessing at rate p has expected F1 = p, so the
    chance level is the mean prevalence over the locations present.
    """
    y_true = np.asarray(y_true, dtype=bool)
    prevalence = y_true.mean(axis=0)
    present = prevalence > 0
    return float(prevalence[present].mean()) if present.any() else float("nan")


def best_thresholds(y_true: np.ndarray, scores: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
    """Per location, the score threshold that maximises F1 on (out-of-fold) scores.

    Locations with no positives get 1.0 (never predicted): there is nothing to tune on.
    """
    y_true = np.asarray(y_true, dtype=bool)
    grid = np.linspace(0.02, 0.98, 49) if grid is None else grid
    thresholds = np.ones(y_true.shape[1])
    for j in range(y_true.shape[1]):
        if not y_true[:, j].any():
            continue
        predicted = scores[:, j][None, :] >= grid[:, None]  # thresholds x stacks
        tp = (predicted & y_true[:, j]).sum(axis=1)
        f1 = 2 * tp / (predicted.sum(axis=1) + y_true[:, j].sum())
        thresholds[j] = grid[int(np.argmax(f1))]
    return thresholds


def _check(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two N x L matrices of one shape, got {a.shape} and {b.shape}")
    return a, b
