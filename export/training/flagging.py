"""The set confidence behind the `uncertain_set` review reason, fitted out of fold.

The review flag (`agent.model.review`) should point at the stacks whose label set is wrong.
Margins around each threshold (`near_threshold`) ask "could one label flip?"; the set
confidence asks "how likely is the whole set right?", which is what a lab acts on:

- per location, a calibration table maps a score to the chance that the location is present:
  isotonic regression (monotone by construction) of the out-of-fold training labels on the
  out-of-fold scores, its points kept as a small table (`scores`, `probabilities`), clipped
  to [clip, 1 - clip] so that no decision is ever taken as certain; a location without a
  forest gets one point, its training prevalence;
- a decision is right with p where the location was labelled, 1 - p where not, and the set
  with the product over the locations;
- the cut is the set confidence below which the wanted `share` of the training stacks is
  flagged out of fold, counting stacks that are flagged anyway (no label, novel input) in
  the share.

On the device this is 28 table look-ups and a product (`agent.model.review.SetCalibration`).

Measured on the demo recipe (`hpa-edge synth --n 1500 --seed 7`, `embed --features
lite0-gap+hand-rgb`, `train`: 1,191 training stacks scored out of fold; 200 held-out stacks of
seed 1234, scored by the merged forests on float features and by an int8 bundle exported
from the same model through `hpa-edge predict`). About two thirds of the label sets are
wrong, so even a perfect flag reaches a ratio of 2 only when it flags over a third of the
stacks ("perfect": the same share, all of it wrong stacks):

| rule (set confidence: share 0.40) | data | flagged | wrong: flagged / not | ratio | perfect |
| --- | --- | --- | --- | --- | --- |
| margins + no label + novel (before) | out of fold | 36.6% | 83% / 59% | 1.39 | 2.04 |
| | held out, float | 39.5% | 80% / 56% | 1.42 | 2.33 |
| | held out, int8 device | 39.0% | 86% / 52% | 1.66 | 2.35 |
| **set confidence + no label + novel** | out of fold | 40.0% | 95% / 50% | 1.92 | 2.16 |
| | held out, float | 36.0% | 93% / 50% | 1.86 | 2.17 |
| | held out, int8 device | 33.0% | 94% / 51% | 1.85 | 2.09 |
| both | held out, float | 49.5% | 83% / 49% | 1.71 | 3.16 |
| | held out, int8 device | 46.0% | 87% / 46% | 1.88 | 2.84 |

The set confidence picks wrong sets more than 90% of the time, close to what any flag can do
at that share; what keeps the ratio under 2 is the share of wrong sets, not the ranking.
Richer rankings fitted out of fold did no better on the held-out stacks (within 2 stacks): a
logistic regression on the 28 decisions' log chances, the number of labels and the summed
probabilities, also with the novelty reference's 16 whitened coordinates or the hand
features; the smallest decision chance; the expected number of wrong decisions. Most wrong
sets left unflagged miss a second or third label whose calibrated chance was 2-10%. Shares
0.33-0.42 gave ratios of 1.75-1.92 everywhere; a cut fitted out of fold flags fewer new
stacks than training ones (presumably the merged forests' scores are less often ambiguous than one
fold forest's), hence a share of 0.40, the issue's limit, on the training stacks at first.

With the forests trained on the int8 embedder's own features (the demo bundle since `hpa-edge
convert`), the same 0.40 flagged 41% of the 200 new stacks (ratio 1.61): new stacks drift a
few points either side of the training share (33-41% across the float and int8 builds), so
the default is 0.35, which keeps them under the 40% limit (33.5% there, ratio 1.66; shares
0.30-0.40 gave 1.84-1.61 on those stacks, fewer flags giving the higher ratio).

`SetRiskModel` replaces the set confidence's cut where a bundle carries it: Extra-Trees on the
28 out-of-fold scores, the log set confidence and the label count, cut where 38% of the
training stacks are flagged out of fold. On 3,000 unseen stacks of seed 2026 with the demo
bundle (`hand-rgb2`, int8 device pipeline) it flagged 37.2% with a ratio of 2.18 (95%
2.06-2.31), against 2.06 for the set confidence's cut moved to the same share and 2.03 at
its own (32.7%); docs/training.md has the table.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, Self

import numpy as np
from sklearn.base import BaseEstimator

from agent.model.review import (
    SET_CONFIDENCE_METHOD,
    SET_CONFIDENCE_VERSION,
    SET_RISK_METHOD,
    SET_RISK_VERSION,
    SetCalibration,
    SetRisk,
    risk_inputs,
)
from agent.model.thresholds import apply
from agent.stacks.labels import LOCATIONS

DEFAULT_SHARE = 0.35  # of the training stacks flagged out of fold (new stacks: within a few points)
DEFAULT_CLIP = 0.005  # no decision is taken as more certain than 99.5%
DEFAULT_RISK_SHARE = 0.38  # with the set-risk model (new stacks: 34-39%; docs/training.md)
DECIMALS = 6  # of the table's points in the manifest


class SetConfidence(BaseEstimator):  # type: ignore[misc]  # scikit-learn ships no type hints
    """Per-location calibration tables and the cut of the `uncertain_set` review reason.

    Parameters: `share`, the share of the training stacks to flag out of fold (those flagged
    for other reasons, passed to `fit`, count in it); `clip`, the least chance any decision
    keeps of being wrong.

    Learned by `fit`:
    - `scores_`, `probabilities_`: per location the calibration table (increasing scores,
      the chance of presence at each), rounded as the manifest carries them;
    - `cut_`: stacks whose set confidence is below it are flagged `uncertain_set`;
    - `confidence_`: the set confidence of each fitting row (by the rounded tables);
    - `flagged_share_`: the share of the fitting rows flagged by the cut or the other reasons;
    - `uncertain_share_`: the share flagged by the cut alone.
    """

    def __init__(self, share: float = DEFAULT_SHARE, clip: float = DEFAULT_CLIP) -> None:
        self.share = share
        self.clip = clip

    def fit(
        self,
        scores: np.ndarray,
        y: np.ndarray,
        thresholds: np.ndarray,
        available: np.ndarray | None = None,
        flagged: np.ndarray | None = None,
    ) -> Self:
        """Fit on out-of-fold scores (N x L) and the training labels (N x L, 0/1).

        `thresholds` (L) turn the scores into the labels the decisions are judged on;
        `available` (L booleans, default: threshold below 1) marks the locations with a forest,
        the others get their prevalence as a constant; `flagged` (N booleans) marks the rows
        flagged anyway besides those without any label (e.g. novel input), which count in the
        share. Use scores of rows the forests never saw (`LocationForests.oof_scores_`): a
        forest's scores of its own training rows are far too sure.
        """
        scores, y = np.asarray(scores, dtype=np.float64), np.asarray(y) != 0
        thresholds = np.asarray(thresholds, dtype=np.float64)
        if scores.ndim != 2 or scores.shape != y.shape or thresholds.shape != (scores.shape[1],):
            raise ValueError(
                f"expected N x L scores and labels and L thresholds, got {scores.shape}, {y.shape}, "
                f"{thresholds.shape}"
            )
        if not 0 < self.share < 1:
            raise ValueError(f"share must be between 0 and 1, not {self.share}")
        if not 0 < self.clip < 0.5:
            raise ValueError(f"clip must be between 0 and 0.5, not {self.clip}")
        usable = thresholds < 1.0 if available is None else np.asarray(available, dtype=bool)
        tables = [
            _table(scores[:, j], y[:, j], self.clip) if usable[j] else _constant(y[:, j], self.clip)
            for j in range(scores.shape[1])
        ]
        self.scores_ = [x for x, _ in tables]
        self.probabilities_ = [p for _, p in tables]
        labels = apply(scores, thresholds)
        self.confidence_ = self._calibration(0.0).confidences(scores, labels)
        anyway = flagged_anyway(labels, flagged)
        self.cut_ = choose_cut(self.confidence_, anyway, self.share)
        uncertain = self.confidence_ < self.cut_
        self.uncertain_share_ = float(uncertain.mean())
        self.flagged_share_ = float((uncertain | anyway).mean())
        return self

    def calibration(self) -> SetCalibration:
        """What the device uses (`agent.model.review.Trust.set_calibration`)."""
        self._check_fitted()
        return self._calibration(self.cut_)

    def confidence(self, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """N x L scores and labels -> N set confidences, as the device computes them."""
        self._check_fitted()
        return self._calibration(self.cut_).confidences(np.asarray(scores), np.asarray(labels))

    def manifest_entry(self, names: Sequence[str] = LOCATIONS) -> dict[str, Any]:
        """The manifest's `set_confidence` entry (`agent.model.review.read_set_calibration` reads it)."""
        self._check_fitted()
        if len(names) != len(self.scores_):
            raise ValueError(f"{len(names)} names for {len(self.scores_)} locations")
        return {
            "method": SET_CONFIDENCE_METHOD,
            "version": SET_CONFIDENCE_VERSION,
            "cut": float(self.cut_),
            "share": float(self.share),
            "flagged_share": round(self.flagged_share_, 4),
            "clip": float(self.clip),
            "locations": [
                {"name": name, "scores": x.tolist(), "probabilities": p.tolist()}
                for name, x, p in zip(names, self.scores_, self.probabilities_, strict=True)
            ],
        }

    def _calibration(self, cut: float) -> _Tables:
        return _Tables(tuple(self.scores_), tuple(self.probabilities_), cut)

    def _check_fitted(self) -> None:
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, ("scores_", "probabilities_", "cut_"))


class SetRiskModel(BaseEstimator):  # type: ignore[misc]
    """The chance that a stack's label set is wrong, learned out of fold: the `uncertain_set` cut.

    The set confidence multiplies 28 decisions as if they were independent; a wrong set it
    misses usually lacks a second location that no single score gives away, but that some
    combinations of scores make likely (docs/training.md). Extra-Trees over `risk_inputs`
    (the 28 out-of-fold scores, the log set confidence, the label count) learn them, and the
    device runs them as an ONNX graph beside the forests.

    Parameters: `share` of the training stacks to flag (those flagged anyway count in it, as in
    `SetConfidence`); `trees`, `min_samples_leaf` (small trees: 30 x about 140 nodes; 100 trees
    flagged the same seed-99 stacks as well, for 3.4 times the nodes the device keeps in memory);
    `folds` for the out-of-fold risks the cut is chosen on; `seed`; `jobs`.

    Learned by `fit`:
    - `model_`: the ExtraTreesClassifier (class 1: the set is wrong);
    - `risk_`: each fitting row's risk from trees fitted without its fold (the cut is chosen
      on these: trees are far too sure of their own rows);
    - `cut_`: stacks whose risk is above it are flagged `uncertain_set`;
    - `flagged_share_`, `uncertain_share_`: as in `SetConfidence`.
    """

    def __init__(
        self,
        share: float = DEFAULT_RISK_SHARE,
        trees: int = 30,
        min_samples_leaf: int = 10,
        folds: int = 5,
        seed: int = 0,
        jobs: int = -1,
    ) -> None:
        self.share = share
        self.trees = trees
        self.min_samples_leaf = min_samples_leaf
        self.folds = folds
        self.seed = seed
        self.jobs = jobs

    def fit(
        self,
        scores: np.ndarray,
        y: np.ndarray,
        thresholds: np.ndarray,
        confidence: np.ndarray,
        flagged: np.ndarray | None = None,
    ) -> Self:
        """Fit on out-of-fold scores (N x L), the training labels (N x L, 0/1), the thresholds
        (L) that make the label sets, and each row's set confidence (`SetConfidence.confidence_`);
        `flagged` as in `SetConfidence.fit`."""
        from sklearn.model_selection import StratifiedKFold, cross_val_predict

        scores, y = np.asarray(scores, dtype=np.float64), np.asarray(y) != 0
        labels = apply(scores, np.asarray(thresholds, dtype=np.float64))
        if labels.shape != y.shape or np.shape(confidence) != (len(y),):
            raise ValueError(
                f"expected N x L scores and labels and N confidences, got {scores.shape}, {y.shape}"
            )
        if not 0 < self.share < 1:
            raise ValueError(f"share must be between 0 and 1, not {self.share}")
        wrong = (labels != y).any(axis=1)
        if min(int(wrong.sum()), int((~wrong).sum())) < self.folds:
            raise ValueError(
                f"{int(wrong.sum())} wrong and {int((~wrong).sum())} right training label sets: "
                f"need {self.folds} of each to learn which are wrong"
            )
        inputs = risk_inputs(scores, labels, confidence)
        folds = StratifiedKFold(self.folds, shuffle=True, random_state=self.seed)
        self.risk_ = cross_val_predict(self._trees(), inputs, wrong, cv=folds, method="predict_proba")[:, 1]
        self.model_ = self._trees().fit(inputs, wrong)
        self.n_inputs_ = inputs.shape[1]
        anyway = flagged_anyway(labels, flagged)
        self.cut_ = 1.0 - choose_cut(1.0 - self.risk_, anyway, self.share)  # above it: flagged
        uncertain = self.risk_ > self.cut_
        self.uncertain_share_ = float(uncertain.mean())
        self.flagged_share_ = float((uncertain | anyway).mean())
        return self

    def predict_proba(self, inputs: np.ndarray) -> np.ndarray:
        """N x 30 `risk_inputs` -> N x 2 (right, wrong), as the shipped graph computes column 1."""
        self._check_fitted()
        probabilities: np.ndarray = self.model_.predict_proba(np.asarray(inputs, dtype=np.float32))
        return probabilities

    def for_device(self) -> SetRisk:
        """What the device uses (`agent.model.review.Trust.set_risk`), with these trees in place
        of the shipped graph. It is asked one stack at a time, so the trees run on this thread:
        joblib's threads cost about ten times what 30 small trees do for one row."""
        self._check_fitted()
        trees = copy.copy(self.model_)
        trees.n_jobs = 1
        return SetRisk(lambda x: trees.predict_proba(np.asarray(x, np.float32))[:, 1:], float(self.cut_))

    def manifest_entry(self) -> dict[str, Any]:
        """The manifest's `set_risk` entry (`agent.model.review.read_set_risk` reads it)."""
        self._check_fitted()
        return {
            "method": SET_RISK_METHOD,
            "version": SET_RISK_VERSION,
            "inputs": int(self.n_inputs_),
            "cut": float(self.cut_),
            "share": float(self.share),
            "flagged_share": round(self.flagged_share_, 4),
            "trees": self.trees,
            "min_samples_leaf": self.min_samples_leaf,
        }

    def _trees(self) -> Any:
        from sklearn.ensemble import ExtraTreesClassifier

        return ExtraTreesClassifier(
            self.trees,
            min_samples_leaf=self.min_samples_leaf,
            max_features=0.3,
            n_jobs=self.jobs,
            random_state=self.seed,
        )

    def _check_fitted(self) -> None:
        from sklearn.utils.validation import check_is_fitted

        check_is_fitted(self, ("model_", "cut_"))


class _Tables(SetCalibration):
    """SetCalibration with a vectorised confidence for many rows (workstation only)."""

    def confidences(self, scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
        present = np.column_stack(
            [
                np.interp(scores[:, j], x, p)
                for j, (x, p) in enumerate(zip(self.scores, self.probabilities, strict=True))
            ]
        )
        right = np.where(np.asarray(labels, dtype=bool), present, 1.0 - present)
        return np.exp(np.log(right).sum(axis=1))


def flagged_anyway(labels: np.ndarray, flagged: np.ndarray | None) -> np.ndarray:
    """The rows the device flags whatever the cut (no label at all, and those marked `flagged`,
    e.g. novel input): they count in the share a cut aims at."""
    anyway = np.logical_not(np.asarray(labels, dtype=bool).any(axis=1))
    if flagged is not None:
        anyway |= np.asarray(flagged, dtype=bool)
    return anyway


def choose_cut(confidence: np.ndarray, anyway: np.ndarray, share: float) -> float:
    """The cut below which, with the `anyway` rows, at most `share` of the rows are flagged.

    Halfway between the last confidence flagged and the next, so that the fitting rows fall
    clearly on one side; rows of equal confidence (flat stretches of the tables) stay on the
    same side, unflagged when they straddle the share. 0 (never flags) when the rows flagged
    anyway reach the share already.
    """
    confidence, anyway = np.asarray(confidence, dtype=np.float64), np.asarray(anyway, dtype=bool)
    wanted = round(share * len(confidence)) - int(anyway.sum())
    rest = np.sort(confidence[~anyway])
    if wanted <= 0 or len(rest) == 0:
        return 0.0
    if wanted >= len(rest):
        return float(min(1.0, np.nextafter(rest[-1], np.inf)))
    return float((rest[wanted - 1] + rest[wanted]) / 2)


def _table(scores: np.ndarray, present: np.ndarray, clip: float) -> tuple[np.ndarray, np.ndarray]:
    """Isotonic regression of presence on the score, as increasing points and clipped chances."""
    from sklearn.isotonic import IsotonicRegression

    if present.all() or not present.any():
        return _constant(present, clip)
    fitted = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(scores, present)
    x = np.round(np.asarray(fitted.X_thresholds_, dtype=np.float64), DECIMALS)
    p = np.round(np.clip(np.asarray(fitted.y_thresholds_, dtype=np.float64), clip, 1 - clip), DECIMALS)
    keep = np.concatenate([[True], np.diff(x) > 0])  # rounding may merge two points: keep the first
    x, p = x[keep], p[keep]
    # drop points on the straight line between their neighbours (same interpolation, smaller table)
    inner = np.ones(len(x), dtype=bool)
    for i in range(1, len(x) - 1):
        if p[i - 1] == p[i] == p[i + 1]:
            inner[i] = False
    return x[inner], p[inner]


def _constant(present: np.ndarray, clip: float) -> tuple[np.ndarray, np.ndarray]:
    """One point: the training prevalence (clipped), whatever the score."""
    prevalence = float(np.mean(present)) if len(present) else 0.0
    return np.zeros(1), np.array([round(min(max(prevalence, clip), 1 - clip), DECIMALS)])
