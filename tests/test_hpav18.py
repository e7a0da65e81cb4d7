"""HPAv18 channel files: RGB JPEGs whose signal sits in the channel's colour plane(s).

The sample files are written here with OpenCV the way the HPA saved them (`write_hpav18_stack`):
smooth cell-like pictures in the R, G, B or R+G planes of an RGB JPEG, named
`<antibody>_<plate>_<well>_<site>_<channel>.jpg`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.stacks.errors import StackError
from agent.stacks.image import Limits
from agent.stacks.labels import CHANNELS
from export.data import hpav18

BGR = {"red": 2, "green": 1, "blue": 0}
PLANES = {"red": ("red",), "green": ("green",), "blue": ("blue",), "yellow": ("red", "green")}


def cells(size: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth grayscale picture of a few bright blobs on a dark ground (uint8), like a
    fluorescence channel: JPEG's half-resolution colour leaks little from it, as from real ones."""
    rng = np.random.default_rng(seed)
    image: np.ndarray = np.zeros((size, size), np.float32)
    for _ in range(6):
        x, y = rng.integers(4, size - 4, size=2)
        cv2.circle(image, (int(x), int(y)), int(rng.integers(3, size // 6)), float(rng.uniform(120, 250)), -1)
    image = cv2.GaussianBlur(image, (0, 0), 2.0)
    return np.clip(image + rng.normal(6, 2, image.shape), 0, 255).astype(np.uint8)


def rgb(planes: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """An H x W x 3 image for OpenCV (B, G, R order) with the given planes filled."""
    image = np.zeros((*shape, 3), np.uint8)
    for name, pixels in planes.items():
        image[..., BGR[name]] = pixels
    return image


def write_jpeg(path: Path, image: np.ndarray, quality: int = 95) -> Path:
    """JPEG data by OpenCV's encoder, whatever the file's name ends with."""
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok, path
    path.write_bytes(data.tobytes())
    return path


def write_channel(path: Path, channel: str, pixels: np.ndarray, quality: int = 95) -> Path:
    """One HPAv18 channel file: `pixels` in the channel's plane(s) of an RGB JPEG."""
    return write_jpeg(path, rgb({p: pixels for p in PLANES[channel]}, pixels.shape[:2]), quality)


def write_hpav18_stack(
    folder: Path, stack_id: str = "10580_1758_B1_1", size: int = 64, seed: int = 0, suffix: str = ".jpg"
) -> dict[str, Path]:
    """The four channel files of one HPAv18 stack; returns {channel: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    return {
        channel: write_channel(folder / f"{stack_id}_{channel}{suffix}", channel, cells(size, seed * 4 + i))
        for i, channel in enumerate(CHANNELS)
    }


def decoded(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    assert image is not None
    return image


@pytest.mark.parametrize("channel", ["red", "green", "blue"])
def test_a_one_plane_channel_is_its_plane_as_decoded(tmp_path: Path, channel: str) -> None:
    path = write_channel(tmp_path / f"x_{channel}.jpg", channel, cells())
    read = hpav18.read_channel(path, channel)
    np.testing.assert_array_equal(read.pixels, decoded(path)[..., BGR[channel]])


@pytest.mark.parametrize("channel", CHANNELS)
def test_a_channel_keeps_the_brightness_it_was_saved_with(tmp_path: Path, channel: str) -> None:
    source = cells()
    read = hpav18.read_channel(write_channel(tmp_path / f"x_{channel}.jpg", channel, source), channel)
    assert read.pixels.dtype == np.uint8
    assert read.pixels.shape == source.shape
    assert abs(float(read.pixels.mean()) - float(source.mean())) < 0.03 * float(source.mean())
    assert np.abs(read.pixels.astype(int) - source).mean() < 4.0  # JPEG's loss, no more


def test_yellow_is_the_rounded_mean_of_the_red_and_green_planes(tmp_path: Path) -> None:
    path = write_channel(tmp_path / "x_yellow.jpg", "yellow", cells())
    image = decoded(path).astype(np.uint16)
    expected = ((image[..., 2] + image[..., 1] + 1) // 2).astype(np.uint8)
    np.testing.assert_array_equal(hpav18.read_channel(path, "yellow").pixels, expected)


def test_a_stack_is_four_grayscale_channels_with_the_hashes_of_their_files(tmp_path: Path) -> None:
    paths = write_hpav18_stack(tmp_path)
    stack = hpav18.read_stack("10580_1758_B1_1", paths)
    assert stack.shape == (64, 64)
    assert all(stack.channels[c].ndim == 2 and stack.channels[c].dtype == np.uint8 for c in CHANNELS)
    assert stack.sha256 == {c: hashlib.sha256(paths[c].read_bytes()).hexdigest() for c in CHANNELS}


def test_fine_structure_saved_at_quality_50_is_still_accepted(tmp_path: Path) -> None:
    """JPEG keeps colour at half resolution, so a thin bright line leaks into the other planes;
    that is the format, not a wrong file."""
    lines = np.zeros((64, 64), np.uint8)
    lines[::4] = 200
    lines[:, ::6] = 160
    path = write_channel(tmp_path / "x_green.jpg", "green", lines, quality=50)
    image = decoded(path)
    assert image[..., 2].mean() > 0.2 * image[..., 1].mean()  # the leak is there
    assert hpav18.read_channel(path, "green").pixels.shape == (64, 64)


def test_a_green_file_with_its_signal_in_the_red_plane_is_refused_as_looking_red(tmp_path: Path) -> None:
    path = write_channel(tmp_path / "x_green.jpg", "red", cells())
    with pytest.raises(StackError) as info:
        hpav18.read_channel(path, "green")
    assert info.value.code == "wrong_plane"
    assert "named the green channel, but its signal is in the red plane" in info.value.message
    assert "as in an HPAv18 red file" in info.value.message


def test_a_red_file_with_its_signal_in_red_and_green_is_refused_as_looking_yellow(tmp_path: Path) -> None:
    path = write_channel(tmp_path / "x_red.jpg", "yellow", cells())
    with pytest.raises(StackError, match=r"red and green planes.*as in an HPAv18 yellow file") as info:
        hpav18.read_channel(path, "red")
    assert info.value.code == "wrong_plane"


def test_a_yellow_file_with_its_signal_in_red_only_is_refused(tmp_path: Path) -> None:
    path = write_channel(tmp_path / "x_yellow.jpg", "red", cells())
    with pytest.raises(StackError, match="HPAv18 puts yellow in the red and green planes") as info:
        hpav18.read_channel(path, "yellow")
    assert info.value.code == "wrong_plane"


def test_a_one_plane_grayscale_jpeg_is_refused_with_the_reason(tmp_path: Path) -> None:
    path = write_jpeg(tmp_path / "x_blue.jpg", cells())
    with pytest.raises(StackError) as info:
        hpav18.read_channel(path, "blue")
    assert info.value.code == "grayscale_jpeg"
    assert "a grayscale JPEG (one plane)" in info.value.message
    assert "luminance conversion" in info.value.message


def test_grayscale_saved_as_rgb_is_refused_as_grayscale(tmp_path: Path) -> None:
    gray = cells()
    path = write_jpeg(tmp_path / "x_red.jpg", rgb({"red": gray, "green": gray, "blue": gray}, gray.shape))
    with pytest.raises(StackError, match="three equal planes") as info:
        hpav18.read_channel(path, "red")
    assert info.value.code == "grayscale_jpeg"


def test_a_colour_photograph_is_refused_as_one(tmp_path: Path) -> None:
    photo = rgb({"red": cells(seed=1), "green": cells(seed=2), "blue": cells(seed=3)}, (64, 64))
    path = write_jpeg(tmp_path / "x_green.jpg", photo)
    with pytest.raises(StackError, match="looks like a colour photograph") as info:
        hpav18.read_channel(path, "green")
    assert info.value.code == "colour_image"


def test_a_yellow_file_whose_red_and_green_planes_differ_is_refused_as_a_colour_image(tmp_path: Path) -> None:
    """Bright in red and green by their means, but not the same picture: not HPAv18's yellow."""
    red, green = cells(seed=5), cells(seed=6)
    assert abs(float(red.mean()) - float(green.mean())) < 0.25 * float(red.mean())
    path = write_jpeg(tmp_path / "x_yellow.jpg", rgb({"red": red, "green": green}, red.shape))
    with pytest.raises(StackError, match="differ pixel by pixel") as info:
        hpav18.read_channel(path, "yellow")
    assert info.value.code == "colour_image"


def test_an_almost_black_channel_is_read_as_it_is(tmp_path: Path) -> None:
    """Below one grey level on average there is no layout to judge, whatever plane the specks are in."""
    dark = np.zeros((64, 64), np.uint8)
    dark[10:14, 10:14] = 40
    path = write_channel(tmp_path / "x_green.jpg", "red", dark)
    assert hpav18.read_channel(path, "green").pixels.mean() < 1.0


def test_a_truncated_jpeg_is_refused(tmp_path: Path) -> None:
    path = write_channel(tmp_path / "x_red.jpg", "red", cells())
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(StackError, match="truncated") as info:
        hpav18.read_channel(path, "red")
    assert info.value.code == "truncated"


def test_a_png_named_jpg_is_refused_as_not_a_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "x_red.jpg"
    assert cv2.imwrite(str(tmp_path / "x.png"), rgb({"red": cells()}, (64, 64)))
    path.write_bytes((tmp_path / "x.png").read_bytes())
    with pytest.raises(StackError, match="not a JPEG file") as info:
        hpav18.read_channel(path, "red")
    assert info.value.code == "not_an_image"


def test_an_image_above_the_limits_is_refused_from_its_header(tmp_path: Path) -> None:
    path = write_channel(tmp_path / "x_red.jpg", "red", cells())
    with pytest.raises(StackError, match="64 x 64 pixels in 3 colour planes") as info:
        hpav18.read_channel(path, "red", Limits(max_pixels=64 * 64 * 3 - 1))
    assert info.value.code == "too_large"


def test_the_header_gives_size_and_colour_components(tmp_path: Path) -> None:
    path = write_channel(tmp_path / "x_red.jpg", "red", cells(size=48)[:, :40].copy())
    header = hpav18.jpeg_header(path.read_bytes(), path)
    assert (header.width, header.height, header.bits, header.samples) == (40, 48, 8, 3)


def test_channels_of_different_sizes_are_refused(tmp_path: Path) -> None:
    paths = write_hpav18_stack(tmp_path)
    write_channel(paths["blue"], "blue", cells(size=32))
    with pytest.raises(StackError, match="blue is 32 x 32 but red is 64 x 64") as info:
        hpav18.read_stack("10580_1758_B1_1", paths)
    assert info.value.code == "shape_mismatch"


def test_a_missing_channel_is_named(tmp_path: Path) -> None:
    paths = write_hpav18_stack(tmp_path)
    del paths["yellow"]
    with pytest.raises(StackError, match="lacks channel\\(s\\) yellow"):
        hpav18.read_stack("10580_1758_B1_1", paths)


def test_hpav18_names_give_the_antibody_plate_well_site_id() -> None:
    parsed = hpav18.NAMING.parse("10580_1758_B1_1_yellow.jpg")
    assert parsed is not None
    assert (parsed.stack_id, parsed.channel) == ("10580_1758_B1_1", "yellow")
    assert hpav18.NAMING.parse("10580_1758_B1_1_red.png") is None


@pytest.mark.integration
def test_embed_and_train_run_on_an_hpav18_folder(tmp_path: Path) -> None:
    """`hpa-edge embed` with the real Lite0 reads HPAv18 JPEGs; `hpa-edge train` fits on the cache."""
    from agent.cli import main

    data = tmp_path / "hpav18"
    rows = ["Id,Target"]
    for i in range(20):
        stack_id = f"{10580 + i}_1758_B{1 + i % 9}_{1 + i % 3}"
        write_hpav18_stack(data, stack_id, size=64, seed=i)
        rows.append(f"{stack_id},{0 if i % 2 else '0 25'}")
    (data / "HPAv18RBGY_wodpl.csv").write_text("\n".join(rows) + "\n")
    labels = data / "HPAv18RBGY_wodpl.csv"
    cache = tmp_path / "cache"
    assert main(["embed", "--data", str(data), "--labels", str(labels), "--out", str(cache), "--quiet"]) == 0
    assert json.loads((cache / "failures.json").read_text()) == []
    model = tmp_path / "model"
    code = main(["train", "--embeddings", str(cache), "--labels", str(labels), "--out", str(model),
                 "--folds", "2", "--trees", "10", "--original-trees", "10", "--bootstrap", "20",
                 "--jobs", "1", "--min-positives", "5"])  # fmt: skip
    assert code == 0
    assert json.loads((model / "evaluation.json").read_text())["data"]["n_stacks"] == 20
