"""Classifier backend: ONNX Runtime, running the 28 forests as one merged graph.

The graph maps input 'embedding' (N x dim float32) to output 'probabilities' (N x 28). One
session with one intra-op thread: 28 separate sessions with two threads each thrashed (60 ms
against 1.2 ms, DESIGN.md).

Memory (measured with the demo bundle's 6.7 MB graph, 179,291 tree nodes in 19 tree
ensembles): building the session takes about 62 MB at its peak, of which 23 MB are freed when
it is built but stay in glibc's heap, below data still in use, where malloc gives nothing back
by itself; the heap is trimmed once the session exists (`malloc_trim`), so the agent's resident
memory holds only what the session keeps. Session options change none of it (the CPU memory
arena, memory patterns and the graph optimisation level each moved the figure by under 1.5 MB):
the memory is the TreeEnsemble kernels' and the graph's copies of the nodes' attributes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.stacks import heap

LIBRARY = "onnxruntime"


class OnnxClassifier:
    runtime = LIBRARY

    def __init__(self, model: bytes | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        source = str(model) if isinstance(model, Path) else model
        self.session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
        heap.trim()  # give back what building the session freed (see the module docstring)
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != ["embedding"] or [o.name for o in outputs] != ["probabilities"]:
            raise ValueError("classifier graph must map 'embedding' to 'probabilities'")
        self.n_features = int(inputs[0].shape[1])
        self.n_outputs = int(outputs[0].shape[1])

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        (probabilities,) = self.session.run(["probabilities"], {"embedding": x})
        return np.asarray(probabilities, dtype=np.float32)


def load(model: bytes | Path, threads: int) -> OnnxClassifier:
    """ImportError when ONNX Runtime is not installed."""
    return OnnxClassifier(model, threads)
