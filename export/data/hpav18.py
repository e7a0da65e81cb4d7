"""Read the HPA's external image set (HPAv18) as training data: one stack = four RGB JPEGs.

HPAv18 (about 74,000 stacks, used beside Kaggle's 31,072 by the 2018 competition's winners)
names its channel files `<antibody>_<plate>_<well>_<site>_<channel>.jpg` and saves each as
an RGB JPEG whose signal sits in colour planes: the red file in R, green in G, blue in B,
yellow in R and G. The rest of the pipeline (preprocessing, embeddings, hand features, the
device) expects what a microscope writes: one 2-D grayscale array per channel. This module
turns one HPAv18 file into that array, and refuses a file whose planes do not say what its
name says, because such a file would train the forests on the wrong channel without a sound.

Which plane is taken:
- red -> R, green -> G, blue -> B: the plane the HPA wrote the signal into, at full scale.
- yellow -> the rounded mean of R and G. Both hold the same signal at full scale, so the mean
  keeps the scale R alone would give while averaging the two planes' JPEG rounding errors
  (measured on the 101 real stacks re-encoded this way: mean error 1.33 grey levels against
  1.43 for R alone at quality 95).

What is checked, on the planes' mean brightness. JPEG stores colour at half resolution, so a
one-plane image leaks into the other planes beside fine structures; the thresholds come from
the 404 channel files of the 101 real stacks (../shared/hpa-real) re-encoded as HPAv18 JPEGs by
OpenCV: at quality 50 the brightest other plane reached 0.66 of the signal plane, and a yellow
file's dimmer signal plane never fell below 0.85 of the brighter one.
- a plane holds signal when its mean is at least SIGNAL_SHARE (0.75) of the brightest plane's;
- the planes holding signal must be the channel's: R, G, B, or R and G for yellow; a file
  whose signal sits elsewhere is refused naming the channel its planes look like (a green
  file with its signal in R looks like a red file: swapped or renamed);
- a yellow file's R and G must also agree pixel by pixel (a colour photograph can be bright in
  red and green by its means alone);
- signal in all three planes is a grayscale image saved as RGB (planes equal) or a colour
  photograph (planes differ): both refused;
- a channel whose brightest plane's mean is below BLANK_LEVEL (1 grey level) is taken as it
  is: an almost black image has no layout to judge (11 of the 404 real channels are).
Measured with those files: at quality 50 to 95 none is refused, and each one read as any of
the three other channels is refused, except the 11 almost black ones. Below quality 50 the
leak grows: at 40, eight dim channels (means of 1-2 grey levels) are refused as colour images.

Grayscale JPEGs (one plane, or three equal planes) are refused, not read as the channel: a
grayscale copy of an HPAv18 file is usually made by a luminance conversion (PIL's
`convert("L")`, OpenCV's IMREAD_GRAYSCALE: 0.299 R + 0.587 G + 0.114 B), which keeps a red
channel at 30 % of its brightness, green at 59 %, blue at 11 % and yellow at 89 %. Nothing in
one file tells such a copy from a channel saved at full scale, and training on dimmed channels
would teach the forests images the microscope never makes. Save a channel's own plane as a
PNG (read as the Kaggle layout), or keep the HPAv18 originals.

Files are recognised by content, not name: a `.png` holding JPEG data (a download that kept
the JPEG bytes under a .png name) is read here too (`is_jpeg`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

from agent.stacks import stack
from agent.stacks.errors import StackError
from agent.stacks.image import Channel, Header, Limits
from agent.stacks.labels import CHANNELS
from agent.stacks.naming import NamingScheme
from agent.stacks.stack import Stack

# Channel files named `<id>_<channel>.jpg` (or .jpeg): HPAv18's names, any id.
PATTERN = r"^(?P<id>.+)_(?P<channel>red|green|blue|yellow)\.jpe?g$"
NAMING = NamingScheme(pattern=PATTERN)

# Planes in RGB order as named in messages (OpenCV decodes to B, G, R).
PLANE_NAMES = ("red", "green", "blue")
# The planes each channel's signal sits in.
SIGNAL_PLANES: Mapping[str, frozenset[str]] = {
    "red": frozenset({"red"}),
    "green": frozenset({"green"}),
    "blue": frozenset({"blue"}),
    "yellow": frozenset({"red", "green"}),
}
SIGNAL_SHARE = 0.75
BLANK_LEVEL = 1.0
# Mean |R - G| over the mean of R and G that a yellow file may show (measured at most 0.18,
# quality 30; a colour photograph bright in red and green differs far more).
YELLOW_DISAGREEMENT = 0.35
# Planes whose means differ by less than this (grey levels) are equal: JPEG stores a gray
# image's colour as a constant, so its decoded planes differ only by rounding.
EQUAL_PLANES = 0.1

_SOI = b"\xff\xd8\xff"
_EOI = b"\xff\xd9"
# Start-of-frame markers (baseline, extended, progressive, lossless, arithmetic...): not C4
# (Huffman tables), C8 (reserved) or CC (arithmetic conditioning).
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def is_jpeg(path: Path) -> bool:
    """Whether the file's bytes are JPEG, whatever its name says (False if it cannot be read)."""
    try:
        with open(path, "rb") as handle:
            return handle.read(3) == _SOI
    except OSError:
        return False


def read_stack(stack_id: str, paths: Mapping[str, Path], limits: Limits = Limits()) -> Stack:
    """Decode the four HPAv18 JPEGs of one stack into the grayscale channels the pipeline uses:
    `agent.stacks.stack.read_stack`'s checks (all four present, of one size, the sha256 of every
    file's bytes so embed's cache fingerprints match the files) with this module's decoder."""
    return stack.read_stack(stack_id, paths, limits, reader=read_channel)


def read_channel(path: Path, channel: str, limits: Limits = Limits()) -> Channel:
    """Read, hash and decode one HPAv18 channel file into a 2-D uint8 array, or say why not."""
    if channel not in SIGNAL_PLANES:
        raise ValueError(f"channel must be one of {list(CHANNELS)}, not {channel!r}")
    data = _read_bytes(path, limits)
    header = jpeg_header(data, path)
    _check_size(header, path, limits)
    if not data.rstrip(b"\x00\r\n ").endswith(_EOI):
        raise StackError("truncated", "JPEG is truncated: it does not end with an end-of-image marker", path)
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None or pixels.shape[:2] != (header.height, header.width):
        raise StackError("corrupt", "JPEG data is corrupt and cannot be decoded", path)
    signal = plane(pixels, channel, path, header.samples)
    return Channel(pixels=signal, sha256=hashlib.sha256(data).hexdigest(), header=header)


def plane(bgr: np.ndarray, channel: str, path: Path, samples: int = 3) -> np.ndarray:
    """The channel's signal from a decoded H x W x 3 (B, G, R) image, after checking that the
    signal sits in the channel's planes; `samples` is the file's colour components (1 for a
    grayscale JPEG, which OpenCV decodes into three equal planes)."""
    # One contiguous array per plane (OpenCV's split and means: a 2048 x 2048 file is checked
    # in a few milliseconds, beside about 15 ms to decode it).
    blue, green, red = cv2.split(bgr)
    planes = {"red": red, "green": green, "blue": blue}
    means = {name: _mean(planes[name]) for name in PLANE_NAMES}
    if max(means.values()) >= BLANK_LEVEL:
        _check_layout(planes, channel, path, samples, means)
    if channel == "yellow":
        total = np.add(red, green, dtype=np.uint16)
        total += 1
        total >>= 1
        return total.astype(np.uint8)
    return planes[channel]


def _check_layout(
    planes: dict[str, np.ndarray], channel: str, path: Path, samples: int, means: dict[str, float]
) -> None:
    brightest = max(means.values())
    found = frozenset(name for name, mean in means.items() if mean >= SIGNAL_SHARE * brightest)
    figures = ", ".join(f"{name} {means[name]:.1f}" for name in PLANE_NAMES)
    expected = SIGNAL_PLANES[channel]
    if samples == 1 or (len(found) == 3 and _equal_planes(planes)):
        one = samples == 1
        kind = "a grayscale JPEG (one plane)" if one else "grayscale saved as RGB (three equal planes)"
        raise StackError(
            "grayscale_jpeg",
            f"{kind}, where HPAv18 stores the {channel} channel in the {_planes(expected)} of an RGB "
            "JPEG; a grayscale copy may come from a luminance conversion that dims red to 30 %, green "
            "to 59 %, blue to 11 %, so it is not read: use the HPAv18 original, or save the channel's "
            "own plane as a PNG",
            path,
        )
    if len(found) == 3 or found == frozenset({"red", "blue"}) or found == frozenset({"green", "blue"}):
        raise StackError(
            "colour_image",
            f"looks like a colour photograph, not an HPAv18 channel file: signal in the "
            f"{_planes(found)} (plane means {figures}), where the {channel} channel belongs in the "
            f"{_planes(expected)} only",
            path,
        )
    if found != expected:
        looks = next(name for name, planes in SIGNAL_PLANES.items() if planes == found)
        raise StackError(
            "wrong_plane",
            f"named the {channel} channel, but its signal is in the {_planes(found)} (plane means "
            f"{figures}), as in an HPAv18 {looks} file; HPAv18 puts {channel} in the "
            f"{_planes(expected)}: the file may be misnamed or swapped with the {looks} one",
            path,
        )
    if channel == "yellow":
        differences = _mean(cv2.absdiff(planes["red"], planes["green"]))
        disagreement = differences / max((means["red"] + means["green"]) / 2, 1e-6)
        if disagreement > YELLOW_DISAGREEMENT:
            raise StackError(
                "colour_image",
                f"its red and green planes are both bright but differ pixel by pixel (mean |R - G| is "
                f"{disagreement:.2f} of their mean brightness, at most {YELLOW_DISAGREEMENT} in an "
                "HPAv18 yellow file, where both hold the same signal): a colour image, not a yellow channel",
                path,
            )


def _equal_planes(planes: dict[str, np.ndarray]) -> bool:
    red = planes["red"]
    return all(_mean(cv2.absdiff(red, planes[name])) < EQUAL_PLANES for name in ("green", "blue"))


def _mean(pixels: np.ndarray) -> float:
    return float(cv2.mean(pixels)[0])


def _planes(names: frozenset[str]) -> str:
    ordered = [name for name in PLANE_NAMES if name in names]
    if len(ordered) == 1:
        return f"{ordered[0]} plane"
    return f"{', '.join(ordered[:-1])} and {ordered[-1]} planes"


def _read_bytes(path: Path, limits: Limits) -> bytes:
    try:
        size = path.stat().st_size
        if size > limits.max_bytes:
            raise StackError("too_large", f"file is larger than {limits.max_bytes} bytes", path)
        data = path.read_bytes()
    except FileNotFoundError:
        raise StackError("missing_file", "file does not exist", path) from None
    except PermissionError:
        raise StackError("unreadable", "permission denied", path) from None
    except IsADirectoryError:
        raise StackError("not_a_file", "is a directory, not an image file", path) from None
    except OSError as exc:
        raise StackError("unreadable", f"cannot be read: {exc.strerror or exc}", path) from None
    if not data:
        raise StackError("empty_file", "file is empty (0 bytes)", path)
    return data


def jpeg_header(data: bytes, path: Path) -> Header:
    """Size, precision and colour components from the JPEG's start-of-frame segment, read
    before decoding so that an oversized file is refused without allocating its pixels."""
    if not data.startswith(_SOI):
        raise StackError(
            "not_an_image",
            "not a JPEG file (no JPEG start-of-image marker), in a stack read as HPAv18, whose four "
            "channel files are JPEGs",
            path,
        )
    offset = 2
    while offset + 4 <= len(data):
        if data[offset] != 0xFF:
            raise StackError("corrupt", f"JPEG is corrupt: no segment marker at byte {offset}", path)
        marker = data[offset + 1]
        if marker == 0xFF:  # fill byte before a marker
            offset += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # segments without a length
            offset += 2
            continue
        length = int.from_bytes(data[offset + 2 : offset + 4], "big")
        if marker in _SOF:
            frame = data[offset + 4 : offset + 10]
            if len(frame) < 6:
                break
            height, width = int.from_bytes(frame[1:3], "big"), int.from_bytes(frame[3:5], "big")
            return Header("jpeg", width, height, bits=frame[0], samples=frame[5], pages=1)
        if marker == 0xDA:  # start of scan before any frame header
            break
        offset += 2 + length
    raise StackError("truncated", "JPEG is truncated or corrupt: no frame header before the image data", path)


def _check_size(header: Header, path: Path, limits: Limits) -> None:
    w, h = header.width, header.height
    if w == 0 or h == 0:
        raise StackError("corrupt", f"image has zero size ({w} x {h})", path)
    if header.bits != 8:
        message = f"{header.bits}-bit JPEG samples are not supported; HPAv18 files are 8-bit"
        raise StackError("unsupported_dtype", message, path)
    if header.samples not in (1, 3):
        raise StackError(
            "unsupported_format",
            f"JPEG has {header.samples} colour components (CMYK?); HPAv18 files are RGB",
            path,
        )
    if w > limits.max_side or h > limits.max_side or w * h * 3 > limits.max_pixels:
        raise StackError(
            "too_large",
            f"image is {w} x {h} pixels in 3 colour planes, above the limit of {limits.max_pixels} "
            f"pixels or {limits.max_side} per side (memory guard, each colour plane counted)",
            path,
        )
