"""From pixels to embeddings: the Keras backbones, their weights files, the embedding cache.

Owns which network turns a preprocessed stack into a vector, where its weights come from
(including the legacy torch file read without torch) and the cache that stores the vectors
keyed by backbone and preprocessing. Imports TensorFlow/Keras (lazily), `agent.stacks`,
`export.data` and `export.reports`; not `export.training` or `export.conversion`.
"""
