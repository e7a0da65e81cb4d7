"""The embedder on the device: a TFLite backbone, run by LiteRT.

Runtimes are tried in a fixed order: LiteRT (`ai_edge_litert`, the device install), then the
old `tflite_runtime` (needs numpy < 2), then TensorFlow's `tf.lite` on a workstation that has
it. Whatever runs it, the embedder takes uint8 N x S x S x 3 pixels and returns float32
N x 1280: an int8 model takes the pixels as they are, a float one gets them as float32.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import numpy as np

RUNTIMES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter", "tensorflow.lite")


class RuntimeMissingError(ImportError):
    """No TFLite runtime is installed."""


def interpreter_class() -> tuple[Any, str]:
    """The first TFLite Interpreter class that imports, and the module it came from."""
    problems = []
    for name in RUNTIMES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            problems.append(f"{name}: {exc}")
            continue
        return module.Interpreter, name
    raise RuntimeMissingError("no TFLite runtime: install ai-edge-litert (" + "; ".join(problems) + ")")


class TFLiteEmbedder:
    def __init__(self, model: bytes | Path, threads: int = 2) -> None:
        interpreter, self.runtime = interpreter_class()
        content = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.interpreter = interpreter(model_content=content, num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.size = int(self.input["shape"][1])
        self.input_dtype = np.dtype(self.input["dtype"])
        if self.input_dtype not in (np.uint8, np.float32):
            raise ValueError(f"embedder input must be uint8 or float32, not {self.input_dtype}")

    @property
    def dim(self) -> int:
        return int(self.output["shape"][-1])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x S x S x 3 -> float32 N x dim, one image per call (the model's batch is 1)."""
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (self.size, self.size, 3):
            raise ValueError(
                f"expected uint8 N x {self.size} x {self.size} x 3, got {images.dtype} {images.shape}"
            )
        out = np.empty((len(images), self.dim), np.float32)
        for i, image in enumerate(images):
            self.interpreter.set_tensor(self.input["index"], image[None].astype(self.input_dtype))
            self.interpreter.invoke()
            out[i] = self.interpreter.get_tensor(self.output["index"])[0]
        return out
