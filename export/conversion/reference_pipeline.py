"""The float reference `hpa-edge compare` times beside the device pipeline.

Keras EfficientNet (the backbone the model was embedded with, float32), the model's feature
recipe (`agent.model.features`, timed with the embedding as on the device) and the trained
`LocationForests` from `classifiers.pkl`, loaded once and run one stack at a time, each
forest asked on its own, as the original study's prediction code did. Pixels come from the
same `preprocess` as the device's, so only the models differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from export.conversion.make_bundle import read_model
from export.features.backbones import build


class FloatReference:
    def __init__(self, model_dir: Path, weights: str | None = None) -> None:
        trained = read_model(Path(model_dir), weights)
        self.preprocessing = trained.prep
        self.spec = trained.spec
        self.classifier = trained.classifier
        self.features = trained.features
        self.network = build(trained.spec, trained.prep.size)
        self.embed(np.zeros((trained.prep.size, trained.prep.size, 3), np.uint8))  # build the graph once

    def embed(self, image: np.ndarray) -> np.ndarray:
        """uint8 S x S x 3 -> 1 x F float32 (the recipe's vector of the embedding), one stack per call."""
        x = image[None].astype(np.float32)
        embedding = np.asarray(self.network(x, training=False), dtype=np.float32)
        return self.features(image[None], embedding)

    def classify(self, embedding: np.ndarray) -> np.ndarray:
        """1 x F -> 28 probabilities, one forest at a time (a location without a forest scores 0)."""
        return np.asarray(self.classifier.predict_proba(embedding)[0])
