"""How unlike the training data a stack's feature vector is: one number, computed the same way
on the workstation (to set the threshold) and on the device (to flag a stack for review).

The reference is fitted on the training features: their mean, the top principal directions,
the spread along each, and the typical distance of a training vector from the space those
directions span. A vector's novelty is the larger of two numbers, each about 1 for a typical
training stack: the root mean square of its whitened coordinates along the directions, and
its distance from their space over the training vectors' typical distance. It is large for
an input the forests never saw anything like (another cell line, another stain, a broken
camera).

The distance from the space matters most. Measured with a reference fitted on the demo's
1,500 synthetic stacks (16 components, threshold at the 99.5th percentile of out-of-fold
training novelty): the coordinates alone flag 7% of the 101 real HPA stacks as unlike the
training data, their root mean square with the distance 14%, the larger of the two 100%,
while flagging 2% of 200 held-out synthetic stacks (docs/training.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NoveltyReference:
    mean: np.ndarray  # D
    components: np.ndarray  # K x D, orthonormal rows
    scales: np.ndarray  # K, standard deviation of the training data along each component
    residual_scale: float | None = None  # RMS distance of training vectors from the components' space

    @classmethod
    def fit(cls, features: np.ndarray, n_components: int = 16) -> NoveltyReference:
        """From N x D training features (N > 1); components beyond the data's rank are dropped."""
        x = np.asarray(features, dtype=np.float64)
        mean = x.mean(axis=0)
        _, singular, vt = np.linalg.svd(x - mean, full_matrices=False)
        scales = singular / np.sqrt(max(len(x) - 1, 1))
        keep = min(n_components, int((scales > 1e-9 * max(scales.max(), 1e-30)).sum()))
        reference = cls(mean, vt[:keep], scales[:keep])
        residual = float(np.sqrt(np.mean(reference._residuals(x) ** 2)))
        return cls(mean, vt[:keep], scales[:keep], residual if residual > 1e-9 else None)

    @property
    def method(self) -> str:
        """The name the bundle manifest records for how `distance` is computed."""
        return "pca-whitened-rms" if self.residual_scale is None else "pca-whitened-rms-or-residual"

    def distance(self, features: np.ndarray) -> np.ndarray:
        """N x D -> N novelty values (see the module's docstring)."""
        x = np.asarray(features, dtype=np.float64)
        z = (x - self.mean) @ self.components.T / self.scales
        along = np.sqrt((z**2).mean(axis=1))
        if self.residual_scale is None:
            return along
        return np.maximum(along, self._residuals(x) / self.residual_scale)

    def _residuals(self, x: np.ndarray) -> np.ndarray:
        centred = x - self.mean
        return np.linalg.norm(centred - (centred @ self.components.T) @ self.components, axis=1)

    def arrays(self) -> dict[str, np.ndarray]:
        """What goes in the bundle's `novelty.npz` (`residual_scale` only when there is one)."""
        arrays = {"mean": self.mean, "components": self.components, "scales": self.scales}
        if self.residual_scale is not None:
            arrays["residual_scale"] = np.asarray(self.residual_scale)
        return arrays
