"""Feature recipes: what the 28 forests are given, computed by one function on both sides.

A recipe turns a batch of preprocessed stacks (uint8 N x S x S x 3, the output of
`agent.stacks.preprocess`) and the embedder's output for them (float32 N x dim) into the
float32 N x F matrix the classifiers take. The device (`agent.model.pipeline`), the bundle's
golden check and the workstation (`hpa-edge embed`, `hpa-edge features-compare`) call the same
`Recipe.__call__`, so training and inference cannot drift apart.

A bundle's manifest records its recipe as

    "features": {"name": ..., "version": ..., "params": {...}, "layout": [...]}

where `layout` lists the parts of the vector in order (name, start, length, what they are).
The agent refuses a bundle whose recipe name and version it does not know, or whose params or
layout differ from what this code computes for them (`from_manifest`). A manifest without a
`features` entry is an older bundle: recipe `lite0-gap` version 1, the embedding as it is.

Registered recipes (a change to what one computes needs a new version, never an edit):
- `lite0-gap` v1: the embedder's output (EfficientNet-Lite0, global average pool of the last
  feature map, 1280 values). Today's default.
- `hand-rgb` v1: 44 hand-made numbers describing where the green protein (input slot 1) sits
  relative to the nucleus (slot 2, blue) and the cell (slots 0 + 2), computed from the
  preprocessed image with OpenCV and numpy (no backbone output needed; p50 5.9 ms per stack
  at 224 px on the shared 2-core test machine, over the issue's 3 ms budget: not yet tuned).
  The kind of `export/training/baseline.py`'s 45 features, without the yellow channel (the
  device's image holds the three input slots only).
- `lite0-gap+hand-rgb` v1: the two above, concatenated (embedding first).

`nucleus_mask` and `region_pool` (a feature map averaged inside, outside a mask and their
difference) are the building blocks of region-pooled backbone features; they are measured by
`hpa-edge features-compare` and become a recipe once the embedder exports its feature maps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

DEFAULT_NAME = "lite0-gap"
DEFAULT_VERSION = 1
# What the hand recipe needs from the preprocessing: these channels, alone, in these slots.
HAND_SLOTS: dict[str, int] = {"red": 0, "green": 1, "blue": 2}


class FeatureError(ValueError):
    """A recipe is unknown, or its manifest entry does not match what this agent computes."""


# ------------------------------------------------------------------ building blocks (numpy + OpenCV)


def otsu(image: np.ndarray) -> np.ndarray:
    """Boolean foreground of a float image in 0..1 by Otsu's threshold."""
    eight = np.clip(image * 255, 0, 255).astype(np.uint8)
    _, mask = cv2.threshold(eight, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return mask.astype(bool)


def nucleus_mask(blue: np.ndarray, blur: float = 2.0) -> np.ndarray:
    """Nuclei: Otsu's threshold on the blurred nucleus channel (uint8 or float 0..1)."""
    plane = blue.astype(np.float32) / 255 if blue.dtype == np.uint8 else blue.astype(np.float32)
    return otsu(cv2.GaussianBlur(plane, (0, 0), blur))


def region_pool(maps: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A feature map (H x W x C) averaged inside and outside a mask, and the difference: 3C values.

    The mask (any resolution, boolean or fractional) is area-resized to H x W, so each map cell
    weighs by the fraction of it inside. An empty region averages to zeros.
    """
    h, w = maps.shape[:2]
    weight = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    flat = maps.reshape(h * w, -1).astype(np.float64)
    parts = []
    for share in (weight.ravel(), 1.0 - weight.ravel()):
        total = float(share.sum())
        parts.append(share @ flat / total if total > 1e-6 else np.zeros(flat.shape[1]))
    inside, outside = parts
    return np.concatenate([inside, outside, inside - outside]).astype(np.float32)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


HAND_REGIONS = ("nucleus", "cytoplasm", "nuclear_rim", "cell_rim", "background")
HAND_PARAMS: dict[str, Any] = {
    "slots": HAND_SLOTS,
    "nucleus_blur": 2.0,
    "cell_blur": 3.0,
    "rim_kernel": 5,
    "bright_sigmas": 2.0,
    "dog_sigmas": [0.8, 1.5, 3.0, 6.0],
    "dog_ratio": 1.6,
    "dog_level": 0.02,
    "percentiles": [50, 90, 99, 99.9],
}


def hand_layout(params: Mapping[str, Any]) -> list[tuple[str, int, str]]:
    """The hand vector's parts in order: (name, length, what)."""
    regions = ", ".join(HAND_REGIONS)
    return [
        (
            "region_green",
            4 * len(HAND_REGIONS),
            f"per region ({regions}): green mean, green std, share of all green, share of bright pixels",
        ),
        ("colocalisation", 2, "Pearson correlation of green with red, then blue, inside the cell"),
        (
            "blobs",
            4 * len(params["dog_sigmas"]),
            "per difference-of-Gaussians sigma, in nucleus then cytoplasm: 99th percentile, "
            "fraction above dog_level",
        ),
        ("green_percentiles", len(params["percentiles"]), "percentiles of green over the image"),
        ("areas", 2, "fraction of the image in nuclei, in cells"),
    ]


def hand_features(image: np.ndarray, params: Mapping[str, Any] = HAND_PARAMS) -> np.ndarray:
    """44 numbers (see `hand_layout`) for one preprocessed stack, uint8 S x S x 3."""
    slots = params["slots"]
    plane = {c: image[..., slots[c]].astype(np.float32) / 255 for c in ("red", "green", "blue")}
    green, blue, red = plane["green"], plane["blue"], plane["red"]
    nucleus = otsu(cv2.GaussianBlur(blue, (0, 0), float(params["nucleus_blur"])))
    cell = otsu(cv2.GaussianBlur(red + blue, (0, 0), float(params["cell_blur"]))) | nucleus
    cytoplasm = cell & ~nucleus
    k = int(params["rim_kernel"])
    kernel = np.ones((k, k), np.uint8)
    n8, c8 = nucleus.astype(np.uint8), cell.astype(np.uint8)
    nuclear_rim = cv2.dilate(n8, kernel).astype(bool) & ~cv2.erode(n8, kernel).astype(bool)
    cell_rim = cell & ~cv2.erode(c8, kernel).astype(bool)
    regions = (nucleus, cytoplasm, nuclear_rim, cell_rim, ~cell)
    total = float(green.sum()) + 1e-6
    high = green > green.mean() + float(params["bright_sigmas"]) * green.std()
    values: list[float] = []
    for mask in regions:
        inside = green[mask] if mask.any() else np.zeros(1, np.float32)
        values += [
            float(inside.mean()),
            float(inside.std()),
            float(green[mask].sum()) / total,
            float(high[mask].mean()) if mask.any() else 0.0,
        ]
    for other in (red, blue):
        values.append(_correlation(green[cell], other[cell]))
    ratio, level = float(params["dog_ratio"]), float(params["dog_level"])
    for sigma in params["dog_sigmas"]:
        dog = cv2.GaussianBlur(green, (0, 0), float(sigma)) - cv2.GaussianBlur(green, (0, 0), sigma * ratio)
        for mask in (nucleus, cytoplasm):
            part = dog[mask] if mask.any() else np.zeros(1, np.float32)
            values += [float(np.percentile(part, 99)), float((part > level).mean())]
    values += [float(v) for v in np.percentile(green, list(params["percentiles"]))]
    values += [float(nucleus.mean()), float(cell.mean())]
    return np.asarray(values, dtype=np.float32)


# ------------------------------------------------------------------ recipes

Compute = Callable[[np.ndarray, np.ndarray, Mapping[str, Any]], np.ndarray]
Layout = Callable[[Mapping[str, Any], int], list[tuple[str, int, str]]]


@dataclass(frozen=True)
class Recipe:
    """One named, versioned way of making the classifiers' input; call it on a batch."""

    name: str
    version: int
    compute: Compute  # (images N x S x S x 3 uint8, embeddings N x dim, params) -> N x F
    parts: Layout  # (params, embedding dim) -> [(part name, length, what)]
    params: Mapping[str, Any] = field(default_factory=dict)
    needs_slots: Mapping[str, int] | None = None  # channels the recipe reads from given slots

    def __call__(self, images: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        out = np.asarray(self.compute(images, embeddings, self.params), dtype=np.float32)
        if out.ndim != 2 or len(out) != len(embeddings):
            raise FeatureError(f"recipe {self.name} v{self.version} gave shape {out.shape}")
        return out

    def layout(self, embedding_dim: int) -> list[dict[str, Any]]:
        out, start = [], 0
        for name, length, what in self.parts(self.params, embedding_dim):
            out.append({"name": name, "start": start, "length": length, "what": what})
            start += length
        return out

    def width(self, embedding_dim: int) -> int:
        return sum(length for _, length, _ in self.parts(self.params, embedding_dim))

    def entry(self, embedding_dim: int) -> dict[str, Any]:
        """The manifest's (and the embedding cache key's) `features` entry."""
        return {
            "name": self.name,
            "version": self.version,
            "params": _plain(self.params),
            "layout": self.layout(embedding_dim),
        }

    def check_slots(self, slots: Sequence[Sequence[tuple[str, float]]]) -> None:
        """Refuse preprocessing that does not put the recipe's channels alone in its slots."""
        for channel, index in (self.needs_slots or {}).items():
            slot = [(str(c), float(w)) for c, w in slots[index]]
            if slot != [(channel, 1.0)]:
                raise FeatureError(
                    f"recipe {self.name} v{self.version} reads {channel} from input slot {index}, "
                    f"but the preprocessing puts {slot} there"
                )


def _embedding(images: np.ndarray, embeddings: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    return np.asarray(embeddings, dtype=np.float32)


def _embedding_parts(params: Mapping[str, Any], dim: int) -> list[tuple[str, int, str]]:
    return [("embedding", dim, "the embedder's output: global average pool of the last feature map")]


def _hand(images: np.ndarray, embeddings: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    return np.stack([hand_features(image, params) for image in images])


def _hand_parts(params: Mapping[str, Any], dim: int) -> list[tuple[str, int, str]]:
    return hand_layout(params)


def _gap_hand(images: np.ndarray, embeddings: np.ndarray, params: Mapping[str, Any]) -> np.ndarray:
    return np.concatenate([_embedding(images, embeddings, params), _hand(images, embeddings, params)], axis=1)


def _gap_hand_parts(params: Mapping[str, Any], dim: int) -> list[tuple[str, int, str]]:
    return _embedding_parts(params, dim) + hand_layout(params)


RECIPES: dict[tuple[str, int], Recipe] = {
    ("lite0-gap", 1): Recipe("lite0-gap", 1, _embedding, _embedding_parts),
    ("hand-rgb", 1): Recipe("hand-rgb", 1, _hand, _hand_parts, HAND_PARAMS, HAND_SLOTS),
    ("lite0-gap+hand-rgb", 1): Recipe(
        "lite0-gap+hand-rgb", 1, _gap_hand, _gap_hand_parts, HAND_PARAMS, HAND_SLOTS
    ),
}
DEFAULT = RECIPES[(DEFAULT_NAME, DEFAULT_VERSION)]


def recipe(name: str, version: int | None = None) -> Recipe:
    """A registered recipe by name (and version; the newest when None)."""
    versions = sorted(v for n, v in RECIPES if n == name)
    if not versions:
        known = ", ".join(sorted({f"{n} v{v}" for n, v in RECIPES}))
        raise FeatureError(f"unknown feature recipe {name!r} (this agent knows {known})")
    wanted = versions[-1] if version is None else version
    if (name, wanted) not in RECIPES:
        raise FeatureError(
            f"feature recipe {name!r} version {wanted!r} is unknown to this agent "
            f"(it knows versions {versions}); update hpa-edge on this device"
        )
    return RECIPES[(name, wanted)]


def from_manifest(entry: Mapping[str, Any] | None, embedding_dim: int | None = None) -> Recipe:
    """The recipe a manifest's `features` entry names, checked; None means `lite0-gap` v1.

    Refused (FeatureError): an unknown name or version, params that differ from the
    registered ones (this agent would compute something else), or a layout that differs from
    the one this agent computes for the embedder's dim (when it is given).
    """
    if entry is None:
        return DEFAULT
    if not isinstance(entry, Mapping) or "name" not in entry or "version" not in entry:
        raise FeatureError("features entry must be an object with name and version")
    version = entry["version"]
    if isinstance(version, bool) or not isinstance(version, int):
        raise FeatureError(f"features version must be an integer, not {version!r}")
    found = recipe(str(entry["name"]), version)
    params = _plain(entry.get("params", {}))
    if params != _plain(found.params):
        raise FeatureError(
            f"feature recipe {found.name} v{found.version}: the manifest's params {params} differ from "
            f"this agent's {_plain(found.params)}"
        )
    if (
        embedding_dim is not None
        and "layout" in entry
        and _plain(entry["layout"]) != found.layout(embedding_dim)
    ):
        raise FeatureError(
            f"feature recipe {found.name} v{found.version}: the manifest's layout differs from the "
            f"one this agent computes for a {embedding_dim}-value embedding"
        )
    return found


def _plain(value: Any) -> Any:
    """JSON's view of a value (tuples become lists), for comparing a manifest with the registry."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
