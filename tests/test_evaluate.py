"""Evaluation: intervals, paired differences, the original study's inflated figure, the biologists."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable
from importlib import resources

import numpy as np
import pytest

from agent.stacks.labels import N_LOCATIONS
from export.training.evaluate import BIOLOGIST_FILE, balanced_test_f1, biologist_f1, score_methods
from tests.conftest import REPO, real_folder


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


# sha256 of the (location, biologist_f1) rows of ../shared/reference/biologist_baseline_f1.csv, the
# figures the package copies. A clone without ../shared checks the packaged copy against this pin
# (not against itself); where the shared file is present (CI), the pin is checked against it too.
SHARED_BIOLOGIST_ROWS = "e12a29886696494dcdb7b5ca45c37e137bda6bbf312a6ec37a0dda8c8965a539"


def _rows_digest(lines: Iterable[str]) -> str:
    rows = csv.DictReader(line for line in lines if not line.startswith("#"))
    text = "".join(f"{r['location']},{r['biologist_f1']}\n" for r in rows)
    return hashlib.sha256(text.encode()).hexdigest()


def test_the_packaged_biologist_figures_are_the_shared_references() -> None:
    packaged = resources.files("export.reference").joinpath(BIOLOGIST_FILE).read_text(encoding="utf-8")
    assert _rows_digest(packaged.splitlines()) == SHARED_BIOLOGIST_ROWS
    for place in {real_folder().parent / "reference", REPO.parent / "shared" / "reference"}:
        shared = place / "biologist_baseline_f1.csv"
        if shared.exists():
            found = _rows_digest(shared.read_text(encoding="utf-8").splitlines())
            assert found == SHARED_BIOLOGIST_ROWS, shared


# What a user of the labels feels (issue 16) ----------------------------------------------------
def test_label_set_figures_by_hand() -> None:
    from export.training.evaluate import label_set_figures

    y_true = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]], bool)
    y_pred = np.array([[1, 0, 1], [1, 1, 0], [0, 0, 0], [0, 0, 0]], bool)
    figures = label_set_figures(y_true, y_pred)
    assert figures["labels_per_stack_true"] == 1.0
    assert figures["labels_per_stack_predicted"] == 1.0
    assert figures["exact_label_sets"] == 0.5  # stacks 2 and 4 (nothing true, nothing predicted)
    # per stack F1: 2/3, 1, 0, 1 (both empty)
    assert figures["samples_f1"] == pytest.approx((2 / 3 + 1 + 0 + 1) / 4, abs=1e-4)
    assert figures["no_label_stacks"] == 0.5
    assert figures["prevalence"] == [0.5, 0.25, 0.25]
    assert figures["predicted_rate"] == [0.5, 0.25, 0.25]


def test_a_rare_location_predicted_on_most_stacks_is_named_as_over_predicted() -> None:
    from export.training.evaluate import label_set_figures

    y_true = np.zeros((100, N_LOCATIONS), bool)
    y_true[:, 0] = True
    y_true[:3, 24] = True  # Aggresome on 3% of stacks
    y_pred = y_true.copy()
    y_pred[:96, 24] = True  # predicted on 96%, as the demo bundle did before issue 16
    y_pred[:30, 25] = True  # Cytosol on 30%: over, but not past 40%
    figures = label_set_figures(y_true, y_pred)
    assert figures["over_predicted"] == ["Aggresome"]
    scored = score_methods(y_true, {"m": y_pred}, n_boot=50)["methods"]["m"]
    assert scored["over_predicted"] == ["Aggresome"]
    assert scored["per_location"][24]["predicted_rate"] == 0.96
