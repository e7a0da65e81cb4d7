"""Whether a lab should look at a stack itself, and why: the per-stack review flag.

Reasons, each a short code a dashboard can filter on:
- `near_threshold`: a predicted or a near-miss location lies within its margin of the
  threshold (margins calibrated out of fold at training time, in the bundle);
- `no_label`: nothing was predicted, although every stack shows its protein somewhere;
- `novel_input`: the stack's feature vector is unlike the training data (`novelty`);
- the image-quality codes of `agent.stacks.quality.assess` (empty field, saturated, ...).
A bundle without margins, novelty reference or quality reference simply gives no reasons
of that kind; nothing here guesses values the bundle does not carry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.model import thresholds as threshold_rule
from agent.model.novelty import NoveltyReference
from agent.stacks.labels import LOCATIONS


@dataclass(frozen=True)
class Trust:
    """What a bundle knows about how far to trust its answers (all optional in the manifest)."""

    margins: np.ndarray = field(default_factory=lambda: np.zeros(len(LOCATIONS)))
    available: np.ndarray = field(default_factory=lambda: np.ones(len(LOCATIONS), dtype=bool))
    novelty: NoveltyReference | None = None
    novelty_threshold: float | None = None
    quality: dict[str, Any] | None = None  # reference ranges for agent.stacks.quality.assess

    @property
    def unavailable(self) -> list[str]:
        """Locations this bundle never predicts (too few training positives, or no evidence)."""
        return [name for name, ok in zip(LOCATIONS, self.available, strict=True) if not ok]


@dataclass(frozen=True)
class Review:
    near: list[str]  # locations within their margin of the threshold
    novelty: float | None
    reasons: list[str]

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
    if near:
        reasons.append("near_threshold")
    if not np.asarray(labels).any():
        reasons.append("no_label")
    if novelty is not None and trust.novelty_threshold is not None and novelty > trust.novelty_threshold:
        reasons.append("novel_input")
    reasons.extend(quality_reasons)
    return Review(near, novelty, reasons)
