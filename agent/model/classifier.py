"""The 28 location classifiers on the device: one merged ONNX graph run by ONNX Runtime.

Input 'embedding' N x 1280 float32, output 'probabilities' N x 28. Thresholds are not
applied here but once, above, by the bundle (`Bundle.labels_for`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class OnnxClassifier:
    def __init__(self, model: bytes | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        content = model if isinstance(model, bytes) else Path(model).read_bytes()
        self.session = ort.InferenceSession(content, options, providers=["CPUExecutionProvider"])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if [i.name for i in inputs] != ["embedding"] or [o.name for o in outputs] != ["probabilities"]:
            raise ValueError("classifier graph must map 'embedding' to 'probabilities'")
        self.n_features = int(inputs[0].shape[1])
        self.n_outputs = int(outputs[0].shape[1])

    def __call__(self, embeddings: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(embeddings, dtype=np.float32)
        (probabilities,) = self.session.run(["probabilities"], {"embedding": x})
        return np.asarray(probabilities, dtype=np.float32)
