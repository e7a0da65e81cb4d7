"""Decode one channel file (PNG or TIFF) into a 2-D uint8 or uint16 array, or say why not.

The header is read before any pixel is decoded so that a decompression bomb, a multi-page
TIFF or a colour image is refused cheaply and with a specific reason. The file is opened
once: its header, its sha256 and its pixels all come from that one open file, and a file
written to while it is read (its size or modification time moves) is refused, so the hash
always describes what was analysed.

Memory: only the decoded pixels are held, never the file's bytes. On Linux OpenCV decodes
the open file itself (through /proc/self/fd) into an array numpy owns, so a channel costs its
decoded size once (OpenCV >= 4.10; older versions make one more copy on the way to numpy);
elsewhere, or where a sandbox hides /proc/self/fd, the bytes are read once, hashed and
decoded from memory as before. `decode_cost` says how much a channel may take, for
`agent.stacks.budget`.

Speed: an uncompressed TIFF laid out simply is read straight into its pixel array, without a
decoder (`raw_layout`; the same pixels as OpenCV's), and hashed on the way; a bigger file
OpenCV decodes is hashed on a helper thread beside its decoding (HASH_BESIDE_BYTES), always
of the file's exact bytes (docs/benchmark.md#per-stack-at-2048-x-2048).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import struct
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import cv2
import numpy as np

from agent.stacks.errors import StackError
from agent.stacks.pools import pool

# Decoded samples per channel file (width x height x colour planes): a 16-bit 6000 x 6000
# channel is 72 MB. Channels are decoded one at a time, so this bounds one channel's memory.
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
_CHUNK = 1 << 20  # bytes hashed at a time


def _opencv_version() -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", cv2.__version__)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


# OpenCV >= 4.11 decodes into an array given to imread (4.10's, the agent-legacy install,
# returns it empty: measured), so the pixels are not copied from OpenCV's memory into numpy's.
DECODE_INTO = _opencv_version() >= (4, 11)
# Decode the open file through its descriptor (Linux), instead of from its bytes in memory.
DECODE_FROM_FD = os.path.isdir("/proc/self/fd")
_fd_names: bool | None = None  # whether /proc/self/fd/N opens here: found on the first file
# Uncompressed TIFFs laid out simply are read straight into their pixels (`raw_layout`);
# HPA_EDGE_RAW_TIFF=0 decodes them with OpenCV as before (for comparisons).
RAW_TIFF = os.environ.get("HPA_EDGE_RAW_TIFF", "1") != "0"
# Files from this size are hashed on a helper thread while OpenCV decodes them (a 2048 x 2048
# 16-bit channel: 6-7 ms of sha256 beside 20-30 ms of inflating); smaller ones are not worth it.
HASH_BESIDE_BYTES = 1 << 20
HASH_THREADS = 2  # one per decode thread of the agent
# Errors opening a file that say nothing about the file: the process's own limits (open files,
# memory), a disk or a network share failing for now (an interrupted call, Python retries
# itself). They are raised as they are, not as a verdict on the stack: the agent keeps the
# stack and tries it again (`agent.service.breaker`). Other errors (permission denied...) are
# the file's `unreadable`.
PASSING_ERRNOS = frozenset(
    {
        errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.EAGAIN, errno.EIO,
        errno.ESTALE, errno.ETIMEDOUT, errno.ENOTCONN, errno.ECONNRESET, errno.EHOSTDOWN,
        errno.EHOSTUNREACH, errno.ENETDOWN, errno.ENETUNREACH, errno.ENOLINK,
    }
)  # fmt: skip


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

    @property
    def planes(self) -> int:
        """Planes OpenCV decodes: 1 for grayscale; 3 for RGB or a palette, 4 with alpha."""
        return 1 if self.samples <= 1 else 3 if self.samples == 3 else 4

    @property
    def dtype(self) -> np.dtype:
        """The decoded array's type: OpenCV gives 16-bit samples as uint16, all others as uint8."""
        return np.dtype(np.uint16 if self.bits == 16 else np.uint8)

    @property
    def decoded_bytes(self) -> int:
        """The size of the decoded array, colour planes included."""
        return self.width * self.height * self.planes * self.dtype.itemsize


@dataclass(frozen=True)
class Channel:
    pixels: np.ndarray  # 2-D, uint8 or uint16
    sha256: str
    header: Header


class ChannelFile:
    """One channel file, open and its header checked; `read` hashes and decodes it.

    Made by `open_channel`; the size is known before any pixel is decoded (`header`,
    `decode_cost`), so a caller can wait for memory before `read`.
    """

    def __init__(
        self,
        path: Path,
        handle: BinaryIO,
        stat: os.stat_result,
        header: Header,
        raw: RawLayout | None = None,
    ) -> None:
        self.path = path
        self.header = header
        self.size = stat.st_size
        self._handle = handle
        self._identity = _identity(stat)
        self._raw = raw

    def decode_cost(self) -> int:
        """Bytes `read` may hold at its peak (`decode_cost`)."""
        return decode_cost(self.header, self.size)

    def read(self) -> Channel:
        """Hash and decode the file; refuse it if it changed meanwhile."""
        handle, path = self._handle, self.path
        handle.seek(0)
        if self._raw is not None:
            return self._read_raw(self._raw)
        digest = hashlib.sha256()
        data = b""
        from_fd = DECODE_FROM_FD and _fd_names_open(handle.fileno())
        hashing: Future[str] | None = None
        if from_fd and self.size >= HASH_BESIDE_BYTES:
            # The file hashed on another thread while OpenCV decodes it (both release the GIL;
            # the hash reads the file through its own offsets, a chunk at a time).
            hashing = pool("sha256", HASH_THREADS).submit(_hash_fd, handle.fileno())
        elif from_fd:
            for chunk in iter(lambda: handle.read(_CHUNK), b""):
                digest.update(chunk)
        else:
            data = handle.read(self.size + 1)
            digest.update(data)
        try:
            if from_fd:
                pixels = _decode_file(f"/proc/self/fd/{handle.fileno()}", self.header)
            else:
                pixels = _decode_bytes(data, self.header)
        except cv2.error as exc:
            raise StackError("corrupt", f"image cannot be decoded: {exc.msg.strip()}", path) from None
        finally:
            sha256 = hashing.result() if hashing is not None else digest.hexdigest()
        del data
        if _identity(os.fstat(handle.fileno())) != self._identity:
            raise StackError(
                "changed", "file changed while it was read (still being written?); not analysed", path
            )
        pixels = _checked(pixels, self.header, path)
        return Channel(pixels=pixels, sha256=sha256, header=self.header)

    def _read_raw(self, raw: RawLayout) -> Channel:
        """An uncompressed TIFF whose strips lie end to end: its pixel bytes read straight
        into the pixel array, every byte of the file hashed on the way, in file order (no
        decoder, no second copy). The same pixels as OpenCV's decode, in a third of the time."""
        header, path = self.header, self.path
        dtype = header.dtype.newbyteorder(raw.order)  # type: ignore[arg-type]
        pixels = np.empty((header.height, header.width), dtype)
        digest = hashlib.sha256()
        handle = self._handle
        complete = True
        for part in (
            memoryview(bytearray(raw.offset)),
            memoryview(pixels.reshape(-1).view(np.uint8)),  # type: ignore[arg-type]
            memoryview(bytearray(self.size - raw.offset - pixels.nbytes)),
        ):
            got = 0
            while got < len(part):
                n = handle.readinto(part[got:])  # type: ignore[attr-defined]
                if not n:
                    break
                got += n
            complete = complete and got == len(part)
            digest.update(part)
        sha256 = digest.hexdigest()
        if not complete or handle.read(1) or _identity(os.fstat(handle.fileno())) != self._identity:
            raise StackError(
                "changed", "file changed while it was read (still being written?); not analysed", path
            )
        if not dtype.isnative:
            pixels = pixels.astype(dtype.newbyteorder("="))
        return Channel(pixels=pixels, sha256=sha256, header=header)


def _hash_fd(fd: int) -> str:
    """The sha256 of an open file's bytes, read by offset (the file position is left alone)."""
    digest = hashlib.sha256()
    offset = 0
    while chunk := os.pread(fd, _CHUNK, offset):
        digest.update(chunk)
        offset += len(chunk)
    return digest.hexdigest()


def decode_cost(header: Header, size: int) -> int:
    """Bytes decoding a file of this header and size may hold at its peak (an upper bound).

    The decoded array; once more for a TIFF decoder's strip buffer (at worst one strip for
    the whole image), for the copy into numpy when OpenCV cannot decode into it, and for a
    decode from the bytes in memory, which are held too; the gray plane copied out of a
    colour-encoded file and the comparison of its planes.
    """
    decoded = header.decoded_bytes
    cost = decoded
    if header.format == "tiff":
        cost += decoded
    if not (DECODE_INTO and DECODE_FROM_FD):
        cost += decoded
    if not DECODE_FROM_FD:
        cost += size
    if header.planes > 1:
        cost += decoded // header.planes + header.width * header.height
    return cost


@contextmanager
def open_channel(path: Path, limits: Limits = Limits()) -> Iterator[ChannelFile]:
    """Open one channel file and check its size and header, without decoding it."""
    handle = _open(Path(path))
    try:
        stat = os.fstat(handle.fileno())
        size = stat.st_size
        if size == 0:
            raise StackError("empty_file", "file is empty (0 bytes)", path)
        if size > limits.max_bytes:
            raise StackError("too_large", f"file is larger than {limits.max_bytes} bytes", path)
        view = _FileView(handle, size)
        header = _read_header(view, Path(path))
        _check_header(header, Path(path), limits)
        raw = raw_layout(view, header) if header.format == "tiff" and RAW_TIFF else None
        yield ChannelFile(Path(path), handle, stat, header, raw)
    finally:
        handle.close()


def read_channel(path: Path, limits: Limits = Limits()) -> Channel:
    """Read, hash, check and decode one channel file."""
    with open_channel(path, limits) as channel:
        return channel.read()


def _open(path: Path) -> BinaryIO:
    """Open for reading, refusing a symbolic link at the open itself (O_NOFOLLOW), so a link
    put in place after the agent looked is not followed either."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        handle = os.fdopen(fd, "rb")
    except FileNotFoundError:
        raise StackError("missing_file", "file does not exist", path) from None
    except PermissionError:
        raise StackError("unreadable", "permission denied: the agent cannot read it", path) from None
    except IsADirectoryError:
        raise StackError("not_a_file", "is a directory, not an image file", path) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            message = "is a symbolic link; the agent reads only regular files"
            raise StackError("symlink", message, path) from None
        if exc.errno in PASSING_ERRNOS:
            raise  # the surroundings, not the file (PASSING_ERRNOS)
        raise StackError("unreadable", f"cannot be read: {exc.strerror or exc}", path) from None
    return handle


def _fd_names_open(fd: int) -> bool:
    """Whether the open file can be reopened by its /proc/self/fd name (once per process; a
    sandbox that hides it gets the decode from memory instead of a `corrupt` for every file)."""
    global _fd_names
    if _fd_names is None:
        try:
            os.close(os.open(f"/proc/self/fd/{fd}", os.O_RDONLY))
            _fd_names = True
        except OSError:
            _fd_names = False
    return _fd_names


def _identity(stat: os.stat_result) -> tuple[int, ...]:
    """What a write to the file changes: its size or its modification time. Not its status
    change time, which a rename, a chmod or a hard link elsewhere also moves."""
    return (stat.st_size, stat.st_mtime_ns)


class _FileView:
    """Bytes at an offset of an open file (a short read near the end, as slicing would)."""

    def __init__(self, handle: BinaryIO, size: int) -> None:
        self._fd = handle.fileno()
        self.size = size

    def at(self, offset: int, length: int) -> bytes:
        if offset >= self.size or length <= 0:
            return b""
        return os.pread(self._fd, length, offset)


class _BytesView:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def at(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]


def read_header(data: bytes, path: Path) -> Header:
    """The header of a file whose bytes are in memory."""
    return _read_header(_BytesView(data), path)


def _read_header(view: _FileView | _BytesView, path: Path) -> Header:
    start = view.at(0, 33)
    if start.startswith(_PNG_SIGNATURE):
        return _png_header(start, view, path)
    if start[:4] in (_TIFF_LE, _TIFF_BE):
        return _tiff_header(start, view, path)
    if start[:4] in (_BIGTIFF_LE, _BIGTIFF_BE):
        raise StackError("unsupported_format", "BigTIFF is not supported; save as TIFF or PNG", path)
    raise StackError("not_an_image", "not a PNG or TIFF file (unknown signature)", path)


def _png_header(start: bytes, view: _FileView | _BytesView, path: Path) -> Header:
    if len(start) < 33 or start[12:16] != b"IHDR":
        raise StackError("corrupt", "PNG is truncated or corrupt: no IHDR header", path)
    width, height, bits, colour = struct.unpack(">IIBB", start[16:26])
    samples = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}.get(colour)
    if samples is None:
        raise StackError("corrupt", f"PNG has an invalid colour type {colour}", path)
    # A PNG ends with an IEND chunk; without it the file was cut short (e.g. still being copied).
    if view.at(view.size - 12, 8) != b"\x00\x00\x00\x00IEND":
        raise StackError("truncated", "PNG is truncated: it does not end with an IEND chunk", path)
    return Header("png", width, height, bits, samples, 1)


def _tiff_header(start: bytes, view: _FileView | _BytesView, path: Path) -> Header:
    order = "<" if start[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(order + "I", start, 4)
        (count,) = struct.unpack_from(order + "H", view.at(ifd, 2))
        entries = view.at(ifd + 2, 12 * count + 4)
        tags: dict[int, int] = {}
        for i in range(count):
            tag, kind, n, raw = struct.unpack_from(order + "HHI4s", entries, 12 * i)
            if tag not in _TIFF_TAGS or kind not in (3, 4):  # 3 = SHORT, 4 = LONG
                continue
            fmt = order + ("H" if kind == 3 else "I")
            size = struct.calcsize(fmt)
            # Values that fit in 4 bytes sit in the entry; longer lists sit at an offset.
            if n * size <= 4:
                (tags[tag],) = struct.unpack(fmt, raw[:size])
            else:
                (offset,) = struct.unpack(order + "I", raw)
                (tags[tag],) = struct.unpack_from(fmt, view.at(offset, size))
        (next_ifd,) = struct.unpack_from(order + "I", entries, 12 * count)
    except struct.error:
        raise StackError("truncated", "TIFF is truncated: its directory lies beyond the end", path) from None
    if 256 not in tags or 257 not in tags:
        raise StackError("corrupt", "TIFF has no image width or length tag", path)
    pages = 2 if next_ifd else 1
    return Header("tiff", tags[256], tags[257], tags.get(258, 1), tags.get(277, 1), pages)


@dataclass(frozen=True)
class RawLayout:
    """Where an uncompressed TIFF's pixels lie: one run of bytes from `offset`."""

    order: str  # "<" or ">"
    offset: int


# Tags a raw file may carry with only these values (absent is the default, the first value).
_RAW_TAGS = {259: (1,), 262: (1,), 266: (1,), 274: (1,), 284: (1, 2), 317: (1,), 339: (1,)}
# compression none, photometric min-is-black, fill order, orientation, planar, no predictor,
# unsigned integers. Tiles (322, 323, 324, 325), colour maps and extra samples: OpenCV's way.
_RAW_REFUSE = {320, 322, 323, 324, 325, 338}


def raw_layout(view: _FileView | _BytesView, header: Header) -> RawLayout | None:
    """The layout of a one-plane 8- or 16-bit uncompressed TIFF whose strips follow each other
    without a gap and hold exactly the image; None for anything else (decoded by OpenCV)."""
    if header.samples != 1 or header.bits not in (8, 16) or header.pages != 1:
        return None
    start = view.at(0, 8)
    order = "<" if start[:2] == b"II" else ">"
    try:
        (ifd,) = struct.unpack_from(order + "I", start, 4)
        (count,) = struct.unpack_from(order + "H", view.at(ifd, 2))
        entries = view.at(ifd + 2, 12 * count)
        lists: dict[int, list[int]] = {}
        for i in range(count):
            tag, kind, n, raw = struct.unpack_from(order + "HHI4s", entries, 12 * i)
            if tag in _RAW_REFUSE:
                return None
            if tag not in _RAW_TAGS and tag not in (273, 279):
                continue
            if kind not in (3, 4) or n == 0 or n > 1 << 20:
                return None
            fmt = "H" if kind == 3 else "I"
            size = struct.calcsize(fmt) * n
            data = raw[:size] if size <= 4 else view.at(struct.unpack(order + "I", raw)[0], size)
            if len(data) != size:
                return None
            lists[tag] = list(struct.unpack(order + fmt * n, data))
    except struct.error:
        return None
    for tag, allowed in _RAW_TAGS.items():
        if tag in lists and lists[tag][0] not in allowed:
            return None
    offsets, counts = lists.get(273), lists.get(279)
    if not offsets or not counts or len(offsets) != len(counts):
        return None
    itemsize = header.dtype.itemsize
    for i in range(len(offsets) - 1):
        if offsets[i] + counts[i] != offsets[i + 1]:
            return None
    if sum(counts) != header.width * header.height * itemsize or offsets[0] % itemsize:
        return None
    if offsets[0] + sum(counts) > view.size:
        return None  # cut short: OpenCV's decode says so
    return RawLayout(order, offsets[0])


def _check_header(header: Header, path: Path, limits: Limits) -> None:
    w, h = header.width, header.height
    if w == 0 or h == 0:
        raise StackError("corrupt", f"image has zero size ({w} x {h})", path)
    planes = header.planes
    if w > limits.max_side or h > limits.max_side or w * h * planes > limits.max_pixels:
        colour = f" in {planes} colour planes" if planes > 1 else ""
        raise StackError(
            "too_large",
            f"image is {w} x {h} pixels{colour}, above the limit of {limits.max_pixels} pixels "
            f"or {limits.max_side} per side (decompression-bomb and memory guard, each colour "
            "plane counted; see limits in the config)",
            path,
        )
    if header.pages > 1:
        raise StackError("multi_page", "TIFF has more than one page; one plane per file is expected", path)
    if header.bits not in (1, 2, 4, 8, 16) or (header.format == "tiff" and header.bits not in (8, 16)):
        raise StackError(
            "unsupported_dtype", f"{header.bits}-bit samples are not supported; use 8 or 16 bit", path
        )


def _decode_file(name: str, header: Header) -> np.ndarray | None:
    if not DECODE_INTO:
        return cv2.imread(name, cv2.IMREAD_UNCHANGED)
    # An empty array: OpenCV allocates the image through numpy's allocator (no copy), and a
    # file it cannot decode leaves it empty (a preallocated array would come back untouched).
    pixels = cv2.imread(name, np.empty((0, 0), np.uint8), cv2.IMREAD_UNCHANGED)
    return None if pixels is None or pixels.size == 0 else pixels


def _decode_bytes(data: bytes, header: Header) -> np.ndarray | None:
    return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)


def _checked(pixels: np.ndarray | None, header: Header, path: Path) -> np.ndarray:
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
