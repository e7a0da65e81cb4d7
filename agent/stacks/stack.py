"""Read one stack: its four channel files, checked against each other, with their hashes.

`read_stack` holds the four decoded channels (the workstation, `check-stack`); `read_reduced`
is the device's way: one channel at a time, each reduced to what the model and the quality
checks need before the next is decoded, so a stack costs about one channel's memory.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from agent.stacks import quality
from agent.stacks.budget import Budget
from agent.stacks.errors import StackError
from agent.stacks.image import Channel, ChannelFile, Limits, open_channel, read_channel
from agent.stacks.labels import CHANNELS
from agent.stacks.naming import NamingScheme
from agent.stacks.preprocess import Preprocessing, Reducer


@dataclass(frozen=True)
class Stack:
    stack_id: str
    channels: Mapping[str, np.ndarray]  # red/green/blue/yellow -> 2-D uint8 or uint16
    sha256: Mapping[str, str]
    paths: Mapping[str, Path]

    @property
    def shape(self) -> tuple[int, int]:
        height, width = self.channels["red"].shape
        return height, width

    @property
    def dtype(self) -> np.dtype:
        return self.channels["red"].dtype


# Reads, hashes and decodes one channel file: (path, channel name, limits) -> Channel.
ChannelReader = Callable[[Path, str, Limits], Channel]


def _read_image_file(path: Path, channel: str, limits: Limits) -> Channel:
    return read_channel(path, limits)  # a PNG or TIFF holds its channel whatever its name


def read_stack(
    stack_id: str,
    paths: Mapping[str, Path],
    limits: Limits = Limits(),
    reader: ChannelReader = _read_image_file,
) -> Stack:
    """Decode and check the four channels of one stack, all held at full resolution.

    All four must be present, of one shape and one bit depth: the model sees them as one
    image, and a mismatch means a mixed-up acquisition, not something to paper over.
    For the workstation and checks; the device reads with `read_reduced`. `reader` decodes
    one file (the workstation's HPAv18 JPEGs need the channel's name to pick its plane).
    """
    _check_complete(stack_id, paths)
    decoded = {c: reader(Path(paths[c]), c, limits) for c in CHANNELS}
    for channel in CHANNELS[1:]:
        mismatch = _mismatch(channel, decoded[channel].pixels, decoded["red"].pixels, Path(paths[channel]))
        if mismatch is not None:
            raise mismatch
    return Stack(
        stack_id=stack_id,
        channels={c: decoded[c].pixels for c in CHANNELS},
        sha256={c: decoded[c].sha256 for c in CHANNELS},
        paths={c: Path(paths[c]) for c in CHANNELS},
    )


@dataclass(frozen=True)
class Reduced:
    """One stack read the device's way: its files' hashes, the embedder's input and the
    image-quality figures, and no full-resolution pixels."""

    stack_id: str
    sha256: Mapping[str, str]
    paths: Mapping[str, Path]
    shape: tuple[int, int]  # height, width of every channel
    dtype: np.dtype
    image: np.ndarray  # uint8 size x size x 3 (`preprocess.Reducer.image`)
    quality: dict[str, float]  # `quality.measure_samples` of the four channels
    decode_seconds: float  # spent reading, hashing and decoding files (the rest: reducing)
    decoded_again: tuple[str, ...]  # channels decoded twice (the stack's bit depth came late)


def read_reduced(
    stack_id: str,
    paths: Mapping[str, Path],
    prep: Preprocessing,
    limits: Limits = Limits(),
    bits: int | None = None,
    budget: Budget | None = None,
) -> Reduced:
    """Read one stack a channel at a time: decode it, hash it, take what the quality figures
    and the embedder need of it, let the full-resolution pixels go, then the next channel.

    The same checks, errors (in the same order), hashes, figures and image as `read_stack`
    followed by `quality.measure` and `preprocess`. `bits` is the camera's bit depth for
    the quality figures (`quality.measure`). With `budget`, each channel waits until what it
    will hold fits beside the other decode threads' channels (`agent.stacks.budget`). A
    channel scaled before the stack's automatic bit depth was known is decoded again
    (`preprocess.Reducer`); its file must still have the same sha256.
    """
    _check_complete(stack_id, paths)
    reducer = Reducer(prep)
    samples: dict[str, quality.Samples] = {}
    sha256: dict[str, str] = {}
    first: tuple[tuple[int, int], np.dtype] | None = None
    mismatch: StackError | None = None
    decoding = 0.0
    with _Ahead(paths, limits) as ahead:
        for name in CHANNELS:
            path = Path(paths[name])
            with ahead.open(name) as file, _reserve(budget, file, reducer):
                began = time.perf_counter()
                channel = file.read()
                decoding += time.perf_counter() - began
                sha256[name] = channel.sha256
                pixels = channel.pixels
                del channel
                if first is None:
                    first = (pixels.shape, pixels.dtype)
                elif mismatch is None:
                    mismatch = _mismatch(name, pixels, first, path)
                if mismatch is None:
                    samples[name] = quality.sample(name, pixels)
                    reducer.add(name, pixels)
                del pixels  # the full-resolution channel goes before the next is decoded
    if mismatch is not None:
        raise mismatch  # after every file was read: a file's own error comes first, as in read_stack
    again = tuple(reducer.stale())
    for name in again:
        path = Path(paths[name])
        with open_channel(path, limits) as file, _reserve(budget, file, reducer):
            began = time.perf_counter()
            channel = file.read()
            decoding += time.perf_counter() - began
            if channel.sha256 != sha256[name]:
                raise StackError("changed", "file changed while the stack was read; not analysed", path)
            reducer.add(name, channel.pixels)
            del channel
    assert first is not None
    return Reduced(
        stack_id=stack_id,
        sha256=sha256,
        paths={c: Path(paths[c]) for c in CHANNELS},
        shape=(int(first[0][0]), int(first[0][1])),
        dtype=first[1],
        image=reducer.image(),
        quality=quality.measure_samples(samples, bits),
        decode_seconds=decoding,
        decoded_again=again,
    )


class _Ahead:
    """The channel files of a stack opened one ahead: while a channel is decoded and reduced,
    the next file is already being hashed on a helper thread (`ChannelFile.hash_ahead`: a
    1 MB chunk at a time, no pixels held), so a stack's four sha256 runs overlap its decoding.
    A file that cannot be opened raises its error in its own turn, as without the look-ahead."""

    def __init__(self, paths: Mapping[str, Path], limits: Limits) -> None:
        self._paths = paths
        self._limits = limits
        self._opened: dict[str, tuple[ExitStack, ChannelFile | StackError]] = {}

    def _start(self, name: str) -> None:
        if name in self._opened or name not in self._paths:
            return
        stack = ExitStack()
        try:
            file: ChannelFile | StackError = stack.enter_context(
                open_channel(Path(self._paths[name]), self._limits)
            )
        except StackError as exc:
            file = exc
        if isinstance(file, ChannelFile):
            file.hash_ahead()
        self._opened[name] = (stack, file)

    @contextmanager
    def open(self, name: str) -> Iterator[ChannelFile]:
        self._start(name)
        following = CHANNELS.index(name) + 1
        if following < len(CHANNELS):
            self._start(CHANNELS[following])
        stack, file = self._opened.pop(name)
        with stack:
            if isinstance(file, StackError):
                raise file
            yield file

    def __enter__(self) -> _Ahead:
        return self

    def __exit__(self, *exc: object) -> None:
        for stack, _ in self._opened.values():
            stack.close()
        self._opened.clear()


def _reserve(budget: Budget | None, file: ChannelFile, reducer: Reducer) -> AbstractContextManager[None]:
    if budget is None:
        return nullcontext()
    header = file.header
    cost = file.decode_cost() + reducer.cost(header.width, header.height, header.bits)
    reservation = budget.reserve(cost)
    return _trimmed(reservation) if cost >= TRIM_FROM_BYTES else reservation


# Channels whose reservation is this big give their memory back as they finish (`_trimmed`);
# smaller ones leave it to malloc to reuse.
TRIM_FROM_BYTES = 32 * 1024 * 1024


@contextmanager
def _trimmed(reservation: AbstractContextManager[None]) -> Iterator[None]:
    """The reservation, and what the channel freed given back to the system before it ends:
    the channel's 8-bit copy (16 MB for 4000 x 4000) sits below the mmap threshold, in the
    thread's malloc arena, which glibc may keep (measured: +15 MB per decode thread with the
    raw TIFF reader, 77 -> 47 MB above the start for two threads and 4000 x 4000 16-bit)."""
    with reservation:
        try:
            yield
        finally:
            _malloc_trim()


def _malloc_trim() -> None:
    global _trim
    if _trim is None:
        try:
            function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            function.argtypes = [ctypes.c_size_t]
            function.restype = ctypes.c_int
            _trim = function
        except (OSError, AttributeError):  # not glibc: nothing to do
            _trim = False
    if _trim:
        _trim(0)


_trim: Callable[[int], int] | Literal[False] | None = None


def _check_complete(stack_id: str, paths: Mapping[str, Path]) -> None:
    missing = [c for c in CHANNELS if c not in paths]
    if missing:
        some = next(iter(paths.values()), None)
        raise StackError(
            "missing_channel",
            f"stack {stack_id!r} lacks channel(s) {', '.join(missing)}",
            some.parent if some is not None else None,
        )


def _mismatch(
    channel: str, pixels: np.ndarray, red: np.ndarray | tuple[tuple[int, ...], np.dtype], path: Path
) -> StackError | None:
    """The error of a channel that differs from red in size or bit depth, or None."""
    shape, dtype = (red.shape, red.dtype) if isinstance(red, np.ndarray) else red
    if pixels.shape != shape:
        return StackError(
            "shape_mismatch",
            f"{channel} is {pixels.shape[1]} x {pixels.shape[0]} but red is "
            f"{shape[1]} x {shape[0]}; all channels of a stack must match",
            path,
        )
    if pixels.dtype != dtype:
        return StackError(
            "dtype_mismatch",
            f"{channel} is {pixels.dtype} but red is {dtype}; all channels must share a bit depth",
            path,
        )
    return None


def find_stacks(folder: Path, naming: NamingScheme = NamingScheme()) -> dict[str, dict[str, Path]]:
    """Every stack named in `folder` (complete or not), as {stack_id: {channel: path}}."""
    try:
        names = [entry.name for entry in folder.iterdir() if entry.is_file()]
    except OSError as exc:
        raise StackError("unreadable", f"folder cannot be listed: {exc.strerror or exc}", folder) from None
    grouped = naming.group(names)
    return {sid: {c: folder / name for c, name in chans.items()} for sid, chans in grouped.items()}
