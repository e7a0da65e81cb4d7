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
