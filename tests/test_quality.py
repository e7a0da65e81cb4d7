"""Image-quality checks: each fires on a stack degraded on purpose and not on the original.

The stack is a real HPA one from ../shared/hpa-real (or $HPA_REAL) and, always, a synthetic
one made by the project (`export.data.synth.generate`), which also stands in for the real
one where ../shared is absent, so these tests never skip.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import pytest

from agent.stacks import quality
from agent.stacks.labels import CHANNELS
from agent.stacks.stack import find_stacks, read_stack
from tests.conftest import real_folder

Channels = dict[str, np.ndarray]

REAL_STACK = "001bcdd2-bbb2-11e8-b2ba-ac1f6b6435d0"  # a dense, ordinary field (HPA, CC BY-SA 3.0)
SYNTHETIC_SEED = 0


def _real_stack() -> Channels | None:
    folder = real_folder() / "stacks"
    paths = {c: folder / f"{REAL_STACK}_{c}.png" for c in CHANNELS}
    if not all(p.is_file() for p in paths.values()):
        return None
    return dict(read_stack(REAL_STACK, paths).channels)


def _synthetic_stack(folder: Path) -> Channels:
    from export.data.synth import generate

    generate(folder, n=1, seed=SYNTHETIC_SEED, size=512, workers=1)
    ((stack_id, paths),) = find_stacks(folder).items()
    return dict(read_stack(stack_id, paths).channels)


@pytest.fixture(scope="module", params=["hpa", "synthetic"])
def field(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Channels:
    """An ordinary 512 x 512 8-bit stack: the real one (a synthetic stand-in when ../shared is
    absent), then a synthetic one."""
    stack = _real_stack() if request.param == "hpa" else None
    return stack if stack is not None else _synthetic_stack(tmp_path_factory.mktemp("synthetic"))


# ---------------------------------------------------------------- degradations


def _top(pixels: np.ndarray) -> int:
    return int(np.iinfo(pixels.dtype).max)


def blurred(channels: Mapping[str, np.ndarray], sigma: float) -> Channels:
    """The nucleus channel out of focus: a Gaussian blur, sigma in pixels of a 512 image."""
    out = dict(channels)
    blue = channels["blue"]
    out["blue"] = cv2.GaussianBlur(blue, (0, 0), sigma * blue.shape[0] / 512)
    return out


def darkened(
    channels: Mapping[str, np.ndarray], factor: float, offset: int = 0, top: int | None = None
) -> Channels:
    """The light scaled by `factor`: a shorter exposure, or a longer one clipped at `top`.
    The camera's `offset` (its reading in the dark) stays."""
    out = {}
    for name, p in channels.items():
        light = (p.astype(np.float32) - offset) * factor + offset
        out[name] = np.clip(np.rint(light), 0, top or _top(p)).astype(p.dtype)
    return out


def blanked(channels: Mapping[str, np.ndarray], name: str) -> Channels:
    """One channel black: a missing stain, or a lamp that did not fire."""
    out = dict(channels)
    out[name] = np.zeros_like(channels[name])
    return out


def emptied(channels: Mapping[str, np.ndarray]) -> Channels:
    """A field with no cells: the stack's own most nucleus-free eighth (the window whose
    brightest smoothed blue pixel is dimmest), mirrored to fill the frame. Same camera,
    stains and background; no nuclei."""
    blue = cv2.GaussianBlur(channels["blue"], (0, 0), 2)
    height, width = blue.shape
    side = height // 8
    step = side // 2
    corners = [(y, x) for y in range(0, height - side + 1, step) for x in range(0, width - side + 1, step)]
    y, x = min(corners, key=lambda c: int(blue[c[0] : c[0] + side, c[1] : c[1] + side].max()))
    pad = ((0, height - side), (0, width - side))
    return {name: np.pad(p[y : y + side, x : x + side], pad, "symmetric") for name, p in channels.items()}


def reasons(channels: Mapping[str, np.ndarray], reference: Mapping[str, object] | None = None) -> list[str]:
    return quality.assess(quality.measure(channels), reference)


# ---------------------------------------------------------------- each check


def test_an_ordinary_stack_passes_every_check(field: Channels) -> None:
    assert reasons(field) == []


def test_a_blurred_nucleus_channel_is_out_of_focus(field: Channels) -> None:
    assert reasons(blurred(field, 3.0)) == ["out_of_focus"]


def test_a_stack_darkened_to_near_black_has_every_channel_dark(field: Channels) -> None:
    assert reasons(darkened(field, 0.03)) == [f"dark_channel:{c}" for c in CHANNELS]


def test_an_overexposed_stack_is_saturated(field: Channels) -> None:
    found = reasons(darkened(field, 4.0))
    assert "saturated:blue" in found
    assert all(r.startswith("saturated:") for r in found), found


def test_a_blanked_channel_is_dark(field: Channels) -> None:
    assert reasons(blanked(field, "green")) == ["dark_channel:green"]


def test_a_blank_nucleus_channel_is_dark_and_finds_no_nuclei(field: Channels) -> None:
    assert reasons(blanked(field, "blue")) == ["empty_field", "dark_channel:blue"]


def test_a_field_without_cells_is_empty(field: Channels) -> None:
    figures = quality.measure(emptied(field))
    assert figures["nucleus_fraction"] == 0.0
    assert figures["nucleus_contrast"] < quality.NUCLEUS_MIN_CONTRAST
    assert "empty_field" in quality.assess(figures, None)


def test_focus_is_not_judged_without_nuclei(field: Channels) -> None:
    figures = quality.measure(blanked(field, "blue"))
    assert figures["focus"] == 0.0
    assert "out_of_focus" not in quality.assess(figures, None)


def test_small_bright_structures_at_the_maximum_are_not_saturation(field: Channels) -> None:
    """A few clipped spots (as in a Golgi or nucleolus stain) are routine, not a failed image."""
    green = field["green"].copy()
    spots = np.zeros_like(green)
    spots[::64, ::64] = 1
    spots = cv2.dilate(spots, np.ones((5, 5), np.uint8))  # 64 spots, 0.6% of the field
    green[spots > 0] = _top(green)
    assert reasons({**field, "green": green}) == []


def test_a_flat_channel_is_dark_not_saturated(field: Channels) -> None:
    figures = quality.measure({**field, "red": np.full_like(field["red"], 200)})
    assert figures["saturated_red"] == 0.0
    assert quality.assess(figures, None) == ["dark_channel:red"]


# ---------------------------------------------------------------- absolute vs reference


def test_a_mild_blur_is_out_of_focus_only_against_the_training_range(field: Channels) -> None:
    reference = quality.reference_from([quality.measure(field)])
    floor = quality.FOCUS_FACTOR * reference["figures"]["focus"]["low"]
    # the mildest blur that halves the training focus: still above the absolute floor
    for sigma in (0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0):
        figures = quality.measure(blurred(field, sigma))
        if figures["focus"] < floor:
            break
    assert quality.FOCUS_MIN < figures["focus"] < floor
    assert quality.assess(figures, None) == []
    assert quality.assess(figures, reference) == ["out_of_focus"]


def test_a_blurry_training_range_accepts_stacks_like_it(field: Channels) -> None:
    soft = blurred(field, 3.0)
    reference = quality.reference_from([quality.measure(soft)])
    assert reasons(soft) == ["out_of_focus"]
    assert reasons(soft, reference) == []


def test_a_dimmed_stack_is_dark_only_against_the_training_range(field: Channels) -> None:
    reference = quality.reference_from([quality.measure(field)])
    dim = darkened(field, 0.3)
    assert reasons(dim) == []
    assert reasons(dim, reference) == [f"dark_channel:{c}" for c in CHANNELS]


def test_a_reference_is_json_and_round_trips(field: Channels) -> None:
    stacks = (field, blurred(field, 3.0), darkened(field, 0.3))
    figures = [quality.measure(s) for s in stacks]
    reference = quality.reference_from(figures)
    again = json.loads(json.dumps(reference, allow_nan=False))
    assert again == reference
    assert set(again["figures"]) == set(figures[0])
    for one in figures:
        assert quality.assess(one, again) == quality.assess(one, reference)


def test_a_reference_needs_at_least_one_stack() -> None:
    with pytest.raises(ValueError, match="at least one"):
        quality.reference_from([])


def test_figures_are_flat_snake_case_finite_numbers(field: Channels) -> None:
    for channels in (field, blanked(field, "blue"), darkened(field, 0.0)):
        figures = quality.measure(channels)
        assert figures, channels
        for name, value in figures.items():
            assert re.fullmatch(r"[a-z0-9_]+", name), name
            assert type(value) is float, (name, value)
            assert math.isfinite(value), (name, value)
        json.dumps(figures, allow_nan=False)


def test_only_8_and_16_bit_channels_are_measured(field: Channels) -> None:
    with pytest.raises(ValueError, match="uint8 or uint16"):
        quality.measure({**field, "red": field["red"].astype(np.float32)})


# ---------------------------------------------------------------- 16-bit cameras

CAMERA_OFFSET = 100  # a 12-bit sCMOS camera writing 16-bit TIFFs: offset 100, saturating at 4095


def as_12_bit_camera(channels: Mapping[str, np.ndarray], size: int = 2048) -> Channels:
    """The 8-bit stack upscaled to `size` and mapped onto a 12-bit camera's range (100..4095)."""
    scale = (4095 - CAMERA_OFFSET) / 255.0
    out = {}
    for name, p in channels.items():
        big = cv2.resize(p, (size, size), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        out[name] = np.rint(big * scale + CAMERA_OFFSET).astype(np.uint16)
    return out


@pytest.fixture(scope="module")
def field_16(field: Channels, tmp_path_factory: pytest.TempPathFactory) -> Channels:
    """The stack as 2048 x 2048 16-bit TIFFs written and read back as the agent reads them."""
    folder = tmp_path_factory.mktemp("tiff16")
    for name, pixels in as_12_bit_camera(field).items():
        assert cv2.imwrite(str(folder / f"cam_{name}.tif"), pixels)
    stack = read_stack("cam", {c: folder / f"cam_{c}.tif" for c in CHANNELS})
    assert stack.dtype == np.uint16
    assert stack.shape == (2048, 2048)
    return dict(stack.channels)


def test_a_16_bit_2048_tiff_of_an_ordinary_stack_passes(field: Channels, field_16: Channels) -> None:
    figures = quality.measure(field_16)
    assert quality.assess(figures, None) == []
    assert figures["nucleus_fraction"] == pytest.approx(quality.measure(field)["nucleus_fraction"], abs=0.03)


def test_a_12_bit_camera_clipping_at_4095_is_saturated(field_16: Channels) -> None:
    found = reasons(darkened(field_16, 4.0, offset=CAMERA_OFFSET, top=4095))
    assert "saturated:blue" in found
    assert all(r.startswith("saturated:") for r in found), found


def test_a_16_bit_stack_darkened_to_near_black_is_dark(field_16: Channels) -> None:
    assert reasons(darkened(field_16, 0.03, offset=CAMERA_OFFSET)) == [f"dark_channel:{c}" for c in CHANNELS]


def test_a_blurred_16_bit_nucleus_channel_is_out_of_focus(field_16: Channels) -> None:
    assert reasons(blurred(field_16, 3.0)) == ["out_of_focus"]


def test_16_bit_brightness_is_measured_against_the_cameras_bit_depth(field_16: Channels) -> None:
    auto = quality.measure(field_16)  # brightest pixel below 4096: taken as a 12-bit camera
    sixteen = quality.measure(field_16, bits=16)
    for name in CHANNELS:
        assert sixteen[f"brightness_{name}"] < auto[f"brightness_{name}"] / 8


def test_a_camera_bit_depth_outside_8_to_16_is_refused(field_16: Channels) -> None:
    with pytest.raises(ValueError, match=r"8\.\.16"):
        quality.measure(field_16, bits=20)


# ---------------------------------------------------------------- channel by channel


@pytest.mark.parametrize("bits", [None, 12])
def test_figures_from_each_channels_samples_are_the_figures_of_the_stack(
    field: Channels, field_16: Channels, bits: int | None
) -> None:
    """The device takes each channel's subsamples as it is decoded and lets the channel go:
    the figures must be exactly those of the whole stack."""
    for channels in (field, field_16, blurred(field_16, 2.0)):
        samples = {name: quality.sample(name, pixels) for name, pixels in channels.items()}
        assert all(s.stats.size <= 2 * quality.STATS_SIDE**2 for s in samples.values())
        assert quality.measure_samples(samples, bits) == quality.measure(channels, bits)


def test_the_nucleus_channel_alone_keeps_a_focus_subsample(field: Channels) -> None:
    assert quality.sample("blue", field["blue"]).focus is not None
    assert quality.sample("red", field["red"]).focus is None
    with pytest.raises(ValueError, match="uint8 or uint16"):
        quality.sample("red", field["red"].astype(np.float32))
