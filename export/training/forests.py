"""The 28 per-location Extra-Trees classifiers: how they are fitted and how they score.

One binary forest per location, trained on every training stack at natural frequencies with
class weighting (not on balanced subsamples), with a cap on leaves per tree so that all 28
stay small as ONNX on the device. A location with no positives in the training data gets no
forest (`None`) and a score of 0: there is nothing to learn and nothing to threshold.

`fit_original` reproduces the original study's recipe for comparison: per location a 50/50
balanced subsample of the training stacks, default forests, threshold 0.5. (The study also
put a quantile transform and a scaler before its trees; trees are invariant to such monotone
per-feature maps, so they are left out.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ForestSettings:
    # 200 trees x 24 leaves: at most 28 x 200 x 47 nodes, about 10 MB as ONNX (limit 12 MB);
    # on synthetic Lite0 embeddings it beat 100 x 48, 50 x 96 and 25 x 192 of the same size (README).
    trees: int = 200
    max_leaf_nodes: int | None = 24  # None = grown fully (huge: see README)
    min_samples_leaf: int = 1
    max_features: str | float = "sqrt"
    class_weight: str | None = "balanced"
    seed: int = 0
    jobs: int = -1

    def __post_init__(self) -> None:
        if self.trees < 1:
            raise ValueError(f"trees must be at least 1, not {self.trees}")
        if self.max_leaf_nodes is not None and self.max_leaf_nodes < 2:
            raise ValueError(f"max_leaf_nodes must be at least 2 (or unset), not {self.max_leaf_nodes}")
        if self.class_weight not in (None, "balanced", "balanced_subsample"):
            raise ValueError(
                f"class_weight must be balanced, balanced_subsample or none, not {self.class_weight}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Forests = list[Any]  # one fitted ExtraTreesClassifier per location, or None


def fit_forests(x: np.ndarray, y: np.ndarray, settings: ForestSettings) -> Forests:
    """One binary forest per column of y; seeds differ per location but are fixed."""
    forests: Forests = []
    for j in range(y.shape[1]):
        column = y[:, j].astype(np.int64)
        if column.min() == column.max():
            forests.append(None)
            continue
        forests.append(_forest(settings, settings.seed + j).fit(x, column))
    return forests


def _forest(settings: ForestSettings, seed: int) -> Any:
    from sklearn.ensemble import ExtraTreesClassifier

    return ExtraTreesClassifier(
        n_estimators=settings.trees,
        max_leaf_nodes=settings.max_leaf_nodes,
        min_samples_leaf=settings.min_samples_leaf,
        max_features=settings.max_features,
        class_weight=settings.class_weight,
        n_jobs=settings.jobs,
        random_state=seed,
    )


def predict_scores(forests: Forests, x: np.ndarray) -> np.ndarray:
    """N x L probabilities of presence; 0 for locations without a forest."""
    scores = np.zeros((len(x), len(forests)))
    for j, forest in enumerate(forests):
        if forest is not None:
            scores[:, j] = forest.predict_proba(x)[:, list(forest.classes_).index(1)]
    return scores


def out_of_fold_scores(
    x: np.ndarray, y: np.ndarray, folds: np.ndarray, settings: ForestSettings
) -> np.ndarray:
    """Each stack scored by forests that never saw it (for choosing thresholds honestly)."""
    scores = np.zeros(y.shape, dtype=np.float64)
    for k in np.unique(folds):
        fit, held = folds != k, folds == k
        scores[held] = predict_scores(fit_forests(x[fit], y[fit], settings), x[held])
    return scores


def balanced_subsample(column: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices of all positives and as many randomly drawn negatives (the original recipe)."""
    positives = np.flatnonzero(column)
    negatives = np.flatnonzero(~column.astype(bool))
    n = min(len(positives), len(negatives))
    chosen = np.concatenate(
        [rng.choice(positives, n, replace=False), rng.choice(negatives, n, replace=False)]
    )
    return np.sort(chosen)


def fit_original(x: np.ndarray, y: np.ndarray, seed: int = 0, jobs: int = -1, trees: int = 100) -> Forests:
    """The original study's forests: per location a balanced 50/50 subsample, default settings."""
    from sklearn.ensemble import ExtraTreesClassifier

    rng = np.random.default_rng(seed)
    forests: Forests = []
    for j in range(y.shape[1]):
        column = y[:, j].astype(bool)
        if column.all() or not column.any():
            forests.append(None)
            continue
        rows = balanced_subsample(column, rng)
        forest = ExtraTreesClassifier(n_estimators=trees, n_jobs=jobs, random_state=seed + j)
        forests.append(forest.fit(x[rows], column[rows].astype(np.int64)))
    return forests


def count_nodes(forests: Forests) -> int:
    return sum(
        tree.tree_.node_count for forest in forests if forest is not None for tree in forest.estimators_
    )


def fit_joint(x: np.ndarray, y: np.ndarray, pair: tuple[int, int], settings: ForestSettings) -> Any:
    """One 4-class forest over the label combinations of two locations (neither, first, second, both)."""
    combined = y[:, pair[0]].astype(np.int64) + 2 * y[:, pair[1]].astype(np.int64)
    return _forest(settings, settings.seed + 100).fit(x, combined)


def predict_joint(forest: Any, x: np.ndarray) -> np.ndarray:
    """N x 2 probabilities of each of the two locations, summed over the combinations holding it."""
    proba = forest.predict_proba(x)
    full = np.zeros((len(x), 4))
    full[:, forest.classes_] = proba
    return np.stack([full[:, 1] + full[:, 3], full[:, 2] + full[:, 3]], axis=1)
