"""The inference runtimes, one short module per backend, in the manner of Frigate's detectors.

Two small interfaces: an `Embedder` takes uint8 N x S x S x 3 pixels and returns float32
N x dim; a `Classifier` takes float32 N x dim and returns float32 N x 28 probabilities.
Every backend returns exactly those arrays, so what sits above (the bundle, thresholds, the
pipeline) never knows which one ran. The tables below choose them: the first backend whose
library imports wins (LiteRT on a device; tflite-runtime on an old one; TensorFlow's tf.lite
on a workstation that has it). Thresholds are not applied here (see `agent.model.thresholds`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Embedder(Protocol):
    runtime: str  # the module that runs it, for logs and `verify`
    size: int  # input side in pixels
    dim: int  # embedding length
    input_dtype: np.dtype[Any]  # uint8 (an int8 model takes raw pixels) or float32

    def __call__(self, images: np.ndarray) -> np.ndarray: ...


class Classifier(Protocol):
    runtime: str
    n_features: int
    n_outputs: int

    def __call__(self, embeddings: np.ndarray) -> np.ndarray: ...


class RuntimeMissingError(ImportError):
    """No backend of a table could be imported."""


# Tried in this order; each module offers `load(model, threads: int)` (model: bytes for an
# embedder, bytes or a file's Path for a classifier).
EMBEDDERS: tuple[str, ...] = (
    "agent.model.runtimes.litert",
    "agent.model.runtimes.tflite_runtime",
    "agent.model.runtimes.tf_lite",
)
CLASSIFIERS: tuple[str, ...] = ("agent.model.runtimes.onnx",)


def load_embedder(model: bytes | Path, threads: int = 2) -> Embedder:
    embedder: Embedder = _load(EMBEDDERS, "TFLite runtime: install ai-edge-litert", _bytes(model), threads)
    return embedder


def load_classifier(model: bytes | Path, threads: int = 1) -> Classifier:
    """A file is handed to the backend as a path: ONNX Runtime reads it itself, so no Python copy
    of the model sits beside its own while the session is built (6.6 MB less at the agent's
    peak with the demo bundle's 6.7 MB file)."""
    classifier: Classifier = _load(CLASSIFIERS, "ONNX runtime: install onnxruntime", model, threads)
    return classifier


def embedder_runtime() -> str:
    """The library `load_embedder` would use here (RuntimeMissingError when there is none)."""
    problems = []
    for name in EMBEDDERS:
        library = importlib.import_module(name).LIBRARY
        try:
            importlib.import_module(library)
        except ImportError as exc:
            problems.append(f"{library}: {exc}")
            continue
        return str(library)
    raise RuntimeMissingError(f"no TFLite runtime: install ai-edge-litert ({'; '.join(problems)})")


def _load(table: tuple[str, ...], what: str, model: bytes | Path, threads: int) -> Any:
    """The first backend whose library imports loads the model."""
    problems = []
    for name in table:
        backend = importlib.import_module(name)
        try:
            return backend.load(model, threads)
        except ImportError as exc:
            problems.append(f"{backend.LIBRARY}: {exc}")
    raise RuntimeMissingError(f"no {what} ({'; '.join(problems)})")


def _bytes(model: bytes | Path) -> bytes:
    return model if isinstance(model, bytes) else Path(model).read_bytes()
