"""From embeddings to a classifier, honestly measured: the estimator, metrics, evaluation.

Owns `LocationForests` (the 28 forests with their out-of-fold thresholds as one
scikit-learn-style estimator), the one out-of-fold loop, macro F1 and its intervals, the
`train`, `baseline` and `auc` commands and the model folder they write. Imports
scikit-learn, `agent.model.thresholds` (the one place a threshold is applied),
`agent.stacks`, `export.data`, `export.features` and `export.reports`; never
`export.conversion`.
"""
