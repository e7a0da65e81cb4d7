"""The synthetic data can be learned from the pixels, but not trivially."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.data.dataset import Dataset
from export.training.baseline import evaluate, feature_matrix, features


def test_features_are_finite_and_fixed_length(synthetic_set: Path) -> None:
    data = Dataset(synthetic_set, synthetic_set / "train.csv")
    _, stack = next(data.stacks())
    assert not isinstance(stack, Exception)
    values = features(stack.channels)
    assert values.ndim == 1
    assert np.isfinite(values).all()
    assert len(values) == len(features(data.read(data.samples[1]).channels))


@pytest.mark.integration
def test_baseline_is_well_above_chance_and_far_from_perfect(synthetic_set: Path) -> None:
    data = Dataset(synthetic_set, synthetic_set / "train.csv")
    x, y, ids = feature_matrix(data)
    assert len(ids) == len(data)
    result = evaluate(x, y, seed=0, test_fraction=0.3)
    print(
        f"baseline on {len(ids)} synthetic stacks: macro F1 {result['macro_f1']:.3f}, "
        f"chance {result['chance_macro_f1']:.3f}"
    )
    assert result["macro_f1"] > 2.5 * result["chance_macro_f1"]
    assert result["macro_f1"] < 0.8
    f1 = result["per_location_f1"]
    assert f1["Nucleoplasm"] > 0.7  # frequent and plainly visible: must be learned
