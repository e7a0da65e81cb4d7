"""Embedder backend: tflite-runtime 2.14, for old devices (numpy < 2).

Its int8 kernels are not XNNPACK's, so int8 scores differ slightly from LiteRT's (docs/).
"""

from __future__ import annotations

import importlib

from agent.model.runtimes.interpreter import InterpreterEmbedder

LIBRARY = "tflite_runtime.interpreter"


def load(model: bytes, threads: int) -> InterpreterEmbedder:
    """ImportError when the library is not installed (or does not load)."""
    module = importlib.import_module(LIBRARY)
    return InterpreterEmbedder(module.Interpreter, LIBRARY, model, threads)
