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
  feature map, 1280 values). What a bundle, model or cache without a recipe means (`LEGACY`).
- `hand-rgb` v1: 44 hand-made numbers describing where the green protein (input slot 1) sits
  relative to the nucleus (slot 2, blue) and the cell (slots 0 + 2), computed from the
  preprocessed image with OpenCV and numpy (no backbone output needed). Tuned for the
  device's budget of 3 ms per stack at 224 px: about half the time of the plain version
  (one boolean mask per region, np.percentile, two blurs per difference of Gaussians) that
  tests/test_features.py keeps and compares it with, to float rounding.
  The kind of `export/training/baseline.py`'s 45 features, without the yellow channel (the
  device's image holds the three input slots only).
- `lite0-gap+hand-rgb` v1: the two above, concatenated (embedding first).
- `hand-rgb2` v1 (`DEFAULT_NAME`, `hpa-edge embed`'s default): 81 numbers, `hand-rgb` v1's
  44 then 37 more from the same masks (issue 15): green per band of distance to the nucleus
  edge, texture and a granularity spectrum per region, nucleolus-like dim-blue holes,
  per-nucleus statistics, exposure-robust levels and ratios (see `hand2_layout`). Measured
  with `hpa-edge features-compare` on the 101 real stacks (docs/training.md);
  tests/test_features.py keeps a plain version of the extra parts and compares them, to
  float rounding.
- `lite0-gap+hand-rgb2` v1: the embedding, then `hand-rgb2`.

`nucleus_mask` and `region_pool` (a feature map averaged inside, outside a mask and their
difference) are the building blocks of region-pooled backbone features; they are measured by
`hpa-edge features-compare` and become a recipe once the embedder exports its feature maps.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from agent.stacks.pools import pool

# What `hpa-edge embed` computes unless told otherwise: the recipe chosen on the real stacks
# (docs/training.md, "Feature recipes"); the demo bundle's.
DEFAULT_NAME = "hand-rgb2"
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


# Pixel value k of a uint8 plane as the recipe reads it: k / 255 in float32, bit for bit what
# `plane.astype(np.float32) / 255` gives. The region statistics and the percentiles of green
# work on 256-bin histograms weighted by this table instead of on every pixel.
_UNIT = np.arange(256, dtype=np.float32) / 255
_UNIT64 = _UNIT.astype(np.float64)
_UNIT_TABLE = _UNIT.reshape(1, 256)  # cv2.LUT's form: a 10th of numpy's astype and divide

# Every pixel gets a 4-bit code (nucleus 1, cell 2, nuclear rim 4, cell rim 8); each region of
# HAND_REGIONS is a union of codes (the regions overlap: the rims straddle the others).
_CODES = np.arange(16)
_REGION_CODES = np.stack(
    [
        _CODES & 1 > 0,  # nucleus
        (_CODES & 2 > 0) & (_CODES & 1 == 0),  # cytoplasm: in a cell, not in a nucleus
        _CODES & 4 > 0,  # nuclear rim
        _CODES & 8 > 0,  # cell rim
        _CODES & 2 == 0,  # background: outside every cell
    ]
).astype(np.int64)


def hand_features(image: np.ndarray, params: Mapping[str, Any] = HAND_PARAMS) -> np.ndarray:
    """44 numbers (see `hand_layout`) for one preprocessed stack, uint8 S x S x 3.

    Written for the device's per-stack budget (the recipe may add 3 ms at 224 px). The masks
    and the differences of Gaussians are OpenCV's, bit for bit (a pixel flipped there would
    move every region's figures); what is measured on them comes from one joint histogram of
    (region code, green value), exact integer sums and partial sorts. So the numbers equal a
    direct per-mask computation to float rounding: tests/test_features.py keeps that plain
    version and compares them on synthetic stacks of every size and on the 101 real ones.
    """
    return _hand_vector(image, params, extra=False)


def _hand_vector(image: np.ndarray, params: Mapping[str, Any], extra: bool) -> np.ndarray:
    """`hand_features` (`extra` False) or `hand2_features`: the masks, every measure that reads
    pixels as one task of `_run_split`, then the numbers the histograms and those tasks give.

    Every number is computed by the same operations, in the same order, as before the tasks
    were split out (2026-12-04), whichever thread runs its task: the vectors are the same bit
    for bit (tests/test_features.py runs the tasks on one thread and on two). Each task's
    temporary planes are freed when it ends, so the heap peaks lower: with each stack decoded
    before it (as in the agent, 512 px PNGs), glibc no longer gives the heap's top back and
    faults it in again on every stack: about 450 -> 0-40 minor page faults per stack for
    `hand-rgb2`, which had cost the earlier code 0.8-2.4 ms on the 2-core test machine.
    """
    planes = _HandPlanes.of(image, params)
    levels = _Levels.of(planes) if extra else None
    measured = _run_split(_pixel_tasks(planes, params, levels))
    blobs = [value for sigma in params["dog_sigmas"] for value in measured[f"blobs {float(sigma)}"]]
    values = _hand_values(planes, params, blobs, measured["moments"])
    if levels is not None:
        values += extra_values(planes, params, levels, measured)
    return np.asarray(values, dtype=np.float32)


@dataclass
class _HandPlanes:
    """What `hand-rgb` v1 derives from an image before measuring, shared with `hand-rgb2`: the
    planes, the masks, the histograms of green per region code and per region, and the pixels
    of the two regions the blob statistics and the moments read."""

    g8: np.ndarray
    r8: np.ndarray
    b8: np.ndarray
    green: np.ndarray  # float32 k / 255
    blue: np.ndarray
    nucleus: np.ndarray  # bool
    cell: np.ndarray  # bool, holds the nucleus
    cytoplasm: np.ndarray  # bool: cell and not nucleus
    joint: np.ndarray  # int64 16 x 256: pixels per (region code, green value)
    regions: np.ndarray  # int64 5 x 256: green histogram per region of HAND_REGIONS
    # Flat indices of the nucleus's and the cytoplasm's pixels: the blob statistics and the
    # moments gather 7 planes at each (4 differences of Gaussians, 3 colour planes), and
    # np.take at the indices takes a quarter of np.compress's time with the mask (8 against 32
    # us at 224 px).
    nucleus_at: np.ndarray
    cytoplasm_at: np.ndarray

    @classmethod
    def of(cls, image: np.ndarray, params: Mapping[str, Any]) -> _HandPlanes:
        slots = params["slots"]
        planes = cv2.split(image)
        g8, r8, b8 = (planes[slots[c]] for c in ("green", "red", "blue"))
        green, red, blue = (cv2.LUT(plane, _UNIT_TABLE) for plane in (g8, r8, b8))
        # _otsu_unit overwrites the blur it is given, never the plane
        nucleus = _otsu_unit(cv2.GaussianBlur(blue, (0, 0), float(params["nucleus_blur"])))
        cell = _otsu_unit(cv2.GaussianBlur(cv2.add(red, blue), (0, 0), float(params["cell_blur"]))) | nucleus
        codes = region_codes(nucleus, cell, int(params["rim_kernel"]))
        # Pixels per (code, green value); float32 counts are exact below 2**24 pixels.
        joint = cv2.calcHist([codes, g8], [0, 1], None, [16, 256], [0, 16, 0, 256]).astype(np.int64)
        cytoplasm = cell & ~nucleus
        return cls(
            g8,
            r8,
            b8,
            green,
            blue,
            nucleus,
            cell,
            cytoplasm,
            joint,
            _REGION_CODES @ joint,
            np.flatnonzero(nucleus),
            np.flatnonzero(cytoplasm),
        )

    @property
    def n8(self) -> np.ndarray:
        """The nucleus as OpenCV's 0/1 uint8 mask (a view)."""
        return self.nucleus.view(np.uint8)

    @property
    def y8(self) -> np.ndarray:
        """The cytoplasm as OpenCV's 0/1 uint8 mask (a view)."""
        return self.cytoplasm.view(np.uint8)


@dataclass(frozen=True)
class _Levels:
    """Per region of HAND_REGIONS, from the green histograms: pixels (int64), the sum of green
    (float64, exact) and its mean (0 for an empty region); the cell's green mean."""

    counts: np.ndarray
    sums: np.ndarray
    means: np.ndarray
    cell_mean: float

    @classmethod
    def of(cls, planes: _HandPlanes) -> _Levels:
        counts, sums = planes.regions.sum(axis=1), planes.regions @ _UNIT64
        in_cell = planes.joint[_CODES & 2 > 0].sum(axis=0)
        cell_mean = _ratio(float(in_cell @ _UNIT64), float(in_cell.sum()))
        return cls(counts, sums, sums / np.maximum(counts, 1), cell_mean)


def _pixel_tasks(
    planes: _HandPlanes, params: Mapping[str, Any], levels: _Levels | None
) -> list[Callable[[], dict[str, Any]]]:
    """What reads pixels after the masks, as independent tasks for `_run_split`, each giving
    named results: the difference of Gaussians per sigma (`blobs SIGMA`) and the colocalisation
    moments (`hand-rgb` v1); with `levels`, `hand-rgb2`'s radial bands, local spread, gradient,
    granularity (`tops`), holes and nuclei too.

    Longest first, so that the two threads end close together. Medians at 224 px on the 2-core
    test machine, one core (ms): the sigma-6 pair 1.0, radial 0.6, the sigma-1.5 pair with the
    local spread (which shares its first blur) 0.46, the sigma-3 pair 0.45, tops 0.31, holes
    0.24, nuclei 0.22, gradient 0.2, the sigma-0.8 pair 0.18, moments 0.17.
    """
    sigmas = sorted((float(s) for s in params["dog_sigmas"]), reverse=True)
    ratio, level = float(params["dog_ratio"]), float(params["dog_level"])
    # The local spread's mean is a blur of green by texture_sigma: the narrow blur of the
    # difference of Gaussians at that sigma when there is one (the same call, the same pixels).
    spread = float(params["texture_sigma"]) if levels is not None else None
    widest, *dogs = [
        functools.partial(_blob_task, planes, sigma, ratio, level, sigma == spread) for sigma in sigmas
    ]
    narrowest = dogs[-1:]
    tasks: list[Callable[[], dict[str, Any]]] = [widest]
    if levels is not None:
        tasks.append(functools.partial(_radial, planes, params, levels.cell_mean))
    tasks += dogs[:-1]
    if levels is not None:
        if spread is not None and spread not in sigmas:
            tasks.append(functools.partial(_local_spread, planes, spread, None))
        tasks += [
            functools.partial(_tops, planes, params),
            functools.partial(_holes, planes, params),
            functools.partial(_nuclei, planes, params, float(levels.means[1])),
            functools.partial(_gradient, planes),
        ]
    return [*tasks, *narrowest, functools.partial(_region_moments, planes)]


def _run_split(tasks: Sequence[Callable[[], Mapping[str, Any]]]) -> dict[str, Any]:
    """Every task's named results, the tasks shared between this thread and one `recipe-blobs`
    worker: each thread takes the next task not yet begun, in the given order, until none is left.

    OpenCV (like numpy's larger operations) releases the GIL, so on two free cores the recipe
    takes about the time of the longer share. On a busy machine, when the worker starts late or
    not at all, this thread simply does more of the tasks: it never waits for one that has not
    begun, and a worker still queued behind other stacks' when this thread is done is cancelled.
    (Until 2026-12 the worker had a fixed part, the differences of Gaussians: 2.2 ms at 224 px
    against the caller's 3.5 for `hand-rgb2` and 0.9 for `hand-rgb` v1.) Two workers, so two
    stacks in flight never queue behind each other.
    """
    pending = deque(tasks)
    found: dict[str, Any] = {}

    def work() -> None:
        while True:
            try:
                task = pending.popleft()  # atomic: the two threads never take the same task
            except IndexError:
                return
            found.update(task())

    helper = pool("recipe-blobs", 2).submit(work)
    try:
        work()
    finally:
        if not helper.cancel():  # begun: it finishes the task it holds
            helper.result()
    return found


def _hand_values(
    planes: _HandPlanes, params: Mapping[str, Any], blobs: list[float], moments: tuple[_Moments, _Moments]
) -> list[float]:
    """`hand_features`' numbers from the shared planes, the blob statistics and the moments."""
    joint = planes.joint
    values = region_green(planes.regions, joint.sum(axis=0), float(params["bright_sigmas"]))
    in_cell = moments[0] + moments[1]
    values += [in_cell.correlation(1), in_cell.correlation(2)]  # green with red, then blue
    values += blobs
    values += histogram_percentiles(joint.sum(axis=0), [float(q) for q in params["percentiles"]])
    pixels = float(joint.sum())
    values += [float(joint[_CODES & 1 > 0].sum()) / pixels, float(joint[_CODES & 2 > 0].sum()) / pixels]
    return values


def _otsu_unit(blurred: np.ndarray) -> np.ndarray:
    """`otsu` of a blur of non-negative planes (overwritten), as a bool view of OpenCV's mask.

    The same pixels as `otsu`: x * 255 cannot be negative here, so only its top is clipped (in
    place), and float-to-uint8 truncates as there; the bool copy is skipped.
    """
    np.minimum(np.multiply(blurred, 255, out=blurred), 255, out=blurred)
    _, mask = cv2.threshold(blurred.astype(np.uint8), 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    found: np.ndarray = mask.view(bool)
    return found


def region_codes(nucleus: np.ndarray, cell: np.ndarray, rim_kernel: int) -> np.ndarray:
    """uint8 code per pixel: 1 nucleus, 2 cell, 4 nuclear rim, 8 cell rim (see `_REGION_CODES`).

    The nuclear rim is the band a k x k square dilation adds plus the one its erosion removes;
    the cell rim is the band the erosion removes from the cell.
    """
    kernel = np.ones((rim_kernel, rim_kernel), np.uint8)
    n8: np.ndarray = nucleus.view(np.uint8)
    c8: np.ndarray = cell.view(np.uint8)
    # An erosion lies inside the mask and the mask inside its dilation: a difference is a band.
    nuclear_rim = cv2.subtract(cv2.dilate(n8, kernel), cv2.erode(n8, kernel))
    cell_rim = cv2.subtract(c8, cv2.erode(c8, kernel))
    codes: np.ndarray = n8 | c8 << 1 | np.left_shift(nuclear_rim, 2) | np.left_shift(cell_rim, 3)
    return codes


def region_green(histograms: np.ndarray, everywhere: np.ndarray, bright_sigmas: float) -> list[float]:
    """Per region (one 256-bin green histogram a row): mean, std, share of all green, and share
    of bright pixels (above the mean of the image plus bright_sigmas standard deviations).

    From histograms, in float64: the sums are exact; an empty region gives four zeros.
    """
    n = everywhere.sum()
    mean = everywhere @ _UNIT64 / n
    cutoff = mean + bright_sigmas * np.sqrt(everywhere @ (_UNIT64 - mean) ** 2 / n)
    counts = histograms.sum(axis=1)
    some = np.maximum(counts, 1)
    sums = histograms @ _UNIT64
    means = sums / some
    spreads = np.sqrt((histograms * (_UNIT64 - means[:, None]) ** 2).sum(axis=1) / some)
    bright = histograms[:, np.greater(_UNIT, cutoff)].sum(axis=1) / some
    table = np.stack([means, spreads, sums / (float(everywhere @ _UNIT64) + 1e-6), bright], axis=1)
    return [float(v) for v in table.ravel()]


@dataclass(frozen=True)
class _Moments:
    """Sums over one region of some uint8 planes' values (one row each) and of their pairwise
    products, for correlations: exact integers in float64 (up to about 2**53 / 255**2 = 138
    million pixels), so the moments of two disjoint regions add up to those of their union
    exactly, and `correlation` gives the same number however the region was cut."""

    count: int
    sums: np.ndarray  # float64, one per plane
    products: np.ndarray  # float64, planes x planes

    @classmethod
    def at(cls, planes: Sequence[np.ndarray], where: np.ndarray) -> _Moments:
        """Over the pixels at these flat indices."""
        values = np.empty((len(planes), len(where)))
        for row, plane in zip(values, planes, strict=True):
            row[:] = plane.ravel()[where]
        return cls(len(where), values.sum(axis=1), values @ values.T)

    def __add__(self, other: _Moments) -> _Moments:
        return _Moments(self.count + other.count, self.sums + other.sums, self.products + other.products)

    def correlation(self, i: int) -> float:
        """Pearson correlation of plane 0 with plane i (0 if undefined): n * sum(xy) - sum(x) sum(y)
        over the square roots of the same for x and for y."""
        if self.count < 2:
            return 0.0
        moments = self.count * self.products - np.outer(self.sums, self.sums)
        return (
            float(moments[0, i] / np.sqrt(moments[0, 0] * moments[i, i]))
            if moments[0, 0] and moments[i, i]
            else 0.0
        )


def _region_moments(planes: _HandPlanes) -> dict[str, tuple[_Moments, _Moments]]:
    """`moments`: green, red and blue in the nucleus, then in the cytoplasm. `hand-rgb` v1
    correlates green with red and with blue in the cell (their sum), `hand-rgb2` with blue in
    the nucleus and with red in the cytoplasm: one gather of each pixel instead of five."""
    rows = (planes.g8, planes.r8, planes.b8)
    return {"moments": (_Moments.at(rows, planes.nucleus_at), _Moments.at(rows, planes.cytoplasm_at))}


def _blob_task(
    planes: _HandPlanes, sigma: float, ratio: float, level: float, spread: bool
) -> dict[str, list[float]]:
    """`blobs SIGMA`: in the nucleus then the cytoplasm, the 99th percentile of the difference of
    Gaussians (sigma, sigma * ratio) and the fraction above level; with `spread`, `hand-rgb2`'s
    local spread too (`_local_spread`), from the same blur by sigma."""
    narrow = cv2.GaussianBlur(planes.green, (0, 0), sigma)
    found = _local_spread(planes, sigma, narrow) if spread else {}
    dog = difference_of_gaussians(planes.green, sigma, ratio, narrow).ravel()
    del narrow
    values: list[float] = []
    for where in (planes.nucleus_at, planes.cytoplasm_at):
        inside = np.take(dog, where)
        values += _percentile_and_share(inside if inside.size else np.zeros(1, np.float32), 99.0, level)
    found[f"blobs {sigma}"] = values
    return found


def difference_of_gaussians(
    green: np.ndarray, sigma: float, ratio: float, narrow: np.ndarray | None = None
) -> np.ndarray:
    """float32: GaussianBlur(sigma) - GaussianBlur(sigma * ratio), two direct separable blurs;
    `narrow`, when given, is the first one already made. (Until 2026-12-04 the wide pairs went
    through one shared DFT, equal to float32 rounding; on the 2-core AMD test machine the
    direct blurs take 0.71x that time at 224 px, see docs/benchmark.md.)"""
    if narrow is None:
        narrow = cv2.GaussianBlur(green, (0, 0), sigma)
    wide = cv2.GaussianBlur(green, (0, 0), sigma * ratio)
    found: np.ndarray = np.subtract(narrow, wide, out=wide)
    return found


def _percentile_and_share(values: np.ndarray, q: float, level: float) -> list[float]:
    """np.percentile(values, q) (linear interpolation) and the share of values above level.

    From one partial sort in place (values may be reordered) and the minimum of what lies
    above it: a third of np.percentile's time. When the two ranks around the percentile lie
    above level (q = 99 and a level most pixels stay below), only the values above it are
    sorted: the same two values, from a tenth of the pixels (0.4 -> 0.15 ms per stack at 224 px).
    """
    above = values > level
    count = int(np.count_nonzero(above))
    position = (values.size - 1) * (q / 100)
    low = int(position)
    below = values.size - count  # values <= level: the lowest ranks
    candidates, rank = (values[above], low - below) if low >= below else (values, low)
    candidates.partition(rank)
    a = float(candidates[rank])
    b = float(candidates[rank + 1 :].min()) if rank + 1 < candidates.size else a
    return [a + (b - a) * (position - low), count / values.size]


def histogram_percentiles(counts: np.ndarray, qs: Sequence[float]) -> list[float]:
    """np.percentile (linear) of the pixels a 256-bin histogram of uint8 values counts, read as
    k / 255: the two ranks around each position are found in the cumulative counts."""
    n = int(counts.sum())
    positions = (n - 1) * (np.asarray(qs, np.float64) / 100)
    low = positions.astype(np.int64)
    ranks = np.searchsorted(np.cumsum(counts), np.stack([low, np.minimum(low + 1, n - 1)]), side="right")
    a, b = _UNIT64[ranks]
    return [float(v) for v in a + (b - a) * (positions - low)]


HAND2_EXTRA: dict[str, Any] = {
    "radial_inside": [2.0, 5.0],
    "radial_outside": [3.0, 8.0, 16.0],
    "texture_sigma": 1.5,
    "openings": [3, 7, 13],
    "hole_blur": 4.0,
    "hole_ratio": 0.8,
    "nuclear_bright": 2.0,
    "min_nucleus": 30,
    "nucleus_count_scale": 10,
    "bright_nucleus": 1.5,
    "top_percentile": 99.9,
    "eps": 1e-4,
}
HAND2_PARAMS: dict[str, Any] = {**HAND_PARAMS, **HAND2_EXTRA}


def hand2_layout(params: Mapping[str, Any]) -> list[tuple[str, int, str]]:
    """`hand-rgb2`'s parts: `hand-rgb` v1's, then the ones `extra_values` adds."""
    inner, outer = len(params["radial_inside"]) + 1, len(params["radial_outside"]) + 1
    sizes = len(params["openings"])
    return [
        *hand_layout(params),
        (
            "radial",
            inner + outer + 1,
            f"green mean per band of distance to the nucleus edge ({inner} inside the nuclei, {outer} in "
            "the cytoplasm; radial_inside / radial_outside px) over the cell's green mean; the "
            "green-weighted mean signed distance (outward positive) minus the cell's",
        ),
        (
            "texture",
            2 * (2 + sizes),
            "in nucleus then cytoplasm: local standard deviation (texture_sigma) and Sobel gradient "
            "magnitude, each over the region's green mean; share of the region's green that a grey "
            "opening of each size in openings removes",
        ),
        (
            "nucleolar",
            6,
            "dim-blue holes in the nuclei (blue < hole_ratio x its hole_blur blur): share of nucleus "
            "area, green mean over the nucleus's, share of the nucleus's green; correlation of green "
            "with blue in the nuclei, with red in the cytoplasm; share of the nucleus's green above "
            "nuclear_bright x its median",
        ),
        (
            "nuclei",
            4,
            "connected nuclei of at least min_nucleus px: count / nucleus_count_scale, coefficient of "
            "variation of their green means, mean within-nucleus coefficient of variation, share "
            "brighter than bright_nucleus x the cytoplasm's green mean",
        ),
        (
            "ratios",
            9,
            "green mean of nucleus, cytoplasm, nuclear rim, cell rim, background over green's "
            "top_percentile; log ratios nucleus / cytoplasm, nuclear rim / nucleus, cell rim / "
            "cytoplasm; log of the cell's green mean",
        ),
    ]


def hand2_features(image: np.ndarray, params: Mapping[str, Any] = HAND2_PARAMS) -> np.ndarray:
    """81 numbers (see `hand2_layout`): `hand_features`, then `extra_values`, from one set of masks."""
    return _hand_vector(image, params, extra=True)


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def extra_values(
    planes: _HandPlanes, params: Mapping[str, Any], levels: _Levels, measured: Mapping[str, Any]
) -> list[float]:
    """`hand-rgb2`'s 37 numbers beyond `hand-rgb` v1 (see `hand2_layout`), from the histograms
    and what `_pixel_tasks` measured.

    Every mean and sum over a region comes from exact integer counts (joint histograms of a
    region code and the green value, per-component sums of uint8 values) or from one OpenCV
    masked mean, so they equal tests/test_features.py's plain version (one boolean mask per
    region) to float rounding; the masks, distances, blurs and openings are the same
    OpenCV calls there. An empty region's mean is 0.
    """
    eps = float(params["eps"])
    counts, sums, means = levels.counts, levels.sums, levels.means
    nucleus_mean, cytoplasm_mean, cell_mean = float(means[0]), float(means[1]), levels.cell_mean

    texture = []
    for region, mean in enumerate((nucleus_mean, cytoplasm_mean)):
        texture += [measured[part][region] / (mean + eps) for part in ("spread", "gradient")]
        texture += [v * counts[region] / 255 / (sums[region] + eps) for v in measured["tops"][region]]

    hole_count, hole_mean = measured["holes"]
    row = planes.regions[0]
    median = _histogram_median8(row)
    above = np.arange(256) > float(params["nuclear_bright"]) * median  # in uint8 units, exact
    bright = float(row[above] @ _UNIT64[above])
    in_nucleus, in_cytoplasm = measured["moments"]
    nucleolar = [
        hole_count / max(int(counts[0]), 1),
        hole_mean / (nucleus_mean + eps),
        hole_mean * hole_count / (float(sums[0]) + eps),
        in_nucleus.correlation(2),  # green with blue
        in_cytoplasm.correlation(1),  # green with red
        bright / (float(sums[0]) + eps),
    ]

    # exposure-robust levels and ratios
    top = histogram_percentiles(planes.joint.sum(axis=0), [float(params["top_percentile"])])[0] + eps
    ratios = [float(m) / top for m in means]
    ratios += [
        float(np.log((nucleus_mean + eps) / (cytoplasm_mean + eps))),
        float(np.log((float(means[2]) + eps) / (nucleus_mean + eps))),
        float(np.log((float(means[3]) + eps) / (cytoplasm_mean + eps))),
        float(np.log(cell_mean + eps)),
    ]
    return measured["radial"] + texture + nucleolar + measured["nuclei"] + ratios


def _radial(planes: _HandPlanes, params: Mapping[str, Any], cell_mean: float) -> dict[str, list[float]]:
    """`radial`: green per band of distance to the nucleus edge over the cell's mean, and the
    green-weighted mean signed distance minus the cell's (one band code per pixel, one joint
    histogram with green). The distance planes are reused for the signed distance and its
    product with green: every 224 px float plane fewer is 49 pages the next stack does not
    have to fault in again when glibc has given the heap's top back."""
    eps = float(params["eps"])
    green, n8 = planes.green, planes.n8
    inner, outer = params["radial_inside"], params["radial_outside"]
    # (3 x 3 mask distances; capped at the image's size, the distance when no pixel is on the
    # other side: an image all nucleus, or without one)
    reach = float(max(green.shape))
    inside = cv2.distanceTransform(n8, cv2.DIST_L2, 3)
    np.minimum(inside, reach, out=inside)
    outside = cv2.distanceTransform(1 - n8, cv2.DIST_L2, 3)
    np.minimum(outside, reach, out=outside)
    bands = len(inner) + 1 + len(outer) + 1
    band = np.full(green.shape, bands, np.uint8)  # outside every band
    np.copyto(band, _bands(inside, inner, 0), where=planes.nucleus)
    np.copyto(band, _bands(outside, outer, len(inner) + 1), where=planes.cytoplasm)
    by_band = cv2.calcHist([band, planes.g8], [0, 1], None, [bands, 256], [0, bands, 0, 256]).astype(np.int64)
    band_means = (by_band @ _UNIT64) / np.maximum(by_band.sum(axis=1), 1)
    radial = [float(m) / (cell_mean + eps) for m in band_means]
    # signed distance, outward positive: each transform is 0 where the other one measures
    signed = cv2.subtract(outside, inside, dst=outside)
    c8: np.ndarray = planes.cell.view(np.uint8)
    weighted = cv2.mean(cv2.multiply(signed, green, dst=inside), c8)[0] / cell_mean if cell_mean > 0 else None
    radial.append(weighted - cv2.mean(signed, c8)[0] if weighted is not None else 0.0)
    return {"radial": radial}


def _bands(distance: np.ndarray, edges: Sequence[float], first: int) -> np.ndarray:
    """uint8 per pixel: first + the number of edges the distance is beyond."""
    found = np.full(distance.shape, first, np.uint8)
    for edge in edges:
        found += distance > edge
    return found


def _local_spread(planes: _HandPlanes, sigma: float, local_mean: np.ndarray | None) -> dict[str, list[float]]:
    """`spread`: the mean local standard deviation (Gaussian window sigma; `local_mean` is green's
    blur by sigma when already made) in the nucleus, then the cytoplasm."""
    green = planes.green
    if local_mean is None:
        local_mean = cv2.GaussianBlur(green, (0, 0), sigma)
    local_var = cv2.GaussianBlur(cv2.multiply(green, green), (0, 0), sigma)
    cv2.subtract(local_var, cv2.multiply(local_mean, local_mean), dst=local_var)
    local_std = cv2.sqrt(np.maximum(local_var, 0, out=local_var), dst=local_var)
    return {"spread": [cv2.mean(local_std, mask)[0] for mask in (planes.n8, planes.y8)]}


def _gradient(planes: _HandPlanes) -> dict[str, list[float]]:
    """`gradient`: the mean Sobel gradient magnitude in the nucleus, then the cytoplasm."""
    dx, dy = cv2.Sobel(planes.green, cv2.CV_32F, 1, 0), cv2.Sobel(planes.green, cv2.CV_32F, 0, 1)
    magnitude = cv2.magnitude(dx, dy, magnitude=_at_address(dx.shape, np.float32, 16, 32))
    return {"gradient": [cv2.mean(magnitude, mask)[0] for mask in (planes.n8, planes.y8)]}


def _at_address(shape: tuple[int, ...], dtype: type, offset: int, modulus: int) -> np.ndarray:
    """An uninitialised array whose data starts `offset` bytes past a multiple of `modulus`.

    For `cv2.magnitude`'s output: OpenCV's Intel IPP path rounds 1 ulp differently on some
    pixels depending on the output's address modulo 32 (seen with OpenCV 5.0 and IPP 2026.0;
    sqrt, add, multiply, the blurs, Sobel and the distance transform do not), so the gradient's
    means moved by up to 2.4e-7 with the heap's state (1 of 101 real stacks from 2048 px) until
    2026-12. 16 mod 32 is where glibc puts a buffer it maps for itself (page + 16), the address
    every measured stack of the earlier code had: the same numbers, now on every call.
    """
    size = int(np.prod(shape)) * np.dtype(dtype).itemsize
    raw = np.empty(size + modulus, np.uint8)
    start = (offset - raw.ctypes.data) % modulus
    found: np.ndarray = raw[start : start + size].view(dtype).reshape(shape)
    return found


def _tops(planes: _HandPlanes, params: Mapping[str, Any]) -> dict[str, list[list[float]]]:
    """`tops`: in the nucleus, then the cytoplasm, the mean of what a grey opening of each size
    in openings removes from green (uint8; the three in one masked mean per region, a third of
    the time)."""
    g8, sizes = planes.g8, [int(k) for k in params["openings"]]
    tops = cv2.merge([cv2.subtract(g8, cv2.morphologyEx(g8, cv2.MORPH_OPEN, _ellipse(k))) for k in sizes])
    return {"tops": [list(cv2.mean(tops, mask)[: len(sizes)]) for mask in (planes.n8, planes.y8)]}


def _holes(planes: _HandPlanes, params: Mapping[str, Any]) -> dict[str, tuple[int, float]]:
    """`holes`: nucleolus-like dim-blue holes in the nuclei (blue < hole_ratio x its hole_blur
    blur): their pixels and green mean."""
    threshold = cv2.GaussianBlur(planes.blue, (0, 0), float(params["hole_blur"]))
    holes = np.less(planes.blue, np.multiply(threshold, float(params["hole_ratio"]), out=threshold))
    holes &= planes.nucleus
    h8: np.ndarray = holes.view(np.uint8)
    count = cv2.countNonZero(h8)
    return {"holes": (count, cv2.mean(planes.green, h8)[0] if count else 0.0)}


def _nuclei(planes: _HandPlanes, params: Mapping[str, Any], cytoplasm_mean: float) -> dict[str, list[float]]:
    """`nuclei`: per connected nucleus, a joint histogram of (component, green value) gives exact
    sums; their count, spread and brightness against the cytoplasm (see `hand2_layout`)."""
    eps = float(params["eps"])
    found, labels = cv2.connectedComponents(planes.n8, connectivity=8)
    if found <= 256:  # the usual case: uint8 labels
        joint_nuclei = cv2.calcHist(
            [labels.astype(np.uint8), planes.g8], [0, 1], None, [found, 256], [0, found, 0, 256]
        ).astype(np.float64)
        area, s1, s2 = joint_nuclei.sum(axis=1), joint_nuclei @ _LEVELS, joint_nuclei @ _LEVELS**2
    else:
        flat, values = labels.ravel(), planes.g8.ravel().astype(np.float64)
        area = np.bincount(flat, minlength=found).astype(np.float64)
        s1 = np.bincount(flat, weights=values, minlength=found).astype(np.float64)
        s2 = np.bincount(flat, weights=values * values, minlength=found).astype(np.float64)
    kept = np.flatnonzero(area >= int(params["min_nucleus"]))
    kept = kept[kept > 0]
    per = s1[kept] / area[kept] / 255
    spread = np.sqrt(np.maximum(area[kept] * s2[kept] - s1[kept] ** 2, 0)) / area[kept] / 255
    return {
        "nuclei": [
            len(kept) / float(params["nucleus_count_scale"]),
            float(per.std() / (per.mean() + eps)) if len(kept) else 0.0,
            float(np.mean(spread / (per + eps))) if len(kept) else 0.0,
            float((per > float(params["bright_nucleus"]) * cytoplasm_mean).mean()) if len(kept) else 0.0,
        ]
    }


_LEVELS = np.arange(256, dtype=np.float64)


@functools.cache
def _ellipse(size: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def _histogram_median8(counts: np.ndarray) -> float:
    """np.median of the uint8 values a 256-bin histogram counts (0 when it counts none)."""
    n = int(counts.sum())
    if n == 0:
        return 0.0
    cumulative = np.cumsum(counts)
    low, high = (int(np.searchsorted(cumulative, rank, side="right")) for rank in ((n - 1) // 2, n // 2))
    return (low + high) / 2


# ------------------------------------------------------------------ recipes

ImageValues = Callable[[np.ndarray, Mapping[str, Any]], np.ndarray]  # (image S x S x 3, params) -> k
ImageLayout = Callable[[Mapping[str, Any]], list[tuple[str, int, str]]]  # params -> [(name, length, what)]


@dataclass(frozen=True)
class Recipe:
    """One named, versioned way of making the classifiers' input: the embedder's output (when
    `embedding`), then the values `per_image` computes from each preprocessed image alone.

    Those values need no embedding, so the device computes them beside the embedder (LiteRT
    releases the GIL): `image_part(images)` on one thread while the embedder runs, then
    `recipe(images, embeddings, image_part=...)`. Called without `image_part`, the recipe
    computes them itself: the same numbers either way.
    """

    name: str
    version: int
    embedding: bool  # the vector starts with the embedder's output
    per_image: ImageValues | None = None
    image_layout: ImageLayout | None = None  # the parts `per_image` gives, in order
    params: Mapping[str, Any] = field(default_factory=dict)
    needs_slots: Mapping[str, int] | None = None  # channels the recipe reads from given slots

    def embeddings(self, network: Callable[[np.ndarray], np.ndarray], images: np.ndarray) -> np.ndarray:
        """What `__call__` needs of the network for these images: its output, or none (N x 0)
        for a recipe that does not read it, which then never runs the network (the device skips
        the embedder per stack, `hpa-edge embed` never loads TensorFlow)."""
        if not self.embedding:
            return np.zeros((len(images), 0), np.float32)
        return network(images)

    def image_part(self, images: np.ndarray) -> np.ndarray | None:
        """N x k float32: the values of each image alone; None when the recipe has none."""
        per_image = self.per_image
        if per_image is None:
            return None
        return np.stack([np.asarray(per_image(image, self.params), np.float32) for image in images])

    def __call__(
        self, images: np.ndarray, embeddings: np.ndarray, image_part: np.ndarray | None = None
    ) -> np.ndarray:
        pieces = [np.asarray(embeddings, dtype=np.float32)] if self.embedding else []
        values = (
            image_part if image_part is not None and self.per_image is not None else self.image_part(images)
        )
        if values is not None:
            pieces.append(values)
        out = np.concatenate(pieces, axis=1) if len(pieces) > 1 else pieces[0]
        if out.ndim != 2 or len(out) != len(embeddings):
            raise FeatureError(f"recipe {self.name} v{self.version} gave shape {out.shape}")
        return out

    def parts(self, embedding_dim: int) -> list[tuple[str, int, str]]:
        found = [("embedding", embedding_dim, EMBEDDING_WHAT)] if self.embedding else []
        return found + (self.image_layout(self.params) if self.image_layout is not None else [])

    def layout(self, embedding_dim: int) -> list[dict[str, Any]]:
        out, start = [], 0
        for name, length, what in self.parts(embedding_dim):
            out.append({"name": name, "start": start, "length": length, "what": what})
            start += length
        return out

    def width(self, embedding_dim: int) -> int:
        return sum(length for _, length, _ in self.parts(embedding_dim))

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


EMBEDDING_WHAT = "the embedder's output: global average pool of the last feature map"

RECIPES: dict[tuple[str, int], Recipe] = {
    ("lite0-gap", 1): Recipe("lite0-gap", 1, embedding=True),
    ("hand-rgb", 1): Recipe("hand-rgb", 1, False, hand_features, hand_layout, HAND_PARAMS, HAND_SLOTS),
    ("lite0-gap+hand-rgb", 1): Recipe(
        "lite0-gap+hand-rgb", 1, True, hand_features, hand_layout, HAND_PARAMS, HAND_SLOTS
    ),
    ("hand-rgb2", 1): Recipe("hand-rgb2", 1, False, hand2_features, hand2_layout, HAND2_PARAMS, HAND_SLOTS),
    ("lite0-gap+hand-rgb2", 1): Recipe(
        "lite0-gap+hand-rgb2", 1, True, hand2_features, hand2_layout, HAND2_PARAMS, HAND_SLOTS
    ),
}
# What a manifest, model or embedding cache without a `features` entry means: they predate
# recipes, when the forests read the embedding as it is.
LEGACY = RECIPES[("lite0-gap", 1)]


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
        return LEGACY
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
