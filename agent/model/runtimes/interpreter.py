"""A TFLite model behind the `Embedder` interface, whichever package supplies the Interpreter.

LiteRT, tflite-runtime and tf.lite share one Interpreter API; the backend modules differ only
in where they import it from. An int8 model takes the uint8 pixels as they are, a float one
gets them as float32; the model's batch is 1, so images go one at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class InterpreterEmbedder:
    def __init__(self, interpreter_class: Any, runtime: str, model: bytes, threads: int) -> None:
        self.runtime = runtime
        self.interpreter = interpreter_class(model_content=model, num_threads=threads)
        self.interpreter.allocate_tensors()
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]
        self.size = int(self.input["shape"][1])
        self.dim = int(self.output["shape"][-1])
        self.input_dtype = np.dtype(self.input["dtype"])
        if self.input_dtype not in (np.uint8, np.float32):
            raise ValueError(f"embedder input must be uint8 or float32, not {self.input_dtype}")

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 N x S x S x 3 -> float32 N x dim."""
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
