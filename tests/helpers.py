"""Small writers of real image files for tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

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
