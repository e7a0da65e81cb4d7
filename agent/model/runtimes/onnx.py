"""Classifier backend: ONNX Runtime, running the 28 forests as one merged graph.

The graph maps input 'embedding' (N x dim float32) to output 'probabilities' (N x 28). One
session with one intra-op thread: 28 separate sessions with two threads each thrashed (60 ms
against 1.2 ms, DESIGN.md).
"""

from __future__ import annotations

import numpy as np

LIBRARY = "onnxruntime"


class OnnxClassifier:
    runtime = LIBRARY

    def __init__(self, model: bytes, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != ["embedding"] or [o.name for o in outputs] != ["probabilities"]:
            raise ValueError("classifier graph must map 'embedding' to 'probabilities'")
        self.n_features = int(inputs[0].shape[1])
        self.n_outputs = int(outputs[0].shape[1])

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        (probabilities,) = self.session.run(["probabilities"], {"embedding": x})
        return np.asarray(probabilities, dtype=np.float32)


def load(model: bytes, threads: int) -> OnnxClassifier:
    """ImportError when ONNX Runtime is not installed."""
    return OnnxClassifier(model, threads)
