"""The novelty of a feature vector: about 1 for training-like inputs, large for unlike ones."""

from __future__ import annotations

import numpy as np

from agent.model.novelty import NoveltyReference


def training_like(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(0).normal(size=(4, 32))
    return rng.normal(size=(n, 4)) * [5.0, 3.0, 2.0, 1.0] @ basis + 10.0


def test_inputs_like_the_training_data_score_about_one() -> None:
    reference = NoveltyReference.fit(training_like(2000, seed=1), n_components=4)
    assert 0.8 < float(np.median(reference.distance(training_like(500, seed=2)))) < 1.2


def test_an_input_far_along_a_training_direction_scores_high() -> None:
    reference = NoveltyReference.fit(training_like(2000, seed=1), n_components=4)
    far = reference.mean + 20 * reference.scales[0] * reference.components[0]
    assert reference.distance(far[None])[0] > 5


def test_components_beyond_the_rank_of_the_data_are_dropped() -> None:
    reference = NoveltyReference.fit(training_like(100, seed=1), n_components=16)
    assert len(reference.scales) == 4


def test_an_input_off_the_training_directions_scores_high() -> None:
    """Far from the space the training data spans, though its coordinates along it look typical."""
    train = training_like(2000, seed=1) + np.random.default_rng(3).normal(scale=0.1, size=(2000, 32))
    reference = NoveltyReference.fit(train, n_components=4)
    off = reference.mean.copy()
    normal = np.linalg.svd(reference.components)[2][-1]  # orthogonal to every component
    off += 5.0 * normal
    assert reference.distance(off[None])[0] > 5
