"""How unlike the training data a stack's feature vector is: one number, computed the same way
on the workstation (to set the threshold) and on the device (to flag a stack for review).

The reference is fitted on the training features: their mean, the top principal directions
and the spread along each. A vector's novelty is the root mean square of its whitened
coordinates along those directions: about 1 for a typical training stack, large for an input
the forests never saw anything like (another cell line, another stain, a broken camera).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NoveltyReference:
    mean: np.ndarray  # D
    components: np.ndarray  # K x D, orthonormal rows
    scales: np.ndarray  # K, standard deviation of the training data along each component

    @classmethod
    def fit(cls, features: np.ndarray, n_components: int = 16) -> NoveltyReference:
        """From N x D training features (N > 1); components beyond the data's rank are dropped."""
        x = np.asarray(features, dtype=np.float64)
        mean = x.mean(axis=0)
        _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
        scales = singular / np.sqrt(max(len(x) - 1, 1))
        keep = min(n_components, int((scales > 1e-9 * max(scales.max(), 1e-30)).sum()))
        return cls(mean, vt[:keep], scales[:keep])

    def distance(self, features: np.ndarray) -> np.ndarray:
        """N x D -> N novelty values (see the module's docstring)."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) @ self.components.T / self.scales
        return np.sqrt((z**2).mean(axis=1))

    def arrays(self) -> dict[str, np.ndarray]:
        """What goes in the bundle's `novelty.npz`."""
        return {"mean": self.mean, "components": self.components, "scales": self.scales}
