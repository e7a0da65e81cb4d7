"""Read one stack: its four channel files, checked against each other, with their hashes.

`read_stack` holds the four decoded channels (the workstation, `check-stack`); `read_reduced`
is the device's way: channel by channel, two at once when they fit the decode budget, each
reduced to what the model and the quality checks need as soon as it is decoded, so a stack
costs about one channel's memory per reading thread, and one channel's when channels are big.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.stacks import heap, quality
from agent.stacks.budget import Budget
from agent.stacks.errors import StackError
from agent.stacks.image import Channel, ChannelFile, Limits, open_channel, read_channel
from agent.stacks.labels import CHANNELS
from agent.stacks.naming import NamingScheme
from agent.stacks.pools import pool
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
    """Read one stack channel by channel: decode a channel, hash it, take what the quality
    figures and the embedder need of it and let the full-resolution pixels go.

    The same checks, errors (in the same order), hashes, figures and image as `read_stack`
    followed by `quality.measure` and `preprocess`. The channels are read as parallel tasks
    (CHANNEL_THREADS; OpenCV, numpy and hashlib release the GIL), so one stack's four files
    take about half the time on two cores; what reading them in order decides is kept (the
    first file's error wins, a channel's bit depth comes from it and the channels before it).
    `bits` is the camera's bit depth for the quality figures (`quality.measure`). With
    `budget`, each channel waits until what it will hold fits beside the other channels being
    decoded, its own stack's and other threads' (`agent.stacks.budget`): channels too big to
    share it are decoded one at a time. A channel scaled before the stack's automatic bit
    depth was known is decoded again (`preprocess.Reducer`); its file must still have the
    same sha256.
    """
    _check_complete(stack_id, paths)
    reducer = Reducer(prep)
    order = reading_order(reducer.needed)
    turns = _Turns(order)
    began = time.perf_counter()
    tasks = {
        i: pool("channel", CHANNEL_THREADS).submit(
            _read_channel, i, Path(paths[CHANNELS[i]]), limits, budget, reducer, turns
        )
        for i in order
    }
    reads = [tasks[i].result() for i in range(len(CHANNELS))]
    together = time.perf_counter() - began
    for read in reads:
        if isinstance(read, StackError):
            raise read  # the first file's own error, in channel order, before any mismatch
    done = [read for read in reads if isinstance(read, _Read)]
    for read in done:
        if read.mismatch is not None:
            raise read.mismatch
    # The reading's share of the time the tasks took together (the rest: reducing).
    busy = sum(read.decoding + read.reducing for read in done)
    decoding = together * sum(read.decoding for read in done) / busy if busy > 0 else 0.0
    sha256 = {name: read.sha256 for name, read in zip(CHANNELS, done, strict=True)}
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
    first = done[0]
    return Reduced(
        stack_id=stack_id,
        sha256=sha256,
        paths={c: Path(paths[c]) for c in CHANNELS},
        shape=(int(first.shape[0]), int(first.shape[1])),
        dtype=first.dtype,
        image=reducer.image(),
        quality=quality.measure_samples({r.name: r.sample for r in done if r.sample is not None}, bits),
        decode_seconds=decoding,
        decoded_again=again,
    )


# Channels of a stack read at once (two cores: the agent's decode and model threads share them).
CHANNEL_THREADS = 2


def reading_order(needed: set[str]) -> list[int]:
    """The order a stack's channels are started in (indices into CHANNELS): red first (every
    channel is compared with it), then the channels the model does not use (only their
    headers, and with an automatic 16-bit depth their brightest pixel, are waited for), then
    the others in channel order.

    With four files on two threads, the last one started decides how long the stack takes;
    the nucleus channel, mostly black between the nuclei, is the smallest file of an HPA
    stack (55 KB against 110-131 KB for the others on the 101 real ones), so it goes last.
    A channel waits only for channels started before it, so the stacks sharing the reading
    threads cannot block each other.
    """
    rest = range(1, len(CHANNELS))
    return [0, *[i for i in rest if CHANNELS[i] not in needed], *[i for i in rest if CHANNELS[i] in needed]]


@dataclass(frozen=True)
class _Read:
    """One channel read: its hash, what of it the stack keeps, and the time it took."""

    name: str
    sha256: str
    shape: tuple[int, ...]
    dtype: np.dtype
    sample: quality.Samples | None  # None when the stack is already known to be refused
    mismatch: StackError | None  # differs from red in size or bit depth
    decoding: float
    reducing: float


class _Turns:
    """What the channel tasks of one stack tell each other, so that reading them at once
    decides what reading them in order would. Each opens its file and reserves its memory
    after the channel started before it did (first come, first served, so a task never holds
    memory while waiting for an earlier one that waits for memory), then posts its size and
    bit depth from the file's header (`opened`); a channel is compared with red and with the
    channels started before it by those, without waiting for their pixels. Only where the
    stack's bit depth hangs on every channel's brightest pixel (automatic depth, 16-bit data)
    does a channel the model uses also wait for the channels before it in channel order to be
    decoded (`reading_order` starts those first)."""

    def __init__(self, order: list[int]) -> None:
        n = len(order)
        self.started_before = {i: order[:at] for at, i in enumerate(order)}
        self.opened = [threading.Event() for _ in range(n)]  # reserved, header posted (or failed)
        self.decoded = [threading.Event() for _ in range(n)]
        self.kinds: list[_Kind | None] = [None] * n  # (shape, dtype); None: the file failed
        self.peaks: list[int | None] = [None] * n  # brightest pixel; None: the file failed

    def previous(self, i: int) -> int | None:
        """The channel started just before channel `i`, if any."""
        before = self.started_before[i]
        return before[-1] if before else None

    def open(self, i: int, kind: _Kind | None) -> None:
        if not self.opened[i].is_set():
            self.kinds[i] = kind
            self.opened[i].set()

    def decode(self, i: int, peak: int | None) -> None:
        if not self.decoded[i].is_set():
            self.peaks[i] = peak
            self.decoded[i].set()

    def kinds_before(self, i: int) -> list[_Kind | None]:
        """The kinds of the channels started before channel `i`, red's first."""
        before = self.started_before[i]
        for j in before:
            self.opened[j].wait()
        return [self.kinds[j] for j in before]

    def peaks_before(self, i: int) -> list[int | None]:
        """The brightest pixels of the channels before channel `i` in channel order."""
        if any(j not in self.started_before[i] for j in range(i)):
            raise RuntimeError(f"channel {i} would wait for a channel started after it")
        for event in self.decoded[:i]:
            event.wait()
        return self.peaks[:i]


_Kind = tuple[tuple[int, ...], np.dtype]


def _read_channel(
    i: int, path: Path, limits: Limits, budget: Budget | None, reducer: Reducer, turns: _Turns
) -> _Read | StackError:
    """Task: read channel `i` of a stack, then reduce it unless the stack is already refused."""
    name = CHANNELS[i]
    try:
        previous = turns.previous(i)
        if previous is not None:
            turns.opened[previous].wait()
        with open_channel(path, limits) as file, _reserve(budget, file, reducer):
            header = file.header
            kind: _Kind = ((header.height, header.width), header.dtype)
            turns.open(i, kind)
            began = time.perf_counter()
            channel = file.read()
            decoded = time.perf_counter()
            pixels = channel.pixels
            if (pixels.shape, pixels.dtype) != kind:
                found = f"decoded {pixels.dtype} {pixels.shape} differs from the header"
                raise StackError("corrupt", found, path)
            peak = reducer.peak_of(pixels)
            turns.decode(i, peak)
            kinds = turns.kinds_before(i)
            first = kinds[0] if i else kind  # red's
            mismatch = _mismatch(name, pixels, first, path) if i and first is not None else None
            # Not worth reducing: the stack fails at this file or at one started before it.
            refused = first is None or mismatch is not None or any(k is None or k != first for k in kinds)
            seen = [peak]
            if not refused and name in reducer.needed and reducer.needs_peaks(pixels):
                earlier = turns.peaks_before(i)
                refused = any(p is None for p in earlier)  # an earlier file failed to decode
                seen += [p for p in earlier if p is not None]
            sample = None
            if not refused:
                sample = quality.sample(name, pixels)
                reducer.add(name, pixels, seen=max(seen))
            reducing = time.perf_counter() - decoded
            return _Read(
                name, channel.sha256, pixels.shape, pixels.dtype, sample, mismatch, decoded - began, reducing
            )
    except StackError as exc:
        return exc
    finally:
        turns.open(i, None)  # a channel that failed (or raised) tells the later ones so
        turns.decode(i, None)


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
            heap.trim()


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
