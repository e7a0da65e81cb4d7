"""Labelled data sets: reading label files and stacks, making synthetic ones, stratified splits.

Owns what a data set is (ids, labels, channel files), the synthetic cell painter and the
multilabel-stratified folds every training and evaluation path shares. Imports numpy,
OpenCV, `agent.stacks` (the device's own stack reader) and `export.reports`; no
TensorFlow or scikit-learn, so `hpa-edge synth` runs on the core install.
"""
