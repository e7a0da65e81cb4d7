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


def precision_recall_f1(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, np.ndarray]:
    """Per location: precision, recall, F1 (NaN where undefined) and support (number of true positives)."""
    y_true, y_pred = _check(y_true, y_pred)
    tp = (y_true & y_pred).sum(axis=0).astype(np.float64)
    predicted = y_pred.sum(axis=0).astype(np.float64)
    support = y_true.sum(axis=0).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        recall = np.where(support > 0, tp / support, np.nan)
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1_per_location(y_true, y_pred),
        "support": support,
    }


def bootstrap_weights(n: int, n_boot: int, seed: int) -> np.ndarray:
    """n_boot x n resampling counts (each row a resample of the n stacks, with replacement).

    Sharing one set of weights between methods gives paired intervals for their difference.
    """
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)


def bootstrap_f1(y_true: np.ndarray, y_pred: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """n_boot x L per-location F1 over the resamples (same NaN rule as `f1_per_location`)."""
    y_true, y_pred = _check(y_true, y_pred)
    tp = weights @ (y_true & y_pred).astype(np.float64)
    fp = weights @ (~y_true & y_pred).astype(np.float64)
    fn = weights @ (y_true & ~y_pred).astype(np.float64)
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / denominator, np.nan)


def nanmean_rows(values: np.ndarray) -> np.ndarray:
    """Mean of each row over its defined entries (NaN for a row with none)."""
    defined = np.isfinite(values)
    total = np.where(defined, values, 0.0).sum(axis=1)
    count = defined.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the finite samples; (nan, nan) when there are none."""
    finite = samples[np.isfinite(samples)]
    if finite.size == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(finite, (tail, 100 - tail))
    return float(low), float(high)
