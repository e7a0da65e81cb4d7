"""Whether a lab should look at a stack itself, and why: the per-stack review flag.

Reasons, each a short code a dashboard can filter on:
- `near_threshold`: a predicted or a near-miss location lies within its margin of the
  threshold (margins calibrated out of fold at training time, in the bundle);
- `no_label`: nothing was predicted, although every stack shows its protein somewhere;
- `novel_input`: the stack's feature vector is unlike the training data (`novelty`);
- `uncertain_set`: the bundle's set-risk model (`SetRisk`) puts the chance that the label
  set is wrong above its cut; a bundle without one: the chance that the whole label set is
  right (`SetCalibration`) is below the bundle's cut;
- the image-quality codes of `agent.stacks.quality.assess` (empty field, saturated, ...).
A bundle without margins, novelty reference, set calibration or quality reference simply
gives no reasons of that kind; nothing here guesses values the bundle does not carry.

With a set calibration, `near_threshold` no longer raises the flag on its own: it is given
beside `uncertain_set`, as the explanation of a flagged stack (the locations near their
threshold are reported in `Review.near` either way). On the demo's synthetic stacks, about
two thirds of label sets are wrong; margins flagged 39% of held-out stacks, wrong 80-86% of
the time against 52-56% of the rest, while the set confidence flagged 33-36%, wrong 93-94% of
the time (export/training/flagging.py has the figures). Both together flagged nearly half.

The set confidence treats the 28 decisions as independent, and most wrong sets it leaves
unflagged miss a second location that no single score betrays. The set-risk model (trees
fitted out of fold on the 28 scores, the log set confidence and the label count, shipped as
ONNX like the forests) learns which combinations of scores tend to hide one: on 3,000 unseen
synthetic stacks, flagging 37% of them, flagged stacks were wrong 2.18 times as often as the
rest, against 2.06 for the set confidence at the same share (docs/training.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.model import thresholds as threshold_rule
from agent.model.novelty import NoveltyReference
from agent.stacks.labels import LOCATIONS

SET_CONFIDENCE_METHOD = "calibrated-product"  # the manifest's set_confidence.method
SET_CONFIDENCE_VERSION = 1
SET_RISK_METHOD = "extra-trees"  # the manifest's set_risk.method
SET_RISK_VERSION = 1
SET_RISK_INPUTS = len(LOCATIONS) + 2  # the 28 scores, the log set confidence, the label count
_LEAST_CONFIDENCE = 1e-12  # the log of a set confidence of 0 (a decision's chance is clipped)


@dataclass(frozen=True)
class SetCalibration:
    """How likely a stack's whole label set is right, from its 28 scores (`set_confidence` entry).

    Per location a calibration table, fitted out of fold on the training stacks
    (`export.training.flagging.SetConfidence`): increasing scores and the share of training
    stacks with such a score that hold the location, linearly interpolated between the points
    and constant beyond the ends (one point: a constant, for a location never predicted). A
    location's decision is right with probability p if it was labelled, 1 - p if not; the set
    is right with the product over the 28 locations (as if they were independent: a ranking,
    not an exact probability). A stack whose product is below `cut` is flagged `uncertain_set`.
    """

    scores: tuple[np.ndarray, ...]  # per location, increasing score points
    probabilities: tuple[np.ndarray, ...]  # per location, P(location present) at those points, in (0, 1)
    cut: float  # flag a stack whose set confidence is below this

    def __post_init__(self) -> None:
        if len(self.scores) != len(self.probabilities):
            raise ValueError(f"{len(self.scores)} score tables, {len(self.probabilities)} probability tables")
        for j, (x, p) in enumerate(zip(self.scores, self.probabilities, strict=True)):
            if x.ndim != 1 or x.shape != p.shape or len(x) == 0:
                raise ValueError(f"location {j}: need as many probabilities as scores, at least one")
            if np.any(np.diff(x) <= 0):
                raise ValueError(f"location {j}: scores must increase")
            if not (np.all(p > 0) and np.all(p < 1)):
                raise ValueError(f"location {j}: probabilities must lie strictly between 0 and 1")
        if not 0 <= self.cut <= 1:
            raise ValueError(f"cut must be 0..1, not {self.cut}")

    def present(self, probabilities: np.ndarray) -> np.ndarray:
        """L scores -> L calibrated probabilities that each location is present."""
        scores = np.asarray(probabilities, dtype=np.float64)
        if scores.shape != (len(self.scores),):
            raise ValueError(f"expected {len(self.scores)} scores, got shape {scores.shape}")
        return np.array(
            [np.interp(s, x, p) for s, x, p in zip(scores, self.scores, self.probabilities, strict=True)]
        )

    def confidence(self, probabilities: np.ndarray, labels: np.ndarray) -> float:
        """The chance that the label set is right: the product of each decision's chance."""
        present = self.present(probabilities)
        right = np.where(np.asarray(labels, dtype=bool), present, 1.0 - present)
        return float(math.exp(float(np.log(right).sum())))


def read_set_calibration(entry: Mapping[str, Any], names: Sequence[str] = LOCATIONS) -> SetCalibration:
    """The manifest's `set_confidence` entry (`SetConfidence.manifest_entry`) -> SetCalibration.

    ValueError (naming what is wrong) when it is malformed, of another method or version, or
    not for these locations in this order.
    """
    try:
        if entry.get("method") != SET_CONFIDENCE_METHOD:
            raise ValueError(f"method {entry.get('method')!r} is not {SET_CONFIDENCE_METHOD!r}")
        if entry.get("version") != SET_CONFIDENCE_VERSION:
            raise ValueError(f"version {entry.get('version')!r} is not {SET_CONFIDENCE_VERSION}")
        tables = entry["locations"]
        if [table.get("name") for table in tables] != list(names):
            raise ValueError("locations are not the bundle's locations in their order")
        return SetCalibration(
            tuple(np.asarray(table["scores"], dtype=np.float64) for table in tables),
            tuple(np.asarray(table["probabilities"], dtype=np.float64) for table in tables),
            float(entry["cut"]),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed set_confidence entry: {exc!r}") from None


def risk_inputs(probabilities: np.ndarray, labels: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """What the set-risk model reads, N x 30 float32: each stack's 28 scores, the log of its
    set confidence and its number of labels. One definition for fitting and for the device."""
    scores = np.atleast_2d(np.asarray(probabilities, dtype=np.float32))
    count = np.atleast_2d(np.asarray(labels, dtype=bool)).sum(axis=1)
    log_confidence = np.log(
        np.maximum(np.atleast_1d(np.asarray(confidence, dtype=np.float64)), _LEAST_CONFIDENCE)
    )
    inputs: np.ndarray = np.column_stack([scores, log_confidence, count]).astype(np.float32)
    return inputs


@dataclass(frozen=True)
class SetRisk:
    """The chance that a stack's label set is wrong, from `risk_inputs` (`set_risk` entry and file).

    `model` maps N x 30 inputs to N x 1 chances (the ONNX graph in the bundle, run by ONNX
    Runtime); a stack whose chance is above `cut` is flagged `uncertain_set`. Fitted by
    `export.training.flagging.SetRiskModel`.
    """

    model: Callable[[np.ndarray], np.ndarray]
    cut: float

    def __post_init__(self) -> None:
        if not 0 <= self.cut <= 1:
            raise ValueError(f"cut must be 0..1, not {self.cut}")

    def risk(self, probabilities: np.ndarray, labels: np.ndarray, confidence: float) -> float:
        return float(np.asarray(self.model(risk_inputs(probabilities, labels, np.array([confidence]))))[0, 0])


def read_set_risk(entry: Mapping[str, Any], model: Callable[[np.ndarray], np.ndarray]) -> SetRisk:
    """The manifest's `set_risk` entry (`SetRiskModel.manifest_entry`) and its loaded graph -> SetRisk.

    ValueError (naming what is wrong) when the entry is malformed or of another method, version
    or inputs.
    """
    try:
        if entry.get("method") != SET_RISK_METHOD:
            raise ValueError(f"method {entry.get('method')!r} is not {SET_RISK_METHOD!r}")
        if entry.get("version") != SET_RISK_VERSION:
            raise ValueError(f"version {entry.get('version')!r} is not {SET_RISK_VERSION}")
        if entry.get("inputs") != SET_RISK_INPUTS:
            raise ValueError(f"inputs {entry.get('inputs')!r} is not {SET_RISK_INPUTS}")
        return SetRisk(model, float(entry["cut"]))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed set_risk entry: {exc!r}") from None


@dataclass(frozen=True)
class Trust:
    """What a bundle knows about how far to trust its answers (all optional in the manifest)."""

    margins: np.ndarray = field(default_factory=lambda: np.zeros(len(LOCATIONS)))
    available: np.ndarray = field(default_factory=lambda: np.ones(len(LOCATIONS), dtype=bool))
    novelty: NoveltyReference | None = None
    novelty_threshold: float | None = None
    quality: dict[str, Any] | None = None  # reference ranges for agent.stacks.quality.assess
    set_calibration: SetCalibration | None = None  # the manifest's set_confidence entry
    set_risk: SetRisk | None = None  # the manifest's set_risk entry and file (needs set_calibration)

    @property
    def unavailable(self) -> list[str]:
        """Locations this bundle never predicts (too few training positives, or no evidence)."""
        return [name for name, ok in zip(LOCATIONS, self.available, strict=True) if not ok]


@dataclass(frozen=True)
class Review:
    near: list[str]  # locations within their margin of the threshold
    novelty: float | None
    reasons: list[str]
    set_confidence: float | None = None  # chance that the label set is right (with a set calibration)
    set_risk: float | None = None  # chance that the label set is wrong (with a set-risk model)

    @property
    def flagged(self) -> bool:
        return bool(self.reasons)


def review(
    probabilities: np.ndarray,
    labels: np.ndarray,
    thresholds: np.ndarray,
    trust: Trust,
    features: np.ndarray | None,
    quality_reasons: Sequence[str] = (),
) -> Review:
    """The review verdict of one stack: 28 probabilities and labels, its feature vector."""
    close = threshold_rule.near(probabilities, thresholds, trust.margins) & trust.available
    near = [name for name, on in zip(LOCATIONS, close, strict=True) if on]
    novelty = None
    if trust.novelty is not None and features is not None:
        novelty = float(trust.novelty.distance(np.asarray(features)[None])[0])
    reasons = []
    confidence, risk = None, None
    if trust.set_calibration is None:
        if near:
            reasons.append("near_threshold")
    else:
        confidence = trust.set_calibration.confidence(probabilities, labels)
        if trust.set_risk is not None:
            risk = trust.set_risk.risk(probabilities, labels, confidence)
            uncertain = risk > trust.set_risk.cut
        else:
            uncertain = confidence < trust.set_calibration.cut
        if uncertain:
            reasons.append("uncertain_set")
            if near:
                reasons.append("near_threshold")
    if not np.asarray(labels).any():
        reasons.append("no_label")
    if novelty is not None and trust.novelty_threshold is not None and novelty > trust.novelty_threshold:
        reasons.append("novel_input")
    reasons.extend(quality_reasons)
    return Review(near, novelty, reasons, confidence, risk)
