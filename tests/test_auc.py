"""ROC AUC and the folds used to compare embedding caches."""

from __future__ import annotations

import numpy as np

from export.training.auc import roc_auc, stratified_binary_folds


def test_auc_of_a_perfect_ranking_is_one_and_of_a_reversed_one_zero() -> None:
    truth = np.array([0, 0, 1, 1])
    assert roc_auc(truth, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(truth, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0


def test_tied_scores_count_half() -> None:
    assert roc_auc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5


def test_auc_matches_scikit_learn() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    truth = rng.random(300) < 0.3
    scores = np.round(rng.random(300) + truth * 0.3, 2)  # rounded: ties occur
    assert abs(roc_auc(truth, scores) - roc_auc_score(truth, scores)) < 1e-12


def test_auc_without_both_classes_is_undefined() -> None:
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.2, 0.3])))


def test_folds_spread_positives_evenly() -> None:
    column = np.zeros(100, bool)
    column[:23] = True
    folds = stratified_binary_folds(column, 5, np.random.default_rng(0))
    counts = [int(column[folds == k].sum()) for k in range(5)]
    assert max(counts) - min(counts) <= 1
    assert sum(counts) == 23
