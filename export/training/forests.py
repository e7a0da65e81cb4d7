"""The 28 per-location Extra-Trees classifiers with their thresholds, as one estimator.

One binary forest per location, trained on every training stack at natural frequencies with
class weighting (not on balanced subsamples), with a cap on leaves per tree so that all 28
stay small as ONNX on the device. A location with no positives in the training data gets no
forest (`None`) and a score of 0: there is nothing to learn and nothing to threshold.

`LocationForests` is what train, evaluate, export and the float reference share: `fit`
chooses each location's threshold on out-of-fold scores (so a threshold is never tuned on
answers the forests remember) and then fits the final forests on all the data; `predict_proba`
gives the 28 probabilities and `predict` the labels, through `agent.model.thresholds.apply`,
the rule the device uses. It follows scikit-learn's conventions (parameters stored as given,
learned attributes ending in `_`), so `get_params`, `clone` and pickling work as usual.

`fit_original` reproduces the original study's recipe for comparison: per location a 50/50
balanced subsample of the training stacks, default forests, threshold 0.5. (The study also
put a quantile transform and a scaler before its trees; trees are invariant to such monotone
per-feature maps, so they are left out.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Self

import numpy as np
from sklearn.base import BaseEstimator

from agent.model.thresholds import apply
from export.data.split import stratified_folds
from export.training.folds import out_of_fold
from export.training.metrics import best_thresholds


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
DEFAULT_FOLDS = 3  # cross-validation folds for choosing thresholds


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


class LocationForests(BaseEstimator):  # type: ignore[misc]  # scikit-learn ships no type hints
    """The 28 location forests and their thresholds, fitted and applied as one estimator.

    Parameters are those of `ForestSettings`, plus `folds`: how many multilabel-stratified
    folds score the training stacks out-of-fold for choosing thresholds. `seed` seeds both
    the folds and the forests (location j's forest gets seed + j).

    Learned by `fit`: `forests_` (one fitted forest per location, None for a location without
    positives), `thresholds_` (per location, F1-maximising on the out-of-fold scores; 1.0,
    never reached, where there were no positives), `oof_scores_` (N x 28, each training row
    scored by forests fitted without its fold), `oof_folds_` (the fold of each training row,
    for experiments that must use the same folds) and `n_features_in_`.
    """

    def __init__(
        self,
        trees: int = ForestSettings.trees,
        max_leaf_nodes: int | None = ForestSettings.max_leaf_nodes,
        min_samples_leaf: int = ForestSettings.min_samples_leaf,
        max_features: str | float = ForestSettings.max_features,
        class_weight: str | None = ForestSettings.class_weight,
        seed: int = ForestSettings.seed,
        jobs: int = ForestSettings.jobs,
        folds: int = DEFAULT_FOLDS,
    ) -> None:
        self.trees = trees
        self.max_leaf_nodes = max_leaf_nodes
        self.min_samples_leaf = min_samples_leaf
        self.max_features = max_features
        self.class_weight = class_weight
        self.seed = seed
        self.jobs = jobs
        self.folds = folds

    @classmethod
    def from_settings(cls, settings: ForestSettings, folds: int = DEFAULT_FOLDS) -> LocationForests:
        return cls(**settings.to_dict(), folds=folds)

    @classmethod
    def from_forests(
        cls,
        forests: Sequence[Any],
        thresholds: Sequence[float] | np.ndarray,
        settings: ForestSettings,
        folds: int = DEFAULT_FOLDS,
    ) -> LocationForests:
        """An estimator around forests fitted elsewhere (model folders from before the estimator).

        It predicts like a fitted one; it has no out-of-fold scores, since those were not kept.
        """
        fitted = [forest for forest in forests if forest is not None]
        if len(forests) != len(thresholds) or not fitted:
            raise ValueError(f"{len(forests)} forests ({len(fitted)} fitted), {len(thresholds)} thresholds")
        model = cls.from_settings(settings, folds)
        model.forests_ = list(forests)
        model.thresholds_ = np.asarray(thresholds, dtype=np.float64)
        model.n_features_in_ = int(fitted[0].n_features_in_)
        return model

    def settings(self) -> ForestSettings:
        """The forest parameters, checked (a bad value raises ValueError naming it)."""
        return ForestSettings(
            trees=self.trees,
            max_leaf_nodes=self.max_leaf_nodes,
            min_samples_leaf=self.min_samples_leaf,
            max_features=self.max_features,
            class_weight=self.class_weight,
            seed=self.seed,
            jobs=self.jobs,
        )

    def fit(self, x: np.ndarray, y: np.ndarray) -> Self:
        """Thresholds from out-of-fold scores, then the final forests on all of x.

        x: N x D features; y: N x L 0/1 labels (L is 28 for HPA; any L works).
        """
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
            raise ValueError(f"expected N x D features and N x L labels, got {x.shape} and {y.shape}")
        settings = self.settings()

        def fit_predict(x_fit: np.ndarray, y_fit: np.ndarray, x_held: np.ndarray) -> np.ndarray:
            return predict_scores(fit_forests(x_fit, y_fit, settings), x_held)

        self.oof_folds_ = stratified_folds(y, self.folds, self.seed)
        self.oof_scores_ = out_of_fold(fit_predict, x, y, self.oof_folds_)
        self.thresholds_ = best_thresholds(y, self.oof_scores_)
        self.forests_ = fit_forests(x, y, settings)
        self.n_features_in_ = x.shape[1]
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """N x L probabilities of presence; 0 for locations without a forest."""
        self._check_fitted(x)
        return predict_scores(self.forests_, np.asarray(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """N x L booleans: the probabilities against the thresholds, by the device's rule."""
        return apply(self.predict_proba(x), self.thresholds_)

    @property
    def trained_locations(self) -> list[int]:
        """The locations that have a forest (the others never get a label)."""
        self._check_fitted()
        return [j for j, forest in enumerate(self.forests_) if forest is not None]

    def _check_fitted(self, x: np.ndarray | None = None) -> None:
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, ("forests_", "thresholds_"))
        if x is not None and (np.ndim(x) != 2 or np.shape(x)[1] != self.n_features_in_):
            raise ValueError(f"expected N x {self.n_features_in_} features, got shape {np.shape(x)}")


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
