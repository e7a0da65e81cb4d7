"""Shrinking one 8-bit channel to the embedder's size: OpenCV's resize, with its area
interpolation done as two small matrix products where that gives the same pixels, faster.

Area interpolation averages the source pixels each destination pixel covers, weighted by the
share of each it covers. Between a source side `src` and a destination side `dst` the weights
repeat every p = src / gcd(src, dst) source pixels (64 -> 7 from 2048 to 224, 16 -> 7 from 512),
so a channel is, per band of rows, one product with the small vertical weight matrix and one
with the horizontal one: at 2048 -> 224 about half the time of cv2.resize on the 2-core test
machine (docs/benchmark.md).

Exactly OpenCV's pixels, not nearly: every weight is j / p, so when p is a power of two
(2048, 1024, 512 -> 224) the weights, their products with 8-bit values and every partial sum
are exact in float32 (at most 8 + 2 log2 p significant bits, under 24 for p <= 256), and any
order of summing gives the same value as OpenCV's, which then rounds the same way (half to
even). Other periods (2560 x 2160 -> 224: 80 and 270) leave a rounding error whose order
matters, and a pixel whose exact value ends in .5 can then round the other way (seen on a
checkerboard of 3 and 4): those sizes stay with OpenCV, as do integer factors (its own integer
path), enlarging and long periods. tests/test_resize.py compares both on real channels and
on adversarial patterns.

Imports numpy and OpenCV only.
"""

from __future__ import annotations

import functools
from math import gcd

import cv2
import numpy as np

RESIZE_METHODS: dict[str, int] = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}
# Longest period (source pixels, a power of two) done as matrix products: exact sums need
# 8 + 2 log2(period) bits of float32's 24.
MAX_PERIOD = 256
# float32 bytes of source rows converted at once: bounds the memory beside the channel.
BAND_BYTES = 2 << 20


def resize(plane: np.ndarray, size: tuple[int, int], method: str) -> np.ndarray:
    """`plane` (uint8 H x W) at `size` (width, height), as cv2.resize with `method` gives it."""
    if method == "area":
        shrunk = area_shrink(plane, size)
        if shrunk is not None:
            return shrunk
    resized: np.ndarray = cv2.resize(plane, size, interpolation=RESIZE_METHODS[method])
    return resized


def area_shrink(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray | None:
    """cv2.resize(plane, size, interpolation=cv2.INTER_AREA) as matrix products, or None where
    OpenCV does it (see the module docstring)."""
    width, height = size
    h, w = plane.shape
    if plane.dtype != np.uint8 or not (0 < height <= h and 0 < width <= w):
        return None
    if h % height == 0 and w % width == 0:
        return None  # OpenCV's integer path
    rows, cols = gcd(h, height), gcd(w, width)
    period_y, period_x = h // rows, w // cols
    if not (_exact(period_y) and _exact(period_x)):
        return None
    vertical = _weights(period_y, height // rows)  # destination x source rows of one period
    horizontal = _weights(period_x, width // cols).T  # source x destination columns of one period
    out = np.empty((height, width), np.float32)
    step = max(1, BAND_BYTES // (period_y * w * 4))  # periods of rows per band
    for first in range(0, rows, step):
        last = min(rows, first + step)
        band = plane[first * period_y : last * period_y].astype(np.float32).reshape(-1, period_y, w)
        shrunk_rows = np.matmul(vertical, band).reshape(-1, cols, period_x)
        top = first * len(vertical)
        out[top : top + len(shrunk_rows)] = np.matmul(shrunk_rows, horizontal).reshape(-1, width)
    return np.rint(out, out=out).astype(np.uint8)  # exact values in 0..255: no clipping needed


def _exact(period: int) -> bool:
    return 1 < period <= MAX_PERIOD and period & (period - 1) == 0


@functools.cache
def _weights(src: int, dst: int) -> np.ndarray:
    """float32 dst x src: the share of source pixel s in destination pixel d, for dst < src
    (each destination pixel covers src / dst source pixels; each row sums to 1)."""
    # In units of 1 / dst of a source pixel, every bound is an integer: exact arithmetic.
    starts = np.arange(dst)[:, None] * src
    pixels = np.arange(src)[None, :] * dst
    covered = np.minimum(starts + src, pixels + dst) - np.maximum(starts, pixels)
    weights: np.ndarray = (np.maximum(covered, 0) / src).astype(np.float32)
    return weights
