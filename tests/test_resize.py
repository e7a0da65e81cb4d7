"""Area shrinking as matrix products gives OpenCV's pixels, bit for bit (agent/stacks/resize.py)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.stacks.resize import BAND_BYTES, area_shrink, resize


def opencv(plane: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(cv2.resize(plane, size, interpolation=cv2.INTER_AREA))


def patterns(height: int, width: int) -> dict[str, np.ndarray]:
    """Planes where a value ending in .5 is common (neighbours one level apart, hard edges),
    the full range, and noise."""
    y, x = np.mgrid[0:height, 0:width]
    return {
        "checker of 3 and 4": ((x + y) % 2 + 3).astype(np.uint8),
        "checker of 254 and 255": ((x + y) % 2 + 254).astype(np.uint8),
        "stripes of 0 and 255": (x % 2 * 255).astype(np.uint8),
        "rows of 0 and 1": (y % 2).astype(np.uint8),
        "halves of 3 and 4": np.where(x < width // 2, 3, 4).astype(np.uint8),
        "blocks 7 x 5": (((x // 7) + (y // 5)) % 2 * 255).astype(np.uint8),
        "gradient": (x * 255 // max(width - 1, 1)).astype(np.uint8),
        "noise": np.random.default_rng(height * width).integers(0, 256, (height, width), dtype=np.uint8),
    }


@pytest.mark.parametrize(
    ("height", "width", "size"),
    [
        (2048, 2048, (224, 224)),  # a 2048 x 2048 camera: 64 source pixels -> 7
        (512, 512, (224, 224)),  # Kaggle's PNGs: 16 -> 7
        (1024, 2048, (224, 224)),  # not square: 32 and 64
        (2048, 2048, (384, 320)),  # not square at the destination: 16 -> 3 and 32 -> 5
        (4096, 4096, (224, 224)),  # the longest period done this way: 128 (256 for 8192)
    ],
)
def test_area_shrink_gives_opencvs_pixels(height: int, width: int, size: tuple[int, int]) -> None:
    for name, plane in patterns(height, width).items():
        found = area_shrink(plane, size)
        assert found is not None, name
        np.testing.assert_array_equal(found, opencv(plane, size), err_msg=name)


def test_a_channel_larger_than_one_band_is_shrunk_in_bands_with_the_same_pixels() -> None:
    plane = patterns(2048, 2048)["noise"]
    assert plane.size * 4 > 4 * BAND_BYTES  # several bands of rows
    np.testing.assert_array_equal(area_shrink(plane, (224, 224)), opencv(plane, (224, 224)))


@pytest.mark.parametrize(
    ("height", "width", "size", "why"),
    [
        (2160, 2560, (224, 224), "periods of 270 and 80: inexact weights, ties could round apart"),
        (600, 448, (224, 224), "a period of 75 rows"),
        (448, 448, (224, 224), "an integer factor both ways: OpenCV's integer path"),
        (100, 100, (224, 224), "enlarging"),
        (2047, 2047, (224, 224), "a period of 2047 pixels"),
    ],
)
def test_opencv_keeps_the_sizes_it_does_differently(
    height: int, width: int, size: tuple[int, int], why: str
) -> None:
    plane = patterns(height, width)["checker of 3 and 4"]
    assert area_shrink(plane, size) is None, why
    np.testing.assert_array_equal(resize(plane, size, "area"), opencv(plane, size))


def test_other_methods_are_opencvs() -> None:
    plane = patterns(512, 512)["noise"]
    expected = cv2.resize(plane, (224, 224), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(resize(plane, (224, 224), "linear"), expected)


def test_real_channels_at_their_size_and_as_a_2048_camera_gives_them(stack_source: Path) -> None:
    """The real stacks' channels (or the project's stand-ins without them), as they are and
    enlarged to 2048 x 2048."""
    files = sorted((stack_source / "stacks").glob("*.png"))[:24]
    assert files
    for file in files:
        plane = np.asarray(cv2.imread(str(file), cv2.IMREAD_UNCHANGED))
        if plane.dtype != np.uint8:
            plane = cv2.convertScaleAbs(plane, alpha=255 / 65535)
        large = cv2.resize(plane, (2048, 2048), interpolation=cv2.INTER_CUBIC)
        for source in (plane, large):
            np.testing.assert_array_equal(resize(source, (224, 224), "area"), opencv(source, (224, 224)))
