"""Decode one channel file (PNG or TIFF) into a 2-D uint8 or uint16 array, or say why not.

The header is read before any pixel is decoded so that a decompression bomb, a multi-page
TIFF or a colour image is refused cheaply and with a specific reason. The bytes are read
once: the same bytes are hashed and decoded, so the hash always describes what was analysed.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from agent.stacks.errors import StackError

# A 16-bit 6000 x 6000 channel is 72 MB; four of them is the most a small board should hold.
DEFAULT_MAX_PIXELS = 40_000_000
DEFAULT_MAX_SIDE = 16_384
DEFAULT_MAX_BYTES = 512 * 1024 * 1024

# Decode failures are reported as StackError naming the file; OpenCV's own stderr chatter
# about the same failure would only add unstructured lines to the journal.
# (OpenCV < 4.11, as in the agent-legacy install, lacks cv2.utils.logging: keep its chatter.)
if hasattr(cv2, "utils") and hasattr(cv2.utils, "logging"):
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_LE, _TIFF_BE = b"II*\x00", b"MM\x00*"
_BIGTIFF_LE, _BIGTIFF_BE = b"II+\x00", b"MM\x00+"
_TIFF_TAGS = (256, 257, 258, 277)  # width, length, bits per sample, samples per pixel


@dataclass(frozen=True)
class Limits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_side: int = DEFAULT_MAX_SIDE
    max_bytes: int = DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class Header:
    """What the file says about itself before decoding."""

    format: str  # "png" or "tiff"
    width: int
    height: int
    bits: int  # bits per sample as stored
    samples: int  # samples per pixel (1 = grayscale)
    pages: int  # 1 for PNG; TIFF: 1, or 2 meaning "more than one"


@dataclass(frozen=True)
class Channel:
    pixels: np.ndarray  # 2-D, uint8 or uint16
    sha256: str
    header: Header


def read_channel(path: Path, limits: Limits = Limits()) -> Channel:
    """Read, hash, check and decode one channel file."""
    data = _read_bytes(path, limits)
    header = read_header(data, path)
    _check_header(header, path, limits)
    pixels = _decode(data, header, path)
    return Channel(pixels=pixels, sha256=hashlib.sha256(data).hexdigest(), header=header)


def _read_bytes(path: Path, limits: Limits) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read(limits.max_bytes + 1)
    except FileNotFoundError:
        raise StackError("missing_file", "file does not exist", path) from None
    except PermissionError:
        raise StackError("unreadable", "permission denied: the agent cannot read it", path) from None
    except IsADirectoryError:
        raise StackError("not_a_file", "is a directory, not an image file", path) from None
    except OSError as exc:
        raise StackError("unreadable", f"cannot be read: {exc.strerror or exc}", path) from None
    if not data:
        raise StackError("empty_file", "file is empty (0 bytes)", path)
    if len(data) > limits.max_bytes:
        raise StackError("too_large", f"file is larger than {limits.max_bytes} bytes", path)
    return data


def read_header(data: bytes, path: Path) -> Header:
    if data.startswith(_PNG_SIGNATURE):
        return _png_header(data, path)
    if data[:4] in (_TIFF_LE, _TIFF_BE):
        return _tiff_header(data, path)
    if data[:4] in (_BIGTIFF_LE, _BIGTIFF_BE):
        raise StackError("unsupported_format", "BigTIFF is not supported; save as TIFF or PNG", path)
    raise StackError("not_an_image", "not a PNG or TIFF file (unknown signature)", path)


def _png_header(data: bytes, path: Path) -> Header:
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise StackError("corrupt", "PNG is truncated or corrupt: no IHDR header", path)
    width, height, bits, colour = struct.unpack(">IIBB", data[16:26])
    samples = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour)
    if samples is None:
        raise StackError("corrupt", f"PNG has an invalid colour type {colour}", path)
    # A PNG ends with an IEND chunk; without it the file was cut short (e.g. still being copied).
    if data[-12:-4] != b"\x00\x00\x00\x00IEND":
        raise StackError("truncated", "PNG is truncated: it does not end with an IEND chunk", path)
    return Header("png", width, height, bits, samples, 1)


def _tiff_header(data: bytes, path: Path) -> Header:
    order = "<" if data[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(order + "I", data, 4)
        (count,) = struct.unpack_from(order + "H", data, ifd)
        tags: dict[int, int] = {}
        for i in range(count):
            tag, kind, n, raw = struct.unpack_from(order + "HHI4s", data, ifd + 2 + 12 * i)
            if tag not in _TIFF_TAGS or kind not in (3, 4):  # 3 = SHORT, 4 = LONG
                continue
            fmt = order + ("H" if kind == 3 else "I")
            size = struct.calcsize(fmt)
            # Values that fit in 4 bytes sit in the entry; longer lists sit at an offset.
            if n * size <= 4:
                (tags[tag],) = struct.unpack(fmt, raw[:size])
            else:
                (offset,) = struct.unpack(order + "I", raw)
                (tags[tag],) = struct.unpack_from(fmt, data, offset)
        (next_ifd,) = struct.unpack_from(order + "I", data, ifd + 2 + 12 * count)
    except struct.error:
        raise StackError("truncated", "TIFF is truncated: its directory lies beyond the end", path) from None
    if 256 not in tags or 257 not in tags:
        raise StackError("corrupt", "TIFF has no image width or length tag", path)
    pages = 2 if next_ifd else 1
    return Header("tiff", tags[256], tags[257], tags.get(258, 1), tags.get(277, 1), pages)


def _check_header(header: Header, path: Path, limits: Limits) -> None:
    w, h = header.width, header.height
    if w == 0 or h == 0:
        raise StackError("corrupt", f"image has zero size ({w} x {h})", path)
    if w > limits.max_side or h > limits.max_side or w * h > limits.max_pixels:
        raise StackError(
            "too_large",
            f"image is {w} x {h} pixels, above the limit of {limits.max_pixels} pixels "
            f"or {limits.max_side} per side (decompression-bomb guard; see limits in the config)",
            path,
        )
    if header.pages > 1:
        raise StackError("multi_page", "TIFF has more than one page; one plane per file is expected", path)
    if header.bits not in (1, 2, 4, 8, 16) or (header.format == "tiff" and header.bits not in (8, 16)):
        raise StackError(
            "unsupported_dtype", f"{header.bits}-bit samples are not supported; use 8 or 16 bit", path
        )


def _decode(data: bytes, header: Header, path: Path) -> np.ndarray:
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        pixels = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise StackError("corrupt", f"image cannot be decoded: {exc.msg.strip()}", path) from None
    if pixels is None:
        raise StackError("corrupt", f"{header.format.upper()} data is corrupt or truncated", path)
    if pixels.dtype not in (np.uint8, np.uint16):
        raise StackError(
            "unsupported_dtype", f"pixel type {pixels.dtype} is not supported; use 8 or 16 bit", path
        )
    if pixels.ndim == 3:
        pixels = _gray_from_colour(pixels, path)
    if pixels.shape != (header.height, header.width):
        raise StackError("corrupt", f"decoded size {pixels.shape} differs from the header", path)
    return np.ascontiguousarray(pixels)


def _gray_from_colour(pixels: np.ndarray, path: Path) -> np.ndarray:
    """Accept grayscale saved as RGB (all colour planes equal); refuse a real colour image."""
    planes = pixels[..., : min(3, pixels.shape[2])]
    first = planes[..., 0]
    if all(np.array_equal(first, planes[..., i]) for i in range(1, planes.shape[2])):
        return first
    raise StackError(
        "colour_image",
        f"colour image ({pixels.shape[2]} channels) where a single grayscale channel is expected",
        path,
    )
