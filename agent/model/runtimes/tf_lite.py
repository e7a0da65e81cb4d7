"""Embedder backend: TensorFlow's tf.lite, on a workstation that has it; never in a device install.

The interpreter is reached as `tensorflow.lite.Interpreter` after importing TensorFlow: the
submodule imported on its own (`importlib.import_module("tensorflow.lite")`) lacks it.
"""

from __future__ import annotations

import importlib

from agent.model.runtimes.interpreter import InterpreterEmbedder

LIBRARY = "tensorflow"


def load(model: bytes, threads: int) -> InterpreterEmbedder:
    """ImportError when TensorFlow is not installed."""
    tensorflow = importlib.import_module(LIBRARY)
    return InterpreterEmbedder(tensorflow.lite.Interpreter, "tensorflow.lite", model, threads)
