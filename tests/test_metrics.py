"""Macro F1 and its rule for absent locations; threshold rules and margins; stratified splits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.stacks.labels import KAGGLE_LOCATION_COUNTS
from export.data.split import stratified_folds, train_test_split
from export.data.synth import sample_label_sets
from export.training.metrics import (
    GRID,
    NOT_PREDICTED,
    NOT_TRAINED,
    TRAINED,
    best_thresholds,
    chance_macro_f1,
    choose_thresholds,
    f1_per_location,
    macro_f1,
)


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
    y = np.array([[1], [1], [0], [0]] * 5)
    scores = np.array([[0.9], [0.7], [0.4], [0.1]] * 5)
    threshold = best_thresholds(y, scores)[0]
    assert 0.4 < threshold <= 0.7
    assert best_thresholds(np.zeros((3, 1)), np.ones((3, 1)))[0] == 1.0


# Threshold rules (issue 16): no evidence, no label ------------------------------------------
def _signal(
    n: int = 600, prevalence: float = 0.1, strength: float = 2.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """One location: labels at a prevalence and scores in 0..1 that rank positives higher by `strength`."""
    rng = np.random.default_rng(seed)
    y = rng.random((n, 1)) < prevalence
    logits = rng.normal(size=(n, 1)) + strength * y - 2.0
    return y, 1 / (1 + np.exp(-logits))


def test_a_location_without_positives_is_not_trained_and_never_predicted() -> None:
    choice = choose_thresholds(np.zeros((50, 1)), np.random.default_rng(0).random((50, 1)))
    assert choice.status == [NOT_TRAINED]
    assert choice.thresholds[0] == 1.0
    assert choice.margins[0] == 0.0
    assert "0 training positives" in choice.reasons[0]


def test_fewer_positives_than_the_minimum_are_not_trained_even_when_separable() -> None:
    y = np.zeros((200, 1), bool)
    y[:9] = True
    scores = y * 0.9 + 0.05  # perfectly separable
    few = choose_thresholds(y, scores, min_positives=10)
    assert few.status == [NOT_TRAINED]
    assert few.thresholds[0] == 1.0
    assert "9 training positives, fewer than the 10 needed" in few.reasons[0]
    y[9] = True
    enough = choose_thresholds(y, y * 0.9 + 0.05, min_positives=10)
    assert enough.status == [TRAINED]
    assert 0.05 < enough.thresholds[0] <= 0.95


def test_flat_f1_is_not_predicted_instead_of_falling_to_the_lowest_threshold() -> None:
    """Scores without signal: the F1 curve is flat (no threshold beats labelling every stack)."""
    rng = np.random.default_rng(4)
    y = rng.random((800, 3)) < np.array([0.02, 0.1, 0.3])
    scores = rng.random((800, 3)) * 0.3
    for rule in ("near-best-rate", "f1", "ratio", "precision-floor"):
        choice = choose_thresholds(y, scores, rule)
        assert choice.status == [NOT_PREDICTED] * 3, rule
        assert (choice.thresholds == 1.0).all()
        assert all("no better than labelling every stack" in r for r in choice.reasons)


def test_zero_f1_at_every_threshold_is_not_predicted() -> None:
    y = np.zeros((100, 1), bool)
    y[:20] = True
    scores = np.where(y, 0.0, 0.5)  # every positive scores below the lowest threshold
    choice = choose_thresholds(y, scores)
    assert choice.status == [NOT_PREDICTED]
    assert choice.thresholds[0] == 1.0
    assert "zero at every threshold" in choice.reasons[0]


def test_a_location_with_evidence_is_trained_with_its_out_of_fold_figures() -> None:
    y, scores = _signal(strength=4.0)
    choice = choose_thresholds(y, scores)
    assert choice.status == [TRAINED]
    assert choice.reasons == [""]
    assert choice.best_f1[0] - choice.every_stack_f1[0] > choice.noise[0] > 0
    assert choice.thresholds[0] in GRID
    row = choice.to_rows(["a"])[0]
    assert set(row) >= {"name", "status", "positives", "threshold", "margin"}
    assert "reason" not in row


def test_among_near_best_thresholds_the_one_predicting_closest_to_the_prevalence_wins() -> None:
    """F1 peaks at a low threshold that labels many stacks; within the noise, a higher one labels
    about as many stacks as carry the location."""
    y, scores = _signal(n=1500, prevalence=0.1, strength=2.0, seed=5)
    f1_rule = choose_thresholds(y, scores, "f1")
    near = choose_thresholds(y, scores, "near-best-rate")
    prevalence = y.mean()
    assert f1_rule.predicted_rate[0] > 1.4 * prevalence  # the F1 peak labels too many stacks
    assert near.thresholds[0] > f1_rule.thresholds[0]
    assert abs(near.predicted_rate[0] - prevalence) < abs(f1_rule.predicted_rate[0] - prevalence)
    assert near.best_f1[0] - near.noise[0] <= near.chosen_f1[0] < near.best_f1[0]


def test_the_ratio_rule_predicts_at_the_prevalence_and_the_precision_floor_holds_its_floor() -> None:
    y, scores = _signal(n=1500, prevalence=0.08, strength=3.0, seed=3)
    ratio = choose_thresholds(y, scores, "ratio")
    assert ratio.predicted_rate[0] == pytest.approx(y.mean(), rel=0.15)
    floor = choose_thresholds(y, scores, "precision-floor", precision_floor=0.6)
    predicted = scores[:, 0] >= floor.thresholds[0]
    assert (predicted & y[:, 0]).sum() / predicted.sum() >= 0.6
    none_reach = choose_thresholds(y, scores, "precision-floor", precision_floor=1.01)
    assert none_reach.status == [NOT_PREDICTED]
    assert "precision" in none_reach.reasons[0]


def test_an_unknown_rule_is_refused() -> None:
    with pytest.raises(ValueError, match="not one of near-best-rate"):
        choose_thresholds(np.ones((3, 1)), np.ones((3, 1)), "best-guess")


# Margins --------------------------------------------------------------------------------------
def test_the_margin_is_the_spread_of_the_threshold_over_bootstrap_resamples() -> None:
    """Few stacks leave the threshold uncertain; ten times as many pin it down, and the margin says so."""
    few_y, few = _signal(n=400, prevalence=0.2, strength=2.0, seed=6)
    many_y, many = _signal(n=4000, prevalence=0.2, strength=2.0, seed=6)
    wide = choose_thresholds(few_y, few).margins[0]
    narrow = choose_thresholds(many_y, many).margins[0]
    assert narrow >= GRID[1] - GRID[0]  # never below one grid step
    assert wide > 1.5 * narrow
    assert choose_thresholds(few_y, few).margins[0] == wide  # seeded: the same every time


def test_margins_are_zero_where_nothing_is_predicted() -> None:
    y, scores = _signal(n=600, prevalence=0.1, strength=3.0, seed=5)
    y = np.hstack([y, np.zeros_like(y), y])
    scores = np.hstack([scores, scores, np.random.default_rng(1).random((600, 1)) * 0.2])
    choice = choose_thresholds(y, scores)
    assert choice.status == [TRAINED, NOT_TRAINED, NOT_PREDICTED]
    assert choice.margins[0] > 0
    assert (choice.margins[1:] == 0).all()


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
