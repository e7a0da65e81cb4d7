"""Multilabel-stratified splits (iterative stratification, Sechidis et al. 2011).

A plain random split of HPA data can leave a rare location (11 Rods & rings in 31,072
stacks) with no positives in the test part; this assigns the rarest labels first so each
fold gets its share of every location.
"""

from __future__ import annotations

import numpy as np


def stratified_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold number (0..n_folds-1) for each row of an N x L 0/1 matrix."""
    y = np.asarray(labels, dtype=bool)
    n = len(y)
    if not 2 <= n_folds <= n:
        raise ValueError(f"n_folds must be 2..{n}, not {n_folds}")
    rng = np.random.default_rng(seed)
    fold = np.full(n, -1)
    capacity = np.full(n_folds, n / n_folds)
    wanted = np.outer(np.full(n_folds, 1 / n_folds), y.sum(axis=0))  # folds x labels
    remaining = y.copy()
    unassigned = np.ones(n, dtype=bool)
    while unassigned.any():
        counts = remaining[unassigned].sum(axis=0)
        if not counts.any():  # rows without labels: fill the emptiest folds
            for row in rng.permutation(np.flatnonzero(unassigned)):
                target = int(np.argmax(capacity + rng.random(n_folds) * 1e-6))
                fold[row], capacity[target] = target, capacity[target] - 1
            break
        label = int(np.argmin(np.where(counts > 0, counts, np.iinfo(np.int64).max)))
        rows = np.flatnonzero(unassigned & y[:, label])
        for row in rng.permutation(rows):
            need = wanted[:, label]
            best = np.flatnonzero(need == need.max())
            if len(best) > 1:
                best = best[capacity[best] == capacity[best].max()]
            target = int(rng.choice(best))
            fold[row] = target
            unassigned[row] = False
            capacity[target] -= 1
            wanted[target] -= y[row]
    return fold


def train_test_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a stratified train/test split with about `test_fraction` in the test part."""
    if not 0 < test_fraction < 1:
        raise ValueError("test_fraction must lie strictly between 0 and 1")
    n_folds = max(2, round(1 / test_fraction))
    fold = stratified_folds(labels, n_folds, seed)
    return np.flatnonzero(fold != 0), np.flatnonzero(fold == 0)
