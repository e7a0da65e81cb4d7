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
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import cv2
import numpy as np

from agent.stacks.labels import CHANNELS

_AUTO_BITS = (10, 12, 14, 16)
RESIZE_METHODS: Mapping[str, int] = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "nearest": cv2.INTER_NEAREST,
}


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
    """Apply the bit-depth policy to all channels of one stack."""
    if policy.mode == "percentile":
        return {name: _stretch(pixels, policy) for name, pixels in channels.items()}
    first = next(iter(channels.values()))
    if first.dtype == np.uint8:
        return dict(channels)
    bits = policy.bits or auto_bits(channels.values())
    scale = 255.0 / float(2**bits - 1)
    return {
        name: np.clip(np.rint(pixels.astype(np.float32) * scale), 0, 255).astype(np.uint8)
        for name, pixels in channels.items()
    }


def auto_bits(planes: Any) -> int:
    """Smallest usual camera bit depth that holds the brightest pixel of all planes."""
    peak = max(int(p.max()) for p in planes)
    for bits in _AUTO_BITS:
        if peak < 2**bits:
            return bits
    return 16


def _stretch(pixels: np.ndarray, policy: BitDepth) -> np.ndarray:
    low, high = np.percentile(pixels, (policy.low_percentile, policy.high_percentile))
    if high <= low:
        return np.zeros(pixels.shape, np.uint8)
    scaled = (pixels.astype(np.float32) - float(low)) * (255.0 / float(high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def preprocess(channels: Mapping[str, np.ndarray], prep: Preprocessing) -> np.ndarray:
    """The embedder's input for one stack: uint8, size x size x 3."""
    eight = to_uint8(channels, prep.bit_depth)
    interpolation = RESIZE_METHODS[prep.resize]
    size = (prep.size, prep.size)
    needed = {c for slot in prep.slots for c, _ in slot}
    small = {
        c: eight[c] if eight[c].shape == size else cv2.resize(eight[c], size, interpolation=interpolation)
        for c in needed
    }
    planes = []
    for slot in prep.slots:
        if len(slot) == 1 and slot[0][1] == 1.0:
            planes.append(small[slot[0][0]])
            continue
        mixed = sum(small[c].astype(np.float32) * w for c, w in slot)
        planes.append(np.clip(np.rint(mixed), 0, 255).astype(np.uint8))
    return np.ascontiguousarray(np.stack(planes, axis=-1))


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
