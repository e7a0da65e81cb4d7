"""Embedder backend: LiteRT (ai-edge-litert), the device install's runtime; int8 runs on XNNPACK."""

from __future__ import annotations

import importlib

from agent.model.runtimes.interpreter import InterpreterEmbedder

LIBRARY = "ai_edge_litert.interpreter"


def load(model: bytes, threads: int) -> InterpreterEmbedder:
    """ImportError when the library is not installed (or does not load)."""
    module = importlib.import_module(LIBRARY)
    return InterpreterEmbedder(module.Interpreter, LIBRARY, model, threads)
