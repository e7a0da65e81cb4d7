"""The fidelity figures that decide the export gate, on hand-made answers."""

from __future__ import annotations

import numpy as np

from export.conversion.make_bundle import fidelity, onnx_parity


def _case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(50, 8)).astype(np.float32)
    probabilities = rng.random((50, 28))
    truth = probabilities > 0.6
    return embeddings, probabilities, truth


def test_identical_answers_give_perfect_fidelity() -> None:
    embeddings, probabilities, truth = _case()
    report = fidelity((embeddings, probabilities), (embeddings, probabilities), np.full(28, 0.5), truth)
    assert report["identical_label_sets"] == 1.0
    assert report["embedding_cosine_min"] == 1.0
    assert sum(report["label_flips"]) == 0
    assert report["macro_f1_difference"] == 0.0


def test_one_flipped_label_costs_one_stack_its_identical_set_and_is_counted_where_it_happened() -> None:
    embeddings, probabilities, truth = _case()
    thresholds = np.full(28, 0.5)
    moved = probabilities.copy()
    moved[3, 7] = 0.9 if probabilities[3, 7] < 0.5 else 0.1
    report = fidelity((embeddings, probabilities), (embeddings, moved), thresholds, truth)
    assert report["identical_label_sets"] == 49 / 50
    assert report["label_flips"][7] == 1
    assert sum(report["label_flips"]) == 1
    assert report["probability_max_difference"][7] > 0.3


def test_a_rotated_embedding_shows_in_the_cosine() -> None:
    embeddings, probabilities, truth = _case()
    report = fidelity((embeddings, probabilities), (-embeddings, probabilities), np.full(28, 0.5), truth)
    assert report["embedding_cosine_min"] == -1.0


def test_parity_does_not_count_a_tie_at_the_threshold_as_a_flip() -> None:
    sklearn = np.array([[0.3, 0.6]])
    onnx = np.array([[0.3 - 1e-7, 0.6]])  # float32 rounding just below a threshold of 0.3
    difference, flips, ties = onnx_parity(onnx, sklearn, np.array([0.3, 0.5]))
    assert (flips, ties) == (0, 1)
    assert difference < 1e-6
    _, flips, _ = onnx_parity(np.array([[0.2, 0.6]]), np.array([[0.35, 0.6]]), np.array([0.3, 0.5]))
    assert flips == 1
