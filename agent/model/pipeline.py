"""One stack from its files to what the agent will say about it: a result or an error.

decode, image-quality figures and preprocess, channel by channel, two at once
(`agent.stacks.stack.read_reduced`, with `quality` and `preprocess`) -> embed, the bundle's
feature recipe (`agent.model.features`) and classify (the bundle's runtimes) -> thresholds
(`Bundle.labels_for`) -> the review flag (`review`) -> the document (`messages`).
Nothing here writes to disk or the network, and nothing here decides where files go: it
returns an `Analysis` that the service records and then acts on, so the same code serves the
agent, `hpa-edge predict` and the benchmark. `prepare` (decode and preprocess: OpenCV and
numpy, which release the GIL) and `infer` are separate so the agent can decode the next
stack on one core while the models run on the other. A stack holds at most one
full-resolution channel per reading thread, and the reading threads share a memory budget
(`agent.stacks.budget`): a big channel is decoded alone.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.model import messages, thumbnail
from agent.model.bundle import Bundle
from agent.model.review import review
from agent.stacks import quality
from agent.stacks.budget import DEFAULT_BUDGET, Budget
from agent.stacks.digest import file_sha256, stack_fingerprint
from agent.stacks.errors import StackError
from agent.stacks.image import Limits
from agent.stacks.pools import pool
from agent.stacks.preprocess import Preprocessing
from agent.stacks.stack import Reduced, read_reduced

KINDS = ("result", "failed", "quarantined")


@dataclass(frozen=True)
class Analysis:
    """What the agent says about one stack content with one bundle."""

    stack_id: str
    kind: str  # result | failed (unreadable) | quarantined (incomplete)
    files_sha256: str  # the stack fingerprint (`agent.stacks.digest.stack_fingerprint`)
    document: dict[str, Any]  # the result or error document
    paths: Mapping[str, Path]
    started: float  # time.perf_counter() when analysis began
    thumbnail: bytes | None = None  # a small picture published beside a result (`thumbnail`)

    @property
    def msg_id(self) -> str:
        return str(self.document["msg_id"])


@dataclass(frozen=True)
class Prepared:
    """A decoded, preprocessed stack waiting for the models (no full-resolution pixels)."""

    stack: Reduced  # stack_id, paths and sha256 of its files
    image: np.ndarray
    started: float
    decoded: float
    prepared: float
    quality: dict[str, float]  # image-quality figures of the decoded channels


class Pipeline:
    def __init__(
        self,
        bundle: Bundle,
        instrument: str,
        limits: Limits = Limits(),
        bits: int = 0,
        decode_budget: int = DEFAULT_BUDGET,
        thumbnail_size: int = 0,
    ) -> None:
        self.bundle = bundle
        self.thumbnail_size = thumbnail_size  # 0: no thumbnails
        self.instrument = instrument
        self.limits = limits
        self.camera_bits = bits or None  # the camera's bit depth for 16-bit files, when configured
        prep = bundle.preprocessing
        if bits and prep.bit_depth.mode == "bits":
            prep = dataclasses.replace(prep, bit_depth=dataclasses.replace(prep.bit_depth, bits=bits))
        self.preprocessing: Preprocessing = prep
        self.bundle_info = {"id": bundle.id, "sha256": bundle.sha256, "purpose": bundle.purpose}
        self.budget = Budget(decode_budget)  # shared by every thread that calls `prepare`

    def analyse(self, stack_id: str, paths: Mapping[str, Path]) -> Analysis:
        """Read and classify one complete stack; any StackError becomes a `failed` analysis."""
        ready = self.prepare(stack_id, paths)
        return ready if isinstance(ready, Analysis) else self.infer(ready)

    def prepare(self, stack_id: str, paths: Mapping[str, Path]) -> Prepared | Analysis:
        """Decode and preprocess; a file that cannot be read gives the `failed` analysis."""
        started = time.perf_counter()
        try:
            for path in paths.values():
                if Path(path).is_symlink():
                    raise StackError(
                        "symlink", "is a symbolic link; the agent reads only regular files", path
                    )
            stack = read_reduced(
                stack_id, paths, self.preprocessing, self.limits, self.camera_bits, self.budget
            )
        except StackError as exc:
            return self.failure(stack_id, paths, exc, started=started)
        decoded = started + stack.decode_seconds  # the rest of the time went to reducing
        return Prepared(stack, stack.image, started, decoded, time.perf_counter(), stack.quality)

    def infer(self, ready: Prepared) -> Analysis:
        """Embed, classify, apply the thresholds and write the result document."""
        stack, started, decoded, prepared = ready.stack, ready.started, ready.decoded, ready.prepared
        stack_id = stack.stack_id
        images = ready.image[None]
        # The thumbnail is made on a thread of its own meanwhile (it needs only the image).
        drawing = pool("thumbnail", 1).submit(self._thumbnail, ready.image) if self.thumbnail_size else None
        # The bundle's feature recipe (`agent.model.features`) turns the embedding into the
        # classifiers' input; its time counts as embedding. Its values of the image alone are
        # computed on another thread while the embedder runs (both release the GIL).
        # A recipe of the image alone leaves the embedder out (its output would go unused; the
        # golden check at start still runs it).
        recipe = self.bundle.features
        if not recipe.embedding:
            embedding = self.bundle.feature_vectors(images, recipe.embeddings(self.bundle.embedder, images))
        else:
            beside = (
                pool("recipe", 1).submit(recipe.image_part, images) if recipe.per_image is not None else None
            )
            embeddings = self.bundle.embedder(images)
            image_part = None if beside is None else beside.result()
            embedding = self.bundle.feature_vectors(images, embeddings, image_part)
        embedded = time.perf_counter()
        probabilities = self.bundle.classifier(embedding)[0]
        labels = self.bundle.labels_for(probabilities[None])[0]
        trust = self.bundle.trust
        verdict = review(
            probabilities,
            labels,
            self.bundle.thresholds,
            trust,
            embedding[0],
            quality.assess(ready.quality, trust.quality),
        )
        done = time.perf_counter()
        fingerprint = stack_fingerprint(stack.sha256)
        document = messages.result_document(
            msg_id=messages.msg_id(self.instrument, stack_id, fingerprint, self.bundle.sha256),
            instrument=self.instrument,
            stack_id=stack_id,
            files=messages.files_entry({c: p.name for c, p in stack.paths.items()}, stack.sha256),
            probabilities=[float(p) for p in probabilities],
            labels=[bool(x) for x in np.asarray(labels)],
            bundle=self.bundle_info,
            timings_ms={
                "decode": (decoded - started) * 1e3,
                "preprocess": (prepared - decoded) * 1e3,
                "embed": (embedded - prepared) * 1e3,
                "classify": (done - embedded) * 1e3,
                "total": (done - started) * 1e3,
            },
            trust={
                "review": verdict.flagged,
                "review_reasons": verdict.reasons,
                "near_threshold": verdict.near,
                "novelty": None if verdict.novelty is None else round(verdict.novelty, 4),
                "set_confidence": (
                    None if verdict.set_confidence is None else round(verdict.set_confidence, 4)
                ),
                "set_risk": None if verdict.set_risk is None else round(verdict.set_risk, 4),
                "unavailable": trust.unavailable,
                **{f"quality_{name}": round(float(value), 6) for name, value in ready.quality.items()},
            },
        )
        picture = None
        if drawing is not None:
            made, ms = drawing.result()
            document["thumbnail"] = {**made.entry(), "ms": round(ms, 3)}
            picture = made.data
        return Analysis(stack_id, "result", fingerprint, document, dict(stack.paths), started, picture)

    def _thumbnail(self, image: np.ndarray) -> tuple[thumbnail.Thumbnail, float]:
        began = time.perf_counter()
        made = thumbnail.make(image, self.thumbnail_size)
        return made, (time.perf_counter() - began) * 1e3

    def failure(
        self,
        stack_id: str,
        paths: Mapping[str, Path],
        error: StackError,
        kind: str = "failed",
        started: float | None = None,
    ) -> Analysis:
        """The error analysis of a stack: `failed` (unreadable) or `quarantined` (incomplete)."""
        if kind not in KINDS[1:]:
            raise ValueError(f"an error is failed or quarantined, not {kind!r}")
        sha256 = {channel: _hash_or_blank(Path(path)) for channel, path in paths.items()}
        fingerprint = stack_fingerprint(sha256)
        document = messages.error_document(
            msg_id=messages.msg_id(self.instrument, stack_id, fingerprint, self.bundle.sha256, kind="error"),
            instrument=self.instrument,
            stack_id=stack_id,
            code=error.code,
            message=str(error),
            files=messages.files_entry({c: Path(p).name for c, p in paths.items()}, sha256),
        )
        return Analysis(stack_id, kind, fingerprint, document, dict(paths), started or time.perf_counter())


def _hash_or_blank(path: Path) -> str:
    try:
        return "" if path.is_symlink() else file_sha256(path)
    except OSError:
        return ""
