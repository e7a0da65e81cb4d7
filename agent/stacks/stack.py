"""Read one stack: its four channel files, checked against each other, with their hashes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.stacks.errors import StackError
from agent.stacks.image import Limits, read_channel
from agent.stacks.labels import CHANNELS
from agent.stacks.naming import NamingScheme


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


def read_stack(stack_id: str, paths: Mapping[str, Path], limits: Limits = Limits()) -> Stack:
    """Decode and check the four channels of one stack.

    All four must be present, of one shape and one bit depth: the model sees them as one
    image, and a mismatch means a mixed-up acquisition, not something to paper over.
    """
    missing = [c for c in CHANNELS if c not in paths]
    if missing:
        some = next(iter(paths.values()), None)
        raise StackError(
            "missing_channel",
            f"stack {stack_id!r} lacks channel(s) {', '.join(missing)}",
            some.parent if some is not None else None,
        )
    decoded = {c: read_channel(Path(paths[c]), limits) for c in CHANNELS}
    ref = decoded["red"].pixels
    for channel in CHANNELS[1:]:
        pixels = decoded[channel].pixels
        if pixels.shape != ref.shape:
            raise StackError(
                "shape_mismatch",
                f"{channel} is {pixels.shape[1]} x {pixels.shape[0]} but red is "
                f"{ref.shape[1]} x {ref.shape[0]}; all channels of a stack must match",
                paths[channel],
            )
        if pixels.dtype != ref.dtype:
            raise StackError(
                "dtype_mismatch",
                f"{channel} is {pixels.dtype} but red is {ref.dtype}; all channels must share a bit depth",
                paths[channel],
            )
    return Stack(
        stack_id=stack_id,
        channels={c: decoded[c].pixels for c in CHANNELS},
        sha256={c: decoded[c].sha256 for c in CHANNELS},
        paths={c: Path(paths[c]) for c in CHANNELS},
    )


def find_stacks(folder: Path, naming: NamingScheme = NamingScheme()) -> dict[str, dict[str, Path]]:
    """Every stack named in `folder` (complete or not), as {stack_id: {channel: path}}."""
    try:
        names = [entry.name for entry in folder.iterdir() if entry.is_file()]
    except OSError as exc:
        raise StackError("unreadable", f"folder cannot be listed: {exc.strerror or exc}", folder) from None
    grouped = naming.group(names)
    return {sid: {c: folder / name for c, name in chans.items()} for sid, chans in grouped.items()}
