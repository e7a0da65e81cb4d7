"""Evaluation: intervals, paired differences, the original study's inflated figure, the biologists."""

from __future__ import annotations

import csv

import numpy as np

from agent.stacks.labels import N_LOCATIONS
from export.training.evaluate import balanced_test_f1, biologist_f1, score_methods
from tests.conftest import REPO


def _truth(n: int = 200, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((n, 4)) < np.array([0.5, 0.2, 0.05, 0.0])


def test_perfect_predictions_score_one_with_a_degenerate_interval() -> None:
    y = _truth()
    result = score_methods(y, {"perfect": y}, n_boot=200)["methods"]["perfect"]
    assert result["macro_f1"] == 1.0
    assert result["macro_f1_ci95"] == [1.0, 1.0]
    assert result["locations_scored"] == 3  # the location with no positives and no predictions is left out


def test_a_better_method_has_a_paired_difference_above_zero() -> None:
    y = _truth()
    rng = np.random.default_rng(1)
    noisy = y ^ (rng.random(y.shape) < 0.3)
    result = score_methods(y, {"good": y, "noisy": noisy}, n_boot=300)
    difference = result["paired_macro_f1_difference"]["good - noisy"]
    assert difference["difference"] > 0
    assert difference["ci95"][0] > 0


def test_per_location_rows_carry_precision_recall_and_support() -> None:
    y = _truth()
    predicted = y.copy()
    predicted[:, 0] = True  # everything called location 0: recall 1, precision = prevalence
    row = score_methods(y, {"m": predicted}, n_boot=50)["methods"]["m"]["per_location"][0]
    assert row["recall"] == 1.0
    assert abs(row["precision"] - y[:, 0].mean()) < 1e-3
    assert row["support"] == int(y[:, 0].sum())


def test_balanced_test_sets_flatter_a_classifier_with_false_alarms() -> None:
    """The original study's figure: 10% false alarms barely show on a 50/50 set but ruin a rare location."""
    rng = np.random.default_rng(2)
    y = rng.random((5000, 1)) < 0.02
    scores = np.where(y, 0.9, np.where(rng.random(y.shape) < 0.1, 0.9, 0.1))
    natural = score_methods(y, {"m": scores >= 0.5}, n_boot=50)["methods"]["m"]["macro_f1"]
    assert balanced_test_f1(y, scores) > 0.9
    assert natural < 0.3


def test_biologist_figures_are_the_reference_numbers_with_their_source() -> None:
    values, source = biologist_f1()
    assert values.shape == (N_LOCATIONS,)
    assert np.isnan(values[27])
    assert np.isfinite(values[:27]).all()
    assert abs(np.nanmean(values) - 0.32) < 0.01  # "macro F1 about 0.32" (DESIGN.md)
    assert "biologist_baseline_f1.csv" in source
    shared = REPO.parent / "shared" / "reference" / "biologist_baseline_f1.csv"
    if shared.exists():
        with shared.open() as handle:
            rows = {int(r["location"]): r["biologist_f1"] for r in csv.DictReader(handle)}
        assert all(values[j] == float(v) for j, v in rows.items() if v)
