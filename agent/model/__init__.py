"""The model: a verified bundle, the runtimes that run it, and what it says about one stack.

Owns the bundle (manifest, hashes, golden vectors: `bundle`), the inference backends
(`runtimes/`, one module per runtime behind two small interfaces), the one place a threshold
is applied with the margins around it (`thresholds`), embedding similarity (`similarity`),
novelty against the training data (`novelty`), the per-stack review flag (`review`), the
analysis of one stack from its files to a result or an error (`pipeline`) and the documents
that carry them (`messages` and `messages.schema.json`). May import `agent.stacks`, numpy and
the runtimes; never the service, the tools, TensorFlow or scikit-learn (tf.lite is a lazy
last resort).
"""
