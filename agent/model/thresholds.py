"""Where probabilities become labels: the one place a threshold is applied.

The device (`Bundle.labels_for`), the golden check, the workstation's estimator, its
evaluation and the export's fidelity check all call `apply`, so a change of rule (margins
around a threshold for uncertain labels, locations a bundle cannot predict) lands once.
"""

from __future__ import annotations

import numpy as np


def apply(probabilities: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """N x L probabilities -> N x L booleans: a location is on when its score reaches its threshold."""
    scores = np.asarray(probabilities)
    limits = np.asarray(thresholds)
    if scores.shape[-1] != limits.shape[-1]:
        raise ValueError(f"{scores.shape[-1]} scores for {limits.shape[-1]} thresholds")
    return scores >= limits


def near(probabilities: np.ndarray, thresholds: np.ndarray, margins: np.ndarray) -> np.ndarray:
    """N x L booleans: the score sits within the location's margin of its threshold, on either side.

    A label there could flip with a slightly different image or runtime (int8 kernels differ
    between CPUs), so it is reported as uncertain rather than as a confident answer.
    """
    scores = np.asarray(probabilities)
    return np.abs(scores - np.asarray(thresholds)) < np.asarray(margins)
