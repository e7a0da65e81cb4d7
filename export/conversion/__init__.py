"""From a trained model folder to what the device runs, and the checks that it still agrees.

Owns the one TFLite conversion path (and the ONNX merge of the forests), the `export`
command with its ONNX parity and fidelity gate, the quantization probe, the float reference
pipeline (Keras + scikit-learn) and `compare`, which times it beside the device pipeline.
May import everything: TensorFlow, scikit-learn, skl2onnx, onnx, every other `export`
sub-package, and `agent` (runtimes, bundle, similarity, thresholds, the bench loop).
"""
