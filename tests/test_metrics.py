"""Macro F1 and its rule for absent locations; threshold tuning; stratified splits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.stacks.labels import KAGGLE_LOCATION_COUNTS
from export.data.split import stratified_folds, train_test_split
from export.data.synth import sample_label_sets
from export.training.metrics import best_thresholds, chance_macro_f1, f1_per_location, macro_f1


def test_f1_per_location_matches_hand_computation() -> None:
    y_true = np.array([[1, 0], [1, 0], [0, 1], [0, 0]])
    y_pred = np.array([[1, 0], [0, 0], [0, 1], [1, 0]])
    # location 0: tp 1, fp 1, fn 1 -> 0.5; location 1: tp 1 -> 1.0
    np.testing.assert_allclose(f1_per_location(y_true, y_pred), [0.5, 1.0])
    assert macro_f1(y_true, y_pred) == pytest.approx(0.75)


def test_absent_and_never_predicted_location_is_left_out_of_the_mean() -> None:
    y_true = np.array([[1, 0], [0, 0]])
    y_pred = np.array([[1, 0], [0, 0]])
    scores = f1_per_location(y_true, y_pred)
    assert math.isnan(scores[1])
    assert macro_f1(y_true, y_pred) == 1.0


def test_false_alarms_on_an_absent_location_score_zero() -> None:
    y_true = np.array([[1, 0], [0, 0]])
    y_pred = np.array([[1, 1], [0, 0]])
    assert f1_per_location(y_true, y_pred)[1] == 0.0
    assert macro_f1(y_true, y_pred) == 0.5


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="one shape"):
        f1_per_location(np.zeros((2, 3)), np.zeros((2, 4)))


def test_chance_level_is_the_mean_prevalence() -> None:
    y = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 0], [0, 0, 0]])
    assert chance_macro_f1(y) == pytest.approx((0.5 + 0.25) / 2)


def test_best_threshold_separates_separable_scores() -> None:
    y = np.array([[1], [1], [0], [0]])
    scores = np.array([[0.9], [0.7], [0.4], [0.1]])
    threshold = best_thresholds(y, scores)[0]
    assert 0.4 < threshold <= 0.7
    assert best_thresholds(np.zeros((3, 1)), np.ones((3, 1)))[0] == 1.0


def test_stratified_folds_spread_every_location_evenly() -> None:
    sets = sample_label_sets(3000, seed=1)
    y = np.zeros((len(sets), 28), np.uint8)
    for i, labels in enumerate(sets):
        y[i, list(labels)] = 1
    folds = stratified_folds(y, 5, seed=0)
    assert set(np.unique(folds)) == set(range(5))
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 0.05 * len(y)
    for j in np.flatnonzero(y.sum(axis=0) >= 5):
        per_fold = np.array([y[folds == k, j].sum() for k in range(5)])
        assert per_fold.max() - per_fold.min() <= 2, (j, per_fold)


def test_rare_location_lands_in_the_test_part() -> None:
    y = np.zeros((200, 28), np.uint8)
    y[:, 0] = 1
    y[[3, 77, 150], 27] = 1  # three stacks of the rarest location
    train, test = train_test_split(y, 0.34, seed=2)
    assert set(train) | set(test) == set(range(200))
    assert not set(train) & set(test)
    assert y[test, 27].sum() >= 1
    assert y[train, 27].sum() >= 1


def test_kaggle_counts_are_consistent() -> None:
    assert sum(KAGGLE_LOCATION_COUNTS) > 31072  # multi-label: more labels than stacks


def test_bootstrap_with_every_stack_once_equals_the_plain_f1() -> None:
    from export.training.metrics import bootstrap_f1

    rng = np.random.default_rng(0)
    y, p = rng.random((50, 5)) < 0.3, rng.random((50, 5)) < 0.3
    np.testing.assert_allclose(bootstrap_f1(y, p, np.ones((1, 50)))[0], f1_per_location(y, p))


def test_bootstrap_weights_resample_every_row_to_n_stacks() -> None:
    from export.training.metrics import bootstrap_weights

    weights = bootstrap_weights(30, 100, seed=1)
    assert weights.shape == (100, 30)
    assert (weights.sum(axis=1) == 30).all()
    assert (weights == 0).any()  # with replacement: some stacks left out of some resamples


def test_row_means_skip_undefined_entries() -> None:
    from export.training.metrics import nanmean_rows

    values = np.array([[1.0, np.nan, 0.0], [np.nan, np.nan, np.nan]])
    out = nanmean_rows(values)
    assert out[0] == 0.5
    assert np.isnan(out[1])


def test_interval_of_no_finite_samples_is_undefined() -> None:
    from export.training.metrics import interval

    assert all(np.isnan(v) for v in interval(np.array([np.nan, np.nan])))
    low, high = interval(np.arange(1001, dtype=float))
    assert (round(low), round(high)) == (25, 975)
