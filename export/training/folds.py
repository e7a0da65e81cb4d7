"""The one out-of-fold loop: every row scored by a model that never saw it.

Thresholds chosen on scores of the rows a model was fitted on would be chosen on answers it
remembers, not on answers it would give a new stack; so every place that tunes or measures
on the training part (the location estimator, the joint Nucleoplasm + Cytosol experiment,
the hand-feature baseline, the AUC comparison of caches) scores it through this loop.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# fit_predict(x_fit, y_fit, x_held) -> scores of x_held (one row per held row)
FitPredict = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def out_of_fold(fit_predict: FitPredict, x: np.ndarray, y: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Scores of every row of x, each from a model fitted on the other folds only.

    `folds` gives a fold number per row; for each fold, `fit_predict` is fitted on the rows
    outside it and scores the rows inside it. The result has one row per row of x and as
    many columns as `fit_predict` returns (float64).
    """
    folds = np.asarray(folds)
    if folds.shape != (len(x),) or len(y) != len(x):
        raise ValueError(f"need a fold number and a label row per row: {len(x)} rows, {folds.shape} folds")
    numbers = np.unique(folds)
    if len(numbers) < 2:
        raise ValueError(f"out-of-fold scoring needs at least 2 folds, not {len(numbers)}")
    scores: np.ndarray | None = None
    for k in numbers:
        held = folds == k
        part = np.asarray(fit_predict(x[~held], y[~held], x[held]), dtype=np.float64)
        if scores is None:
            scores = np.zeros((len(x), *part.shape[1:]), dtype=np.float64)
        scores[held] = part
    assert scores is not None  # at least two folds
    return scores
