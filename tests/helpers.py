"""Small writers of real image files for tests."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.stacks.labels import CHANNELS


def write_png(path: Path, pixels: np.ndarray) -> Path:
    assert cv2.imwrite(str(path), pixels), path
    return path


def write_stack(
    folder: Path,
    stack_id: str,
    size: tuple[int, int] = (64, 64),
    dtype: type = np.uint8,
    seed: int = 0,
    suffix: str = ".png",
) -> dict[str, Path]:
    """Four random channel files named the Kaggle way; returns {channel: path}."""
    rng = np.random.default_rng(seed)
    top = np.iinfo(dtype).max
    paths = {}
    for channel in CHANNELS:
        pixels: np.ndarray = rng.integers(0, top, size=size, endpoint=True).astype(dtype)
        paths[channel] = write_png(folder / f"{stack_id}_{channel}{suffix}", pixels)
    return paths


def refuse_open(
    monkeypatch: pytest.MonkeyPatch, filename: str, code: int = errno.EMFILE, times: int | None = None
) -> list[str]:
    """`os.open` fails with `code` for files named `filename` (the first `times` opens, or
    all), as the machine can make it fail (too many open files, a network share gone); the
    list of refused paths is returned and grows as they are refused."""
    real_open = os.open
    refused: list[str] = []

    def refusing(name: Any, flags: int, *args: Any) -> int:
        if Path(name).name == filename and (times is None or len(refused) < times):
            refused.append(str(name))
            raise OSError(code, os.strerror(code), str(name))
        return real_open(name, flags, *args)

    monkeypatch.setattr(os, "open", refusing)
    return refused
