"""Score predictions on a held-out split at natural label frequencies, with bootstrap intervals.

Pure functions of label matrices: the training command feeds them, the report draws them.
Every F1 (per location and macro) gets a 95% percentile interval from resampling the
held-out stacks; methods scored on the same resamples give paired intervals for their
differences. Rare locations have a handful of positives in any split, so their intervals are
wide: a difference inside them is not a finding.

Macro F1 hardly punishes a rare location predicted on every stack (its F1 is about twice its
prevalence either way), so every method also gets the figures a user of the labels feels
(`label_set_figures`): labels per stack, true and predicted; the share of stacks whose label
set is exactly right; the sample-averaged F1 (per stack, F1 of its predicted set against its
true one); and per location the predicted rate beside the prevalence, with the locations
predicted on more than 40% of stacks while true on fewer than 10% named.

`hpa-edge agreement` (agreement.py) scores the JSON results of `hpa-edge predict` or of the
agent against a label file the same way.
"""

from __future__ import annotations

import csv
from importlib import resources
from typing import Any

import numpy as np

from agent.model.thresholds import apply
from agent.stacks.labels import LOCATIONS, N_LOCATIONS
from export.training.metrics import (
    bootstrap_f1,
    bootstrap_weights,
    interval,
    macro_f1,
    nanmean_rows,
    precision_recall_f1,
)

BIOLOGIST_FILE = "biologist_f1.csv"
# Over-prediction as issue 16 defines it: predicted on more than this share of stacks ...
OVER_PREDICTED_RATE = 0.4
# ... while true on fewer than this share.
OVER_PREDICTED_PREVALENCE = 0.1


def label_set_figures(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, Any]:
    """What a user of the labels feels, beside macro F1 (see the module's docstring).

    Sample F1 of a stack with neither true nor predicted labels is 1 (nothing to get wrong).
    """
    y_true, y_pred = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    if y_true.shape != y_pred.shape or y_true.ndim != 2 or not len(y_true):
        raise ValueError(
            f"expected two non-empty N x L matrices of one shape, got {y_true.shape}, {y_pred.shape}"
        )
    n_true, n_pred = y_true.sum(axis=1), y_pred.sum(axis=1)
    both = (y_true & y_pred).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        samples = np.where(n_true + n_pred > 0, 2 * both / (n_true + n_pred), 1.0)
    prevalence, rate = y_true.mean(axis=0), y_pred.mean(axis=0)
    over = (rate > OVER_PREDICTED_RATE) & (prevalence < OVER_PREDICTED_PREVALENCE)
    names = LOCATIONS if y_true.shape[1] == N_LOCATIONS else [str(j) for j in range(y_true.shape[1])]
    return {
        "n_stacks": len(y_true),
        "labels_per_stack_true": round(float(n_true.mean()), 4),
        "labels_per_stack_predicted": round(float(n_pred.mean()), 4),
        "exact_label_sets": round(float((y_true == y_pred).all(axis=1).mean()), 4),
        "samples_f1": round(float(samples.mean()), 4),
        "no_label_stacks": round(float((n_pred == 0).mean()), 4),
        "over_predicted": [names[j] for j in np.flatnonzero(over)],
        "prevalence": [round(float(v), 4) for v in prevalence],
        "predicted_rate": [round(float(v), 4) for v in rate],
    }


def score_methods(
    y_true: np.ndarray, predictions: dict[str, np.ndarray], n_boot: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """Per-method figures on one split; the first method is the reference for paired differences."""
    y_true = np.asarray(y_true, dtype=bool)
    weights = bootstrap_weights(len(y_true), n_boot, seed)
    boots: dict[str, np.ndarray] = {}
    out: dict[str, Any] = {"n_stacks": len(y_true), "bootstrap_resamples": n_boot, "methods": {}}
    for name, predicted in predictions.items():
        predicted = np.asarray(predicted, dtype=bool)
        per = precision_recall_f1(y_true, predicted)
        boots[name] = bootstrap_f1(y_true, predicted, weights)
        macro_samples = nanmean_rows(boots[name])
        felt = label_set_figures(y_true, predicted)
        out["methods"][name] = {
            "macro_f1": _round(macro_f1(y_true, predicted)),
            "macro_f1_ci95": _pair(interval(macro_samples)),
            "locations_scored": int(np.isfinite(per["f1"]).sum()),
            **{k: v for k, v in felt.items() if k not in ("n_stacks", "prevalence", "predicted_rate")},
            "per_location": [
                {
                    "location": j,
                    "name": LOCATIONS[j],
                    "precision": _round(per["precision"][j]),
                    "recall": _round(per["recall"][j]),
                    "f1": _round(per["f1"][j]),
                    "f1_ci95": _pair(interval(boots[name][:, j])),
                    "support": int(per["support"][j]),
                    "prevalence": felt["prevalence"][j],
                    "predicted_rate": felt["predicted_rate"][j],
                }
                for j in range(y_true.shape[1])
            ],
        }
    reference = next(iter(predictions))
    out["paired_macro_f1_difference"] = {
        f"{reference} - {name}": {
            "difference": _round(out["methods"][reference]["macro_f1"] - out["methods"][name]["macro_f1"]),
            "ci95": _pair(interval(nanmean_rows(boots[reference]) - nanmean_rows(boots[name]))),
        }
        for name in predictions
        if name != reference
    }
    return out


def balanced_test_f1(y_true: np.ndarray, scores: np.ndarray, threshold: float = 0.5, seed: int = 0) -> float:
    """The original study's headline figure: per location a 50/50 balanced test subset, F1 at 0.5, averaged.

    Reported only to show how far it sits from the macro F1 at natural frequencies; it is
    not a macro F1, because on balanced sets false positives from the many negatives vanish.
    """
    rng = np.random.default_rng(seed)
    y_true = np.asarray(y_true, dtype=bool)
    labels = apply(scores, np.full(scores.shape[1], threshold))
    values = []
    for j in range(y_true.shape[1]):
        positives, negatives = np.flatnonzero(y_true[:, j]), np.flatnonzero(~y_true[:, j])
        n = min(len(positives), len(negatives))
        if n == 0:
            continue
        rows = np.concatenate(
            [rng.choice(positives, n, replace=False), rng.choice(negatives, n, replace=False)]
        )
        truth, predicted = y_true[rows, j], labels[rows, j]
        tp = float((truth & predicted).sum())
        denominator = 2 * tp + float((~truth & predicted).sum()) + float((truth & ~predicted).sum())
        values.append(2 * tp / denominator if denominator else 0.0)
    return float(np.mean(values)) if values else float("nan")


def biologist_f1() -> tuple[np.ndarray, str]:
    """The biologists' per-location F1 (NaN where none was given) and the source line of the data file."""
    text = resources.files("export.reference").joinpath(BIOLOGIST_FILE).read_text(encoding="utf-8")
    lines = text.splitlines()
    source = " ".join(line.lstrip("# ").strip() for line in lines if line.startswith("#"))
    values = np.full(N_LOCATIONS, np.nan)
    for row in csv.DictReader(line for line in lines if not line.startswith("#")):
        if row["biologist_f1"].strip():
            values[int(row["location"])] = float(row["biologist_f1"])
    return values, source


def _round(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 4)


def _pair(bounds: tuple[float, float]) -> list[float | None]:
    return [_round(bounds[0]), _round(bounds[1])]
