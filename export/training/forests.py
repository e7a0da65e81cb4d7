"""The 28 per-location Extra-Trees classifiers with their thresholds, as one estimator.

One binary forest per location, trained on every training stack at natural frequencies with
class weighting (not on balanced subsamples), with a cap on leaves per tree so that all 28
stay small as ONNX on the device. A location is published only with evidence: with fewer
than `min_positives` training positives it is "not trained", and when its out-of-fold scores
show no evidence (F1 zero, or flat: no better than labelling every stack) it is "not
predicted". Either way it gets no forest (`None`), a score of 0 and threshold 1.0, so no
device, old or new, ever labels it (`export.training.metrics.choose_thresholds` has the rules).

`LocationForests` is what train, evaluate, export and the float reference share. `fit` is
cross-fitted: a multilabel-stratified k-fold split; per fold, forests of trees/k trees fitted
on the other folds score the held fold; those out-of-fold scores choose each location's
threshold (so a threshold is never tuned on answers the forests remember); and the k fold
forests of a location, merged into one forest of about `trees` trees, are the forest that
predicts. A new stack's score is the mean of the k fold forests' scores, the models whose
scores the threshold was chosen on. (A final refit on all the data, as before issue 16,
shifts the scores: with class weighting and a leaf cap, a rare location's scores on new
stacks rise with the number of training stacks, so thresholds tuned on fold models trained
on 2/3 of the data let it be predicted several times too often; docs/training.md has the
measurement.) `predict_proba` gives the 28 probabilities and `predict` the labels, through
`agent.model.thresholds.apply`, the rule the device uses. It follows scikit-learn's
conventions (parameters stored as given, learned attributes ending in `_`), so `get_params`,
`clone` and pickling work as usual.

`fit_original` reproduces the original study's recipe for comparison: per location a 50/50
balanced subsample of the training stacks, default forests, threshold 0.5. (The study also
put a quantile transform and a scaler before its trees; trees are invariant to such monotone
per-feature maps, so they are left out.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Self

import numpy as np
from sklearn.base import BaseEstimator

from agent.model.novelty import NoveltyReference
from agent.model.thresholds import apply
from export.data.split import stratified_folds
from export.training.folds import out_of_fold
from export.training.metrics import (
    DEFAULT_RULE,
    NOT_PREDICTED,
    NOT_TRAINED,
    THRESHOLD_RULES,
    TRAINED,
    ThresholdChoice,
    choose_thresholds,
)


@dataclass(frozen=True)
class ForestSettings:
    # 200 trees x 24 leaves: at most 28 x 200 x 47 nodes, about 10 MB as ONNX (limit 12 MB);
    # on synthetic Lite0 embeddings it beat 100 x 48, 50 x 96 and 25 x 192 of the same size (README).
    # LocationForests cross-fits them: 3 fold forests of 67 trees, 201 in all.
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
# Fewer training positives than this: no forest (docs/training.md, "Thresholds and rare
# locations": below 10 the held-out F1 of a forest rarely beat labelling every stack).
DEFAULT_MIN_POSITIVES = 10
FOLD_SEED_STEP = 1000  # fold k's forest of location j gets seed + 1000 k + j
NOVELTY_COMPONENTS = 16  # principal components of the novelty reference
NOVELTY_PERCENTILE = 99.5  # of the out-of-fold novelty of the training stacks: the threshold


def fit_forests(
    x: np.ndarray, y: np.ndarray, settings: ForestSettings, columns: np.ndarray | None = None
) -> Forests:
    """One binary forest per column of y (where `columns` is True, if given); fixed seed per location."""
    forests: Forests = []
    for j in range(y.shape[1]):
        column = y[:, j].astype(np.int64)
        if column.min() == column.max() or (columns is not None and not columns[j]):
            forests.append(None)
            continue
        forests.append(_forest(settings, settings.seed + j).fit(x, column))
    return forests


def merge_forests(parts: Sequence[Any]) -> Any:
    """One forest holding the trees of all `parts` (fitted forests of one kind, classes [0, 1]).

    Its probability is the mean over all trees, so for parts of equal size it is the mean of
    the parts' probabilities: the cross-fitted forest of a location.
    """
    import copy

    merged = copy.copy(parts[0])
    merged.estimators_ = [tree for part in parts for tree in part.estimators_]
    merged.n_estimators = len(merged.estimators_)
    return merged


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
    folds score the training stacks out-of-fold for choosing thresholds; `min_positives`:
    fewer training positives than this and a location gets no forest ("not trained");
    `threshold_rule`: how a threshold is chosen among the out-of-fold F1 curve's points
    (`export.training.metrics.THRESHOLD_RULES`; default "near-best-rate"); `novelty_components`
    and `novelty_percentile`: the novelty reference's principal components and the percentile
    of out-of-fold training novelty that becomes its threshold. `seed` seeds the folds, the
    forests (fold k's forest of location j gets seed + 1000 k + j) and the bootstrap of the
    threshold rules. Each fold forest has ceil(trees / folds) trees.

    Learned by `fit`:
    - `forests_`: per location the k fold forests merged into one (`merge_forests`), None
      where nothing is predicted;
    - `thresholds_`: per location, chosen on the out-of-fold scores by `threshold_rule`; 1.0,
      never reached, where nothing is predicted;
    - `status_`: per location "trained", "not trained" (fewer than `min_positives`) or "not
      predicted" (out-of-fold F1 zero or flat); `reasons_`: a sentence for the latter two;
    - `positives_`: training positives per location;
    - `margins_`: per location, the standard deviation of its threshold when the rule is
      applied to bootstrap resamples of the out-of-fold rows (at least one grid step, 0.005;
      0 where nothing is predicted): a score closer to the threshold than that could have
      fallen either side with slightly different training data, and the device reports such
      a label as near its threshold;
    - `threshold_choice_`: the `ThresholdChoice` with the out-of-fold figures behind all this;
    - `novelty_` (a `NoveltyReference` fitted on all training features) and
      `novelty_threshold_`: the `novelty_percentile` of the training stacks' novelty, each
      measured against a reference fitted without its fold (in-sample novelty is smaller
      than a new stack's);
    - `oof_scores_` (N x L, each training row scored by forests fitted without its fold),
      `oof_folds_` (the fold of each training row, for experiments that must use the same
      folds) and `n_features_in_`.
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
        min_positives: int = DEFAULT_MIN_POSITIVES,
        threshold_rule: str = DEFAULT_RULE,
        novelty_components: int = NOVELTY_COMPONENTS,
        novelty_percentile: float = NOVELTY_PERCENTILE,
    ) -> None:
        self.trees = trees
        self.max_leaf_nodes = max_leaf_nodes
        self.min_samples_leaf = min_samples_leaf
        self.max_features = max_features
        self.class_weight = class_weight
        self.seed = seed
        self.jobs = jobs
        self.folds = folds
        self.min_positives = min_positives
        self.threshold_rule = threshold_rule
        self.novelty_components = novelty_components
        self.novelty_percentile = novelty_percentile

    @classmethod
    def from_settings(
        cls, settings: ForestSettings, folds: int = DEFAULT_FOLDS, **rules: Any
    ) -> LocationForests:
        """From forest settings; `rules` are the other parameters (min_positives, threshold_rule...)."""
        return cls(**settings.to_dict(), folds=folds, **rules)

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

    def location_rows(self, names: Sequence[str]) -> list[dict[str, Any]]:
        """Per location: name, status, training positives, threshold, margin (and a reason
        where nothing is predicted), as the bundle's manifest lists them.

        An estimator fitted before the rules of issue 16 (or wrapped by `from_forests`) knows
        only which locations have a forest: positives -1 (unknown), margin 0.
        """
        self._check_fitted()
        status = getattr(self, "status_", None)
        rows = []
        for j, name in enumerate(names):
            row: dict[str, Any] = {
                "name": name,
                "status": status[j]
                if status is not None
                else (TRAINED if self.forests_[j] is not None else NOT_TRAINED),
                "positives": int(self.positives_[j]) if hasattr(self, "positives_") else -1,
                "threshold": float(self.thresholds_[j]),
                "margin": round(float(self.margins_[j]), 4) if hasattr(self, "margins_") else 0.0,
            }
            if row["status"] != TRAINED:
                reasons = getattr(self, "reasons_", None)
                row["reason"] = reasons[j] if reasons is not None else "no classifier for this location"
            rows.append(row)
        return rows

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
        """Cross-fitted forests: out-of-fold scores choose the thresholds, and the fold forests
        that gave those scores, merged, are the forests that predict.

        x: N x D features; y: N x L 0/1 labels (L is 28 for HPA; any L works).
        """
        x, y = np.asarray(x), np.asarray(y)
        if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
            raise ValueError(f"expected N x D features and N x L labels, got {x.shape} and {y.shape}")
        settings = self.settings()
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(
                f"threshold_rule must be one of {', '.join(THRESHOLD_RULES)}, not {self.threshold_rule!r}"
            )
        if self.min_positives < 1:
            raise ValueError(f"min_positives must be at least 1, not {self.min_positives}")
        if not 50 <= self.novelty_percentile <= 100:
            raise ValueError(f"novelty_percentile must be 50..100, not {self.novelty_percentile}")
        candidates = (y != 0).sum(axis=0) >= self.min_positives
        per_fold = replace(settings, trees=-(-settings.trees // self.folds))  # ceil: at least `trees` in all
        fold_forests: list[Forests] = []

        def fit_predict(x_fit: np.ndarray, y_fit: np.ndarray, x_held: np.ndarray) -> np.ndarray:
            fold = replace(per_fold, seed=settings.seed + FOLD_SEED_STEP * len(fold_forests))
            fold_forests.append(fit_forests(x_fit, y_fit, fold, candidates))
            return predict_scores(fold_forests[-1], x_held)

        self.oof_folds_ = stratified_folds(y, self.folds, self.seed)
        self.oof_scores_ = out_of_fold(fit_predict, x, y, self.oof_folds_)
        choice = choose_thresholds(
            y, self.oof_scores_, self.threshold_rule, min_positives=self.min_positives, seed=self.seed
        )
        self.forests_ = []
        for j, status in enumerate(choice.status):
            parts = [forests[j] for forests in fold_forests]
            if status == TRAINED and any(part is None for part in parts):  # a fold without positives
                choice.status[j], choice.thresholds[j], choice.margins[j] = NOT_PREDICTED, 1.0, 0.0
                choice.reasons[j] = "a cross-validation fold had no positives to train on: not predicted"
            self.forests_.append(merge_forests(parts) if choice.status[j] == TRAINED else None)
        self._learn_choice(choice)
        self.novelty_, self.novelty_threshold_ = self._fit_novelty(x)
        self.n_features_in_ = x.shape[1]
        return self

    def _learn_choice(self, choice: ThresholdChoice) -> None:
        self.threshold_choice_ = choice
        self.thresholds_ = choice.thresholds
        self.status_ = list(choice.status)
        self.reasons_ = list(choice.reasons)
        self.positives_ = choice.positives.astype(np.int64)
        self.margins_ = choice.margins

    def _fit_novelty(self, x: np.ndarray) -> tuple[NoveltyReference, float]:
        held = np.zeros(len(x))
        for k in np.unique(self.oof_folds_):
            inside = self.oof_folds_ == k
            held[inside] = NoveltyReference.fit(x[~inside], self.novelty_components).distance(x[inside])
        return NoveltyReference.fit(x, self.novelty_components), float(
            np.percentile(held, self.novelty_percentile)
        )

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """N x L probabilities of presence; 0 for locations without a forest."""
        self._check_fitted(x)
        return predict_scores(self.forests_, np.asarray(x))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """N x L booleans: the probabilities against the thresholds, by the device's rule."""
        return apply(self.predict_proba(x), self.thresholds_)

    @property
    def trained_locations(self) -> list[int]:
        """The locations that have a forest (the others, not trained or not predicted, get no label)."""
        return [j for j, has_forest in enumerate(self.available_) if has_forest]

    @property
    def available_(self) -> np.ndarray:
        """Per location, whether it has a forest, as a mask: the device's `Trust.available`,
        what the set confidence and the review count."""
        self._check_fitted()
        return np.array([forest is not None for forest in self.forests_], dtype=bool)

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
