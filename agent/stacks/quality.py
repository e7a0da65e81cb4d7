"""Image-quality figures of one decoded stack, and the reasons not to trust its result.

Cheap enough for every stack on the device (under a millisecond for four 512 x 512
channels): each channel is looked at through a regular subsample about 128 pixels across
(every 4th pixel of a 512 x 512 channel, every 16th of a 2048 x 2048 one), and focus
through one about 256 across, so the cost hardly grows with the image size. Focus is
thereby judged at about the scale the model sees, whatever the camera's pixel count.

Figures (`measure`): flat numbers, named for the result document (`quality_<name>`). They
depend only on those subsamples, so a reader that decodes one channel at a time keeps each
channel's `sample` and lets the channel go; `measure_samples` then gives the same figures.

- `brightness_<channel>`: (99.9th - 1st percentile) / full scale, 0..1: how far the
  brightest structures rise above the channel's floor (camera offset, background).
- `saturated_<channel>`: share of the field at the channel's own maximum value, 0..1.
- `saturated_signal_<channel>`: share of the channel's stained pixels (above its Otsu
  threshold) that sit at that maximum, 0..1.
- `nucleus_fraction`: share of the field covered by nuclei (the blue channel's Otsu
  foreground), 0..1; 0 when that foreground does not stand out of the background noise.
- `nucleus_contrast`: how far that foreground stands out: mean inside minus mean outside
  (smoothed), over the pixel noise of the background. Below 3, what Otsu found is noise.
- `focus`: sharpness of the nucleus channel, the energy (sum of squares) of its Laplacian
  over that of its Sobel gradient. A characteristic spatial frequency: independent of
  brightness and of how many nuclei there are, it falls steeply as the image blurs (about
  0.08-0.28 for sharp real HPA fields, below 0.04 once blurred by a Gaussian of 1.5 px at
  512 px); 0 for a flat channel.

Full scale and saturation. 8-bit data: 255. 16-bit data: 2**bits - 1 with `bits` the
camera's bit depth when given, else the smallest of 12, 14 or 16 bits that holds the
brightest pixel of the stack (a 12-bit camera writing 16-bit files saturates at 4095, and
cameras for fluorescence have at least 12 bits). A channel's saturation is the share of its
pixels that sit exactly at its own maximum value, whatever that value is (so a camera that
clips at 4095, or at 65535 less an offset, is caught too), counted only when that maximum
is at least a quarter of the full scale and above the channel's minimum: a dim or flat
channel has many pixels at its maximum without any clipping.

Checks (`assess`) give short reason codes, each independent of the others:

- `empty_field`: nuclei cover less than 0.2% of the field (about half a nucleus in a
  512 x 512 HPA image), or nothing in the nucleus channel stands out of its noise. A blank
  nucleus channel gives it too, beside `dark_channel:blue`.
- `saturated:<channel>`: at least 10% of the field at the maximum, or at least 2% of it
  when that is also at least 60% of the channel's stained pixels (a sparse field whose
  cells are nearly all clipped). Real HPA images clip small bright structures routinely;
  those are not flagged.
- `dark_channel:<channel>`: brightness below 0.04 (about 10 of 255): wrong exposure or a
  missing stain.
- `out_of_focus`: focus below 0.04; not judged on an empty field.

With a reference (`reference_from` on the training stacks' figures, stored in the bundle),
focus and darkness are judged against the training range instead: `out_of_focus` below half
the training range's low end (its 0.5th percentile), `dark_channel` below half of its low
end (but always below 0.01), and `empty_field` also fires below a tenth of the training low
end of the nucleus fraction. Saturation is judged by the absolute rule only. The thresholds were
set on the 101 real HPA stacks and on synthetic ones, degraded on purpose
(docs/stacks.md#image-quality).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from agent.stacks.labels import CHANNELS

NUCLEUS_CHANNEL = "blue"
STATS_SIDE = 128  # per-channel figures and nuclei come from a subsample this many pixels across
FOCUS_SIDE = 256  # focus from a finer one
NOISE_FLOOR = 0.25  # pixel noise is taken as at least this, in the data's own units

# Absolute thresholds, set by measurement (docs/stacks.md#image-quality).
DARK_BRIGHTNESS = 0.04  # brightness below this: the channel is nearly black
SATURATED_SHARE = 0.10  # this share of a channel's field at its maximum: saturated, or
SATURATED_PART = 0.02  # this share of it when that is also
SATURATED_SIGNAL = 0.6  # this share of its stained pixels
EMPTY_NUCLEUS_FRACTION = 0.002  # nuclei cover less than this: an empty field
NUCLEUS_MIN_CONTRAST = 3.0  # Otsu's foreground standing out less than this is noise
FOCUS_MIN = 0.04  # focus below this: far out of focus

# Relative checks against a reference's training range.
REFERENCE_VERSION = 1
REFERENCE_PERCENTILES = (0.5, 50.0, 99.5)  # stored as low, median, high
FOCUS_FACTOR = 0.5  # out of focus: below half the training low end
DARK_FACTOR = 0.5  # dark: below half the training low end
DARK_FLOOR = 0.01  # ... and dark whatever the training range below this
EMPTY_FACTOR = 0.1  # empty: also below a tenth of the training low end


@dataclass(frozen=True)
class Samples:
    """What the figures need of one channel: its regular subsamples (small contiguous copies),
    so the full-resolution channel can be let go as soon as they are taken."""

    stats: np.ndarray  # about STATS_SIDE pixels across
    focus: np.ndarray | None  # about FOCUS_SIDE across, for the nucleus channel only
    # The nucleus channel's own figures (nucleus_fraction, nucleus_contrast, focus), measured
    # when it is sampled: on the device that is its reading thread, beside the other channels.
    nucleus: Mapping[str, float] | None = None


def sample(name: str, pixels: np.ndarray) -> Samples:
    """The subsamples of one decoded channel (uint8 or uint16, any size)."""
    pixels = np.asarray(pixels)
    if pixels.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{name} is {pixels.dtype}; quality figures need uint8 or uint16")
    stats = _sample(pixels, STATS_SIDE)
    if name != NUCLEUS_CHANNEL:
        return Samples(stats, None)
    focus = _sample(pixels, FOCUS_SIDE)
    return Samples(stats, focus, _nucleus_figures(stats, focus))


def measure(channels: Mapping[str, np.ndarray], bits: int | None = None) -> dict[str, float]:
    """The figures of one decoded stack (raw channels, uint8 or uint16, any size).

    `bits` is the camera's bit depth for 16-bit data when known (8..16; ignored for 8-bit
    data); see the module docstring.
    """
    _check_bits(bits)
    return measure_samples({c: sample(c, channels[c]) for c in CHANNELS if c in channels}, bits)


def measure_samples(samples: Mapping[str, Samples], bits: int | None = None) -> dict[str, float]:
    """The figures of one stack from its channels' `sample`s: the same as `measure`."""
    _check_bits(bits)
    stats = {c: samples[c].stats for c in CHANNELS if c in samples}
    full = _full_scale(stats, bits)
    figures = _channel_figures(stats, full)
    if NUCLEUS_CHANNEL in samples:
        nucleus = samples[NUCLEUS_CHANNEL].nucleus
        if nucleus is None:
            raise ValueError(
                f"the {NUCLEUS_CHANNEL} channel's samples lack its figures (`sample` makes them)"
            )
        figures.update(nucleus)
    return figures


def _nucleus_figures(stats: np.ndarray, focus: np.ndarray) -> dict[str, float]:
    fraction, contrast = _nuclei(stats.astype(np.float32))
    return {"nucleus_fraction": fraction, "nucleus_contrast": contrast, "focus": _focus(focus)}


def _check_bits(bits: int | None) -> None:
    if bits is not None and not 8 <= bits <= 16:
        raise ValueError(f"bits must be 8..16 or unset, not {bits}")


def reference_from(figures: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Training ranges of the figures (low, median and high percentiles); JSON-serialisable."""
    if not figures:
        raise ValueError("reference_from needs the figures of at least one stack")
    names = sorted(set().union(*(f.keys() for f in figures)))
    ranges: dict[str, dict[str, float]] = {}
    for name in names:
        values = np.array([float(f[name]) for f in figures if name in f], dtype=np.float64)
        low, median, high = np.percentile(values, REFERENCE_PERCENTILES)
        ranges[name] = {"low": float(low), "median": float(median), "high": float(high)}
    return {
        "version": REFERENCE_VERSION,
        "stacks": len(figures),
        "percentiles": list(REFERENCE_PERCENTILES),
        "figures": ranges,
    }


def assess(figures: Mapping[str, float], reference: Mapping[str, Any] | None) -> list[str]:
    """Reason codes for one stack's figures, [] when nothing is wrong (see the module doc)."""
    ranges = reference.get("figures") if isinstance(reference, Mapping) else None
    if not isinstance(ranges, Mapping):
        ranges = {}

    def low_end(name: str) -> float | None:
        entry = ranges.get(name)
        return float(entry["low"]) if isinstance(entry, Mapping) and "low" in entry else None

    reasons: list[str] = []
    empty = False
    fraction = figures.get("nucleus_fraction")
    if fraction is not None:
        floor = EMPTY_NUCLEUS_FRACTION
        low = low_end("nucleus_fraction")
        if low is not None:
            floor = max(floor, EMPTY_FACTOR * low)
        empty = fraction < floor
        if empty:
            reasons.append("empty_field")
    for name in CHANNELS:
        share = figures.get(f"saturated_{name}", 0.0)
        signal = figures.get(f"saturated_signal_{name}", 0.0)
        if share >= SATURATED_SHARE or (share >= SATURATED_PART and signal >= SATURATED_SIGNAL):
            reasons.append(f"saturated:{name}")
    for name in CHANNELS:
        brightness = figures.get(f"brightness_{name}")
        if brightness is None:
            continue
        low = low_end(f"brightness_{name}")
        floor = DARK_BRIGHTNESS if low is None else max(DARK_FLOOR, DARK_FACTOR * low)
        if brightness < floor:
            reasons.append(f"dark_channel:{name}")
    focus = figures.get("focus")
    if focus is not None and not empty:
        low = low_end("focus")
        floor = FOCUS_MIN if low is None else FOCUS_FACTOR * low
        if focus < floor:
            reasons.append("out_of_focus")
    return reasons


def _sample(pixels: np.ndarray, side: int) -> np.ndarray:
    """A regular subsample about `side` pixels across (a contiguous copy)."""
    step = max(1, -(-max(pixels.shape[:2]) // side))
    if step == 1:
        return np.ascontiguousarray(pixels)
    return np.ascontiguousarray(pixels[step // 2 :: step, step // 2 :: step])


def _full_scale(samples: Mapping[str, np.ndarray], bits: int | None) -> int:
    first = next(iter(samples.values()), None)
    if first is None or first.dtype == np.uint8:
        return 255
    if bits is None:
        peak = max(int(s.max()) for s in samples.values())
        bits = next((b for b in (12, 14) if peak < 2**b), 16)
    return 2**bits - 1


def _channel_figures(samples: Mapping[str, np.ndarray], full: int) -> dict[str, float]:
    """brightness_, saturated_ and saturated_signal_ of every channel, from 256-bin histograms
    in 1/256ths of the full scale (all channels at once: one histogram each, the rest in bulk)."""
    names = list(samples)
    if not names:
        return {}
    shift = max(0, full.bit_length() - 8)
    hists = np.empty((len(names), 256), np.float64)
    at_top = np.zeros(len(names), np.float64)
    for row, name in enumerate(names):
        sample = samples[name]
        view = sample if sample.dtype == np.uint8 else np.minimum(sample >> shift, 255).astype(np.uint8)
        hists[row] = cv2.calcHist([view], [0], None, [256], [0, 256]).ravel()
        lowest, top, _, _ = cv2.minMaxLoc(sample)
        if top > lowest and top >= full / 4:  # a flat or dim channel is not saturated
            at_top[row] = hists[row, int(top)] if view is sample else np.count_nonzero(sample == top)
    counts = np.cumsum(hists, axis=1)  # counts[:, v]: pixels at or below level v
    n = counts[:, -1:]
    low = np.count_nonzero(counts < 0.01 * n, axis=1)  # 1st percentile's level
    high = np.count_nonzero(counts < 0.999 * n, axis=1)  # 99.9th percentile's level
    brightness = np.maximum(high - low, 0) / 255.0
    # Otsu's threshold: the level that maximises the between-class variance
    share = counts / n
    moment = np.cumsum(hists * np.arange(256), axis=1) / n
    spread = share * (1.0 - share)
    between = np.zeros_like(spread)
    np.divide((moment[:, -1:] * share - moment) ** 2, spread, out=between, where=spread > 0)
    threshold = np.argmax(between, axis=1)
    stained = n[:, 0] - counts[np.arange(len(names)), threshold]
    figures: dict[str, float] = {}
    for row, name in enumerate(names):
        figures[f"brightness_{name}"] = float(brightness[row])
        figures[f"saturated_{name}"] = float(at_top[row] / n[row, 0])
        signal = at_top[row] / stained[row] if stained[row] > 0 else 0.0
        figures[f"saturated_signal_{name}"] = float(min(1.0, signal))
    return figures


def _nuclei(nucleus: np.ndarray) -> tuple[float, float]:
    """(share of the field covered by nuclei, their contrast over the background noise).

    Nuclei are the Otsu foreground of the smoothed nucleus channel, counted only when
    they stand out of the background by NUCLEUS_MIN_CONTRAST times the pixel noise (the
    background's scatter around the smoothed image): an empty field's noise splits too.
    """
    smooth = cv2.GaussianBlur(nucleus, (0, 0), 1.0)
    low, high, _, _ = cv2.minMaxLoc(smooth)
    if high - low <= 1e-6:
        return 0.0, 0.0
    scale = 255.0 / (high - low)
    scaled = cv2.convertScaleAbs(smooth, alpha=scale, beta=-low * scale)
    _, mask = cv2.threshold(scaled, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    covered = cv2.countNonZero(mask)
    if covered == 0 or covered == mask.size:
        return 0.0, 0.0
    background = cv2.bitwise_not(mask)
    inside = cv2.mean(smooth, mask=mask)[0]
    outside = cv2.mean(smooth, mask=background)[0]
    _, noise = cv2.meanStdDev(cv2.subtract(nucleus, smooth), mask=background)
    contrast = (inside - outside) / max(float(noise[0, 0]), NOISE_FLOOR)
    fraction = covered / mask.size if contrast >= NUCLEUS_MIN_CONTRAST else 0.0
    return float(fraction), float(contrast)


def _focus(nucleus: np.ndarray) -> float:
    """Energy of the Laplacian over the energy of the (Sobel) gradient: sums of squares.

    8-bit data take OpenCV's integer path (exact in 16 bits, the same figure, a third of the
    time); each derivative is reduced to its sum of squares before the next is made.
    """
    if nucleus.dtype == np.uint8:
        laplacian = cv2.norm(cv2.Laplacian(nucleus, cv2.CV_16S), cv2.NORM_L2SQR)
        dx, dy = cv2.spatialGradient(nucleus)
        gradient = cv2.norm(dx, cv2.NORM_L2SQR) + cv2.norm(dy, cv2.NORM_L2SQR)
    else:
        pixels = nucleus.astype(np.float32)
        laplacian = cv2.norm(cv2.Laplacian(pixels, cv2.CV_32F), cv2.NORM_L2SQR)
        gradient = cv2.norm(cv2.Sobel(pixels, cv2.CV_32F, 1, 0), cv2.NORM_L2SQR)
        gradient += cv2.norm(cv2.Sobel(pixels, cv2.CV_32F, 0, 1), cv2.NORM_L2SQR)
    if gradient <= 0:
        return 0.0
    return float(laplacian / gradient)
