"""Multi-label metrics, as pure functions of 0/1 matrices (N stacks x 28 locations).

Macro F1 weighs every location equally, so rare locations count as much as Nucleoplasm.
Rule for locations absent from a split: a location with no true positives and no predicted
positives has no defined F1 and is left out of the mean (reported as NaN and counted); one
with no true positives but predicted positives scores 0, so false alarms are never free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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


# Threshold rules ---------------------------------------------------------------------------
TRAINED, NOT_TRAINED, NOT_PREDICTED = "trained", "not trained", "not predicted"
THRESHOLD_RULES = ("near-best-rate", "f1", "ratio", "precision-floor")
DEFAULT_RULE = "near-best-rate"
GRID = np.round(np.arange(1, 200) / 200, 3)  # candidate thresholds, 0.005 to 0.995 in steps of 0.005
DEFAULT_BOOTSTRAP = 200  # resamples of the out-of-fold rows: the noise of F1 and the margins
DEFAULT_PRECISION_FLOOR = 0.5  # the precision-floor rule's floor


@dataclass
class ThresholdChoice:
    """What the threshold rules decided per location, and the out-of-fold figures behind it.

    `status` is "trained" (a threshold was chosen), "not trained" (fewer positives than the
    minimum: nothing to tune on) or "not predicted" (positives, but the out-of-fold scores show
    no evidence: F1 zero, or no better than labelling every stack, within its noise); the
    latter two get threshold 1.0, margin 0 and a `reason` sentence.
    """

    thresholds: np.ndarray  # L; 1.0 where nothing is predicted
    status: list[str]
    reasons: list[str]  # "" for trained locations
    margins: np.ndarray  # L, >= 0; 0 where nothing is predicted
    positives: np.ndarray  # L, positives among the rows
    prevalence: np.ndarray  # L
    best_f1: np.ndarray  # L, out-of-fold F1 at the F1-maximising threshold (NaN: no positives)
    noise: np.ndarray  # L, bootstrap standard deviation of that F1
    every_stack_f1: np.ndarray  # L, the F1 of labelling every stack: what no evidence reaches
    chosen_f1: np.ndarray  # L, out-of-fold F1 at the chosen threshold (NaN: not predicted)
    predicted_rate: np.ndarray  # L, out-of-fold share of rows predicted at the chosen threshold

    def to_rows(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """One JSON-ready row per location (the manifest's `locations` plus the figures)."""
        rows = []
        for j, name in enumerate(names):
            row: dict[str, Any] = {
                "name": name,
                "status": self.status[j],
                "positives": int(self.positives[j]),
                "threshold": float(self.thresholds[j]),
                "margin": round(float(self.margins[j]), 4),
                "oof_best_f1": _maybe(self.best_f1[j]),
                "oof_f1_noise": _maybe(self.noise[j]),
                "oof_every_stack_f1": _maybe(self.every_stack_f1[j]),
                "oof_chosen_f1": _maybe(self.chosen_f1[j]),
                "oof_predicted_rate": _maybe(self.predicted_rate[j]),
                "prevalence": _maybe(self.prevalence[j]),
            }
            if self.reasons[j]:
                row["reason"] = self.reasons[j]
            rows.append(row)
        return rows


def choose_thresholds(
    y_true: np.ndarray,
    scores: np.ndarray,
    rule: str = DEFAULT_RULE,
    *,
    min_positives: int = 1,
    grid: np.ndarray | None = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    precision_floor: float = DEFAULT_PRECISION_FLOOR,
) -> ThresholdChoice:
    """Per location, whether to predict it at all and at which threshold, from out-of-fold scores.

    The noise of a location's F1 is the standard deviation, over `n_boot` bootstrap resamples
    of the rows, of the F1 at its F1-maximising threshold. A location is "not trained" below
    `min_positives` positives, and "not predicted" when its best F1 is zero or no better than
    labelling every stack (F1 = 2P / (N + P)) by more than that noise: then the F1 curve is
    flat, and its maximum sits wherever the noise put it, typically at the lowest threshold.
    Otherwise `rule` chooses among the thresholds of `grid`:

    - "near-best-rate" (default): among the thresholds whose F1 is within the noise of the
      best, the one whose predicted rate is closest to the prevalence (by ratio);
    - "f1": the F1-maximising threshold (the rule before issue 16);
    - "ratio": the threshold whose predicted rate is closest to the prevalence, whatever its
      F1 (the 2018 competition winners' rule);
    - "precision-floor": the F1-maximising threshold among those with precision of at least
      `precision_floor`; "not predicted" when none reaches it.

    The margin of a trained location is the standard deviation of its threshold when the
    same rule chooses it on each bootstrap resample of the rows (at least one grid step): how
    uncertain the threshold itself is. A score closer to the threshold than that could have
    fallen either side with slightly different training data, so the device reports such a
    label as near its threshold. (Measured against a "coin-toss band", the widest band around
    the threshold where out-of-fold labels were wrong half the time: on 3,000 unseen synthetic
    stacks the spread flagged about as many stacks, 28% against 26%, and more of them wrong;
    docs/training.md.)
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule {rule!r} is not one of {', '.join(THRESHOLD_RULES)}")
    y_true = np.asarray(y_true, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != y_true.shape or y_true.ndim != 2:
        raise ValueError(
            f"expected N x L labels and scores of one shape, got {y_true.shape} and {scores.shape}"
        )
    grid = GRID if grid is None else np.asarray(grid, dtype=np.float64)
    n, n_locations = y_true.shape
    step = float(np.min(np.diff(grid))) if len(grid) > 1 else 0.0
    weights = bootstrap_weights(n, n_boot, seed) if n_boot > 0 else np.ones((1, n))
    nan = np.full(n_locations, np.nan)
    out = ThresholdChoice(
        thresholds=np.ones(n_locations),
        status=[NOT_PREDICTED] * n_locations,
        reasons=[""] * n_locations,
        margins=np.zeros(n_locations),
        positives=y_true.sum(axis=0),
        prevalence=y_true.mean(axis=0) if n else nan.copy(),
        best_f1=nan.copy(),
        noise=nan.copy(),
        every_stack_f1=nan.copy(),
        chosen_f1=nan.copy(),
        predicted_rate=nan.copy(),
    )
    for j in range(n_locations):
        positives = int(out.positives[j])
        if positives < max(min_positives, 1):
            out.status[j] = NOT_TRAINED
            out.reasons[j] = (
                f"{positives} training positive{'s' if positives != 1 else ''}, fewer than the "
                f"{max(min_positives, 1)} needed to train and tune a classifier"
            )
            continue
        truth = y_true[:, j]
        predicted = scores[:, j][None, :] >= grid[:, None]  # thresholds x rows
        hits = (predicted & truth).astype(np.float64)
        f1, rate, precision = _curves(hits.sum(axis=1), predicted.sum(axis=1), positives, n)
        best = int(np.argmax(f1))
        boot_truth = weights @ truth.astype(np.float64)
        boot_f1, boot_rate, boot_precision = _curves(
            weights @ hits.T, weights @ predicted.T.astype(np.float64), boot_truth[:, None], n
        )
        noise = float(np.std(boot_f1[:, best]))
        every = 2 * positives / (n + positives)
        out.best_f1[j], out.noise[j], out.every_stack_f1[j] = f1[best], noise, every
        if f1[best] <= 0:
            out.reasons[j] = "out-of-fold F1 is zero at every threshold: no evidence to predict it"
            continue
        if f1[best] - every <= noise:
            out.reasons[j] = (
                f"out-of-fold F1 {f1[best]:.3f} is no better than labelling every stack ({every:.3f}) "
                f"by more than its noise ({noise:.3f}): no evidence to predict it"
            )
            continue
        prevalence = positives / n
        chosen = _choose(
            rule, f1[None], rate[None], precision[None], np.array([prevalence]), noise, precision_floor
        )[0]
        if chosen < 0:
            out.reasons[j] = (
                f"no threshold reaches out-of-fold precision {precision_floor:.2f} "
                f"(best F1 {f1[best]:.3f}): not predicted"
            )
            continue
        out.status[j] = TRAINED
        out.thresholds[j] = grid[chosen]
        out.chosen_f1[j], out.predicted_rate[j] = f1[chosen], rate[chosen]
        again = _choose(rule, boot_f1, boot_rate, boot_precision, boot_truth / n, noise, precision_floor)
        spread = grid[again[again >= 0]]
        out.margins[j] = max(float(np.std(spread)) if len(spread) > 1 else 0.0, step)
    return out


def _curves(
    tp: np.ndarray, predicted: np.ndarray, positives: float | np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """F1, predicted rate and precision per threshold from counts (or bootstrap-weighted counts)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(predicted + positives > 0, 2 * tp / (predicted + positives), 0.0)
        precision = np.where(predicted > 0, tp / np.maximum(predicted, 1e-12), 0.0)
    return f1, predicted / n, precision


def _choose(
    rule: str,
    f1: np.ndarray,
    rate: np.ndarray,
    precision: np.ndarray,
    prevalence: np.ndarray,
    noise: float,
    precision_floor: float,
) -> np.ndarray:
    """The chosen grid index per row of the R x G curves (-1: no threshold qualifies).

    Ties go to the highest threshold (fewer labels)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        distance = np.abs(np.log(rate / prevalence[:, None]))
    distance = np.where(np.isfinite(distance), distance, np.inf)
    if rule == "f1":
        cost = -f1
    elif rule == "ratio":
        cost = distance
    elif rule == "near-best-rate":
        near = f1 >= f1.max(axis=1, keepdims=True) - noise
        cost = np.where(near & (f1 > 0), distance, np.inf)
    else:  # precision-floor
        cost = np.where((precision >= precision_floor) & (f1 > 0), -f1, np.inf)
    last = cost.shape[1] - 1 - np.argmin(cost[:, ::-1], axis=1)  # the highest among equal costs
    return np.where(np.isfinite(cost[np.arange(len(cost)), last]), last, -1)


def best_thresholds(
    y_true: np.ndarray, scores: np.ndarray, grid: np.ndarray | None = None, rule: str = DEFAULT_RULE
) -> np.ndarray:
    """Per location, the threshold `choose_thresholds` picks on (out-of-fold) scores.

    1.0 (never predicted) where there were no positives or no evidence.
    """
    return choose_thresholds(y_true, scores, rule, grid=grid).thresholds


def _maybe(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 4)


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
