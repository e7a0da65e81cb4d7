"""hpa-edge workstation side: from a labelled data set to a verified model bundle.

Sub-packages by job, each importing only those before it in this list (so a data-set tool
never drags in TensorFlow, and training never needs the converter):
`reports` (progress lines, evaluation charts and summaries), `data` (labels, stacks,
synthetic data, stratified splits), `features` (backbones and the embedding cache),
`training` (the location estimator, metrics, evaluation, baselines), `conversion` (TFLite and
ONNX, the export command with its fidelity gate, the float reference). `reference` holds the
biologists' figures as package data. Any of them may import from `agent` (so preprocessing
is one function in both places); `agent` never imports from here.
"""
