"""Turn a decoded stack into the uint8 H x W x 3 image the embedder takes.

One function for the workstation and the device, so training and inference see identical
pixels; its settings travel in the bundle's manifest (`Preprocessing.to_dict`).

Bit-depth policy (how 12/16-bit channels become the 8-bit the model was trained on):
- mode "bits": value * 255 / (2**bits - 1), rounded. `bits` is the camera's real bit depth
  (12 for most sCMOS cameras writing 16-bit files). Left unset (auto), it is the smallest of
  10/12/14/16 that holds the brightest pixel of the stack, taken over all four channels so
  their relative brightness survives. Never a blind divide by 256: that maps a 12-bit image
  into 0..15, nearly black. 8-bit data pass through unchanged.
- mode "percentile": each channel stretched so its low/high percentiles map to 0/255, for
  data whose range varies wildly; it changes 8-bit data too, so use it for training as well.

Memory: a channel goes to 8 bits through a lookup table built with the policy's own float
arithmetic (the same pixels to the bit, without a float copy of the channel), and is resized
at once (`Reducer`), so a channel costs the device its full-resolution pixels and their
8-bit copy, and only while it is being read; `preprocess` gives the same image from a stack
whose channels are all at hand.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from agent.stacks.labels import CHANNELS
from agent.stacks.resize import RESIZE_METHODS, resize

_AUTO_BITS = (10, 12, 14, 16)


@dataclass(frozen=True)
class BitDepth:
    mode: str = "bits"  # "bits" or "percentile"
    bits: int | None = None  # for "bits": 9..16, or None = auto per stack
    low_percentile: float = 0.1
    high_percentile: float = 99.9

    def __post_init__(self) -> None:
        if self.mode not in ("bits", "percentile"):
            raise ValueError(f"bit_depth.mode must be 'bits' or 'percentile', not {self.mode!r}")
        if self.bits is not None and not 8 <= self.bits <= 16:
            raise ValueError(f"bit_depth.bits must be 8..16 or unset (auto), not {self.bits}")
        if not 0 <= self.low_percentile < self.high_percentile <= 100:
            raise ValueError("bit_depth percentiles must satisfy 0 <= low < high <= 100")


# Default input slots: the HPA convention R = microtubules, G = protein, B = nucleus.
DEFAULT_SLOTS: tuple[tuple[tuple[str, float], ...], ...] = (
    (("red", 1.0),),
    (("green", 1.0),),
    (("blue", 1.0),),
)


@dataclass(frozen=True)
class Preprocessing:
    """Everything that decides the pixels the embedder sees."""

    size: int = 224
    resize: str = "area"
    # For each of the 3 input slots, the channels mixed into it with their weights.
    slots: tuple[tuple[tuple[str, float], ...], ...] = DEFAULT_SLOTS
    bit_depth: BitDepth = field(default_factory=BitDepth)

    def __post_init__(self) -> None:
        if not 32 <= self.size <= 2048:
            raise ValueError(f"size must be 32..2048, not {self.size}")
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"resize must be one of {sorted(RESIZE_METHODS)}, not {self.resize!r}")
        if len(self.slots) != 3:
            raise ValueError(f"slots must list 3 input slots, not {len(self.slots)}")
        for slot in self.slots:
            if not slot:
                raise ValueError("every input slot needs at least one channel")
            for channel, weight in slot:
                if channel not in CHANNELS:
                    raise ValueError(f"slot channel {channel!r} is not one of {list(CHANNELS)}")
                if not 0 < weight <= 4:
                    raise ValueError(f"slot weight for {channel} must be in (0, 4], not {weight}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["slots"] = [[list(pair) for pair in slot] for slot in self.slots]
        out["dtype"] = "uint8"
        out["layout"] = "NHWC"
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessing:
        slots = tuple(tuple((str(c), float(w)) for c, w in slot) for slot in data["slots"])
        return cls(
            size=int(data["size"]),
            resize=str(data["resize"]),
            slots=slots,
            bit_depth=BitDepth(**data.get("bit_depth", {})),
        )


def to_uint8(channels: Mapping[str, np.ndarray], policy: BitDepth) -> dict[str, np.ndarray]:
    """Apply the bit-depth policy to all channels of one stack (full resolution)."""
    first = next(iter(channels.values()))
    if policy.mode == "bits" and first.dtype == np.uint8:
        return dict(channels)
    bits = _stack_bits(channels.values(), policy)
    return {name: eight_bit(pixels, policy, bits) for name, pixels in channels.items()}


def auto_bits(planes: Any) -> int:
    """Smallest usual camera bit depth that holds the brightest pixel of all planes."""
    return bits_for(max(int(p.max()) for p in planes))


def bits_for(peak: int) -> int:
    """Smallest usual camera bit depth (10, 12, 14 or 16) that holds `peak`."""
    for bits in _AUTO_BITS:
        if peak < 2**bits:
            return bits
    return 16


def eight_bit(pixels: np.ndarray, policy: BitDepth, bits: int | None) -> np.ndarray:
    """One channel through the bit-depth policy (`bits`: the stack's, for mode "bits").

    A lookup table from every possible value to its 8-bit value, computed with the very
    arithmetic of the policy (so the same pixels, exactly), applied in one pass: no float
    copy of the channel, and only its 8-bit result beside it.
    """
    if policy.mode == "percentile":
        low, high = np.percentile(pixels, (policy.low_percentile, policy.high_percentile))
        if high <= low:
            return np.zeros(pixels.shape, np.uint8)
        return _apply(_stretch_lut(pixels.dtype, float(low), float(high)), pixels)
    if pixels.dtype == np.uint8:
        return pixels
    if bits is None:
        raise ValueError("the bit depth of a 16-bit stack must be known to scale a channel")
    if _scales_exactly(bits):
        return np.asarray(cv2.convertScaleAbs(pixels, alpha=_bits_scale(bits)))
    return _apply(_bits_lut(bits), pixels)


def _bits_scale(bits: int) -> float:
    return 255.0 / float(2**bits - 1)


@lru_cache(maxsize=8)
def _bits_lut(bits: int) -> np.ndarray:
    levels = np.arange(65536, dtype=np.uint16)
    return np.clip(np.rint(levels.astype(np.float32) * _bits_scale(bits)), 0, 255).astype(np.uint8)


@lru_cache(maxsize=8)
def _scales_exactly(bits: int) -> bool:
    """Whether OpenCV's `convertScaleAbs` gives the lookup table's value for every one of the
    65,536 levels at this depth (checked once per depth, well under a millisecond).

    It is 11x faster than the table on a 2048 x 2048 channel (1.2 vs 13 ms: numpy's fancy
    indexing is the slow part of preprocessing at full resolution) and, with OpenCV 5.0,
    identical at every depth from 8 to 16 bits; an OpenCV that rounds otherwise falls back
    to the table, so the pixels, and the labels, never depend on which path ran.
    """
    levels = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    fast = cv2.convertScaleAbs(levels, alpha=_bits_scale(bits))
    return bool(np.array_equal(fast, _bits_lut(bits).reshape(256, 256)))


def _stretch_lut(dtype: np.dtype, low: float, high: float) -> np.ndarray:
    levels = np.arange(np.iinfo(dtype).max + 1, dtype=dtype)
    scaled = (levels.astype(np.float32) - low) * (255.0 / (high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _apply(lut: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return cv2.LUT(pixels, lut)
    return lut[pixels]


def _stack_bits(planes: Iterable[np.ndarray], policy: BitDepth) -> int | None:
    """The bit depth mode "bits" scales 16-bit channels by: the policy's, or auto."""
    if policy.mode != "bits":
        return None
    return policy.bits or auto_bits(planes)


class Reducer:
    """The embedder's input built one channel at a time, so that no full-resolution channel
    need outlive its own turn: `add` scales a channel to 8 bits and resizes it at once.

    With an automatic bit depth and 16-bit data, the stack's depth is known only once every
    channel's brightest pixel is: a channel is scaled by the depth of the brightest pixel
    seen so far (`add` in channel order), and `stale` names the channels whose guess the
    rest of the stack overturned; their caller adds them again. `peak` (the whole stack's
    brightest pixel) settles the depth up front when the caller has every channel already.
    Threads may add channels at once: each then passes `seen`, the brightest pixel of its
    channel and of those before it in channel order, so every channel is scaled as reading
    them in order would have scaled it, whichever finishes first.
    """

    def __init__(self, prep: Preprocessing, peak: int | None = None) -> None:
        self.prep = prep
        self.needed = {c for slot in prep.slots for c, _ in slot}
        self._peak = peak
        self._known = peak is not None
        self._small: dict[str, np.ndarray] = {}
        self._scaled_by: dict[str, int | None] = {}
        self._lock = threading.Lock()

    def cost(self, width: int, height: int, bits: int) -> int:
        """Bytes `add` holds beside a channel of this size at most: its 8-bit copy, and for
        percentile mode the sorted copy `np.percentile` makes."""
        cost = width * height if bits == 16 or self.prep.bit_depth.mode == "percentile" else 0
        if self.prep.bit_depth.mode == "percentile":
            cost += width * height * (2 if bits == 16 else 1)
        return cost

    def needs_peaks(self, pixels: np.ndarray) -> bool:
        """Whether this channel's scaling hangs on the brightest pixel of the channels before it
        (automatic bit depth, 16-bit data, the stack's peak not given)."""
        policy = self.prep.bit_depth
        auto = policy.mode == "bits" and policy.bits is None and pixels.dtype == np.uint16
        return auto and not self._known

    def peak_of(self, pixels: np.ndarray) -> int:
        """The channel's brightest pixel where the stack's bit depth depends on it, else 0."""
        return int(pixels.max()) if self.needs_peaks(pixels) else 0

    def add(self, name: str, pixels: np.ndarray, seen: int | None = None) -> None:
        """Take one channel into account and keep its reduced form (if a slot uses it)."""
        policy = self.prep.bit_depth
        auto = policy.mode == "bits" and policy.bits is None and pixels.dtype == np.uint16
        with self._lock:
            peak = self._peak
            if auto and not self._known:
                if seen is None:  # in channel order: this channel and the ones added before it
                    seen = max(self._peak or 0, self.peak_of(pixels))
                peak = seen
                self._peak = max(self._peak or 0, seen)
        if name not in self.needed:
            return
        bits: int | None = None
        if policy.mode == "bits" and pixels.dtype == np.uint16:
            bits = policy.bits or bits_for(peak or 0)
        eight = eight_bit(pixels, policy, bits)
        size = (self.prep.size, self.prep.size)
        if eight.shape != size:
            eight = resize(eight, size, self.prep.resize)
        with self._lock:
            self._scaled_by[name] = bits if auto else None
            self._small[name] = eight

    def stale(self) -> list[str]:
        """Channels scaled by a bit depth below the stack's, in channel order (whichever thread
        added them first): to be added again."""
        if self._peak is None:
            return []
        final = bits_for(self._peak)
        scaled = self._scaled_by
        return [c for c in CHANNELS if scaled.get(c) is not None and scaled[c] != final]

    def image(self) -> np.ndarray:
        """The embedder's input, uint8 size x size x 3."""
        missing = sorted(self.needed - set(self._small))
        if missing:
            raise ValueError(f"channel(s) {', '.join(missing)} were not added")
        stale = self.stale()
        if stale:
            raise ValueError(f"channel(s) {', '.join(stale)} must be added again at the stack's bit depth")
        planes = []
        for slot in self.prep.slots:
            if len(slot) == 1 and slot[0][1] == 1.0:
                planes.append(self._small[slot[0][0]])
                continue
            mixed = sum(self._small[c].astype(np.float32) * w for c, w in slot)
            planes.append(np.clip(np.rint(mixed), 0, 255).astype(np.uint8))
        return np.ascontiguousarray(np.stack(planes, axis=-1))


def preprocess(channels: Mapping[str, np.ndarray], prep: Preprocessing) -> np.ndarray:
    """The embedder's input for one stack whose channels are all at hand: uint8, size x size x 3."""
    policy = prep.bit_depth
    first = next(iter(channels.values()))
    peak = None
    if policy.mode == "bits" and policy.bits is None and first.dtype == np.uint16:
        peak = max(int(p.max()) for p in channels.values())
    reducer = Reducer(prep, peak)
    for name in CHANNELS:
        if name in reducer.needed:
            reducer.add(name, channels[name])
    return reducer.image()


def parse_slots(text: str) -> tuple[tuple[tuple[str, float], ...], ...]:
    """Read a channel mapping such as "red,green,blue" or "red+yellow*0.5,green,blue".

    Three comma-separated input slots; each a '+'-joined list of channels with an optional
    '*weight'. The result is validated by `Preprocessing`.
    """
    slots = []
    for part in text.split(","):
        slot = []
        for term in part.split("+"):
            name, _, weight = term.strip().partition("*")
            try:
                value = float(weight) if weight else 1.0
            except ValueError:
                raise ValueError(f"slot weight {weight!r} in {text!r} is not a number") from None
            slot.append((name.strip().lower(), value))
        slots.append(tuple(slot))
    if len(slots) != 3:
        raise ValueError(f"channel mapping {text!r} must name 3 input slots separated by commas")
    return tuple(slots)


def format_slots(slots: tuple[tuple[tuple[str, float], ...], ...]) -> str:
    """The inverse of `parse_slots`, for logs and reports."""
    return ",".join("+".join(c if w == 1.0 else f"{c}*{w:g}" for c, w in slot) for slot in slots)
