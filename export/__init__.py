"""hpa-edge workstation side: data sets, synthetic data, training, evaluation, export.

May import from `agent` (so preprocessing is one function in both places), never the reverse.
"""
