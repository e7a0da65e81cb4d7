"""Bit depth, channel mapping and resizing: the pixels the embedder sees."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from agent.stacks.labels import CHANNELS
from agent.stacks.preprocess import (
    BitDepth,
    Preprocessing,
    Reducer,
    auto_bits,
    eight_bit,
    preprocess,
    to_uint8,
)


def _stack(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {c: values.get(c, values["red"]) for c in CHANNELS}


def test_8_bit_data_pass_through_unchanged() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (16, 16)).astype(np.uint8)
    out = to_uint8(_stack({"red": pixels}), BitDepth())
    np.testing.assert_array_equal(out["red"], pixels)


def test_12_bit_data_fill_the_8_bit_range_instead_of_going_black() -> None:
    twelve = np.array([[0, 1024, 2048, 4095]], np.uint16)
    out = to_uint8(_stack({"red": twelve}), BitDepth(bits=12))["red"]
    np.testing.assert_array_equal(out, [[0, 64, 128, 255]])
    blind = (twelve // 256).astype(np.uint8)  # what a divide by 256 would give
    assert blind.max() == 15


def test_auto_bits_takes_the_whole_stack_so_relative_brightness_survives() -> None:
    bright = np.full((4, 4), 4000, np.uint16)
    dim = np.full((4, 4), 1000, np.uint16)
    out = to_uint8(_stack({"red": bright, "green": dim}), BitDepth())
    assert auto_bits([bright, dim]) == 12
    assert out["red"].max() == round(4000 * 255 / 4095)
    assert out["green"].max() == round(1000 * 255 / 4095)


@pytest.mark.parametrize(("peak", "bits"), [(900, 10), (1023, 10), (1024, 12), (16383, 14), (65535, 16)])
def test_auto_bits_picks_the_smallest_usual_camera_depth(peak: int, bits: int) -> None:
    assert auto_bits([np.array([peak], np.uint16)]) == bits


def test_percentile_mode_stretches_each_channel() -> None:
    ramp = np.arange(1000, dtype=np.uint16).reshape(10, 100) + 3000
    out = to_uint8(_stack({"red": ramp}), BitDepth(mode="percentile", low_percentile=0, high_percentile=100))
    assert out["red"].min() == 0
    assert out["red"].max() == 255


@pytest.mark.parametrize(
    "kwargs", [{"mode": "divide"}, {"bits": 7}, {"bits": 17}, {"low_percentile": 50, "high_percentile": 10}]
)
def test_bad_bit_depth_settings_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="bit_depth"):
        BitDepth(**kwargs)  # type: ignore[arg-type]


def test_preprocess_gives_uint8_square_rgb_in_slot_order() -> None:
    rng = np.random.default_rng(1)
    channels = {c: rng.integers(0, 256, (300, 300)).astype(np.uint8) for c in CHANNELS}
    channels["blue"][:] = 7
    out = preprocess(channels, Preprocessing(size=224))
    assert out.shape == (224, 224, 3)
    assert out.dtype == np.uint8
    assert (out[..., 2] == 7).all()


def test_slots_can_mix_yellow_into_red() -> None:
    channels = {c: np.full((64, 64), 100, np.uint8) for c in CHANNELS}
    prep = Preprocessing(
        size=64, slots=((("red", 1.0), ("yellow", 0.5)), (("green", 1.0),), (("blue", 1.0),))
    )
    out = preprocess(channels, prep)
    assert (out[..., 0] == 150).all()
    assert (out[..., 1] == 100).all()


def test_preprocessing_round_trips_through_its_manifest_form() -> None:
    prep = Preprocessing(size=512, resize="linear", bit_depth=BitDepth(bits=12))
    data = prep.to_dict()
    assert data["dtype"] == "uint8"
    assert Preprocessing.from_dict(data) == prep


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"size": 8}, "size"),
        ({"resize": "magic"}, "resize"),
        ({"slots": ((("red", 1.0),),)}, "3 input slots"),
        ({"slots": ((("cyan", 1.0),), (("green", 1.0),), (("blue", 1.0),))}, "cyan"),
    ],
)
def test_bad_preprocessing_is_refused(kwargs: dict[str, object], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        Preprocessing(**kwargs)  # type: ignore[arg-type]


def test_a_channel_mapping_is_read_from_its_text_form_and_back() -> None:
    from agent.stacks.preprocess import format_slots, parse_slots

    slots = parse_slots("red + yellow*0.5, green ,Blue")
    assert slots == ((("red", 1.0), ("yellow", 0.5)), (("green", 1.0),), (("blue", 1.0),))
    assert format_slots(slots) == "red+yellow*0.5,green,blue"
    assert Preprocessing(slots=slots).slots == slots


@pytest.mark.parametrize(
    ("text", "words"), [("red,green", "3 input slots"), ("red*x,green,blue", "not a number")]
)
def test_a_bad_channel_mapping_is_refused_with_the_reason(text: str, words: str) -> None:
    from agent.stacks.preprocess import parse_slots

    with pytest.raises(ValueError, match=words):
        parse_slots(text)


# ---------------------------------------------------------------- exactly as before, for less memory


def _float_formula(pixels: np.ndarray, bits: int) -> np.ndarray:
    """The policy as first written: a float32 copy of the channel, scaled and rounded."""
    scale = 255.0 / float(2**bits - 1)
    return np.clip(np.rint(pixels.astype(np.float32) * scale), 0, 255).astype(np.uint8)


def _float_stretch(pixels: np.ndarray, policy: BitDepth) -> np.ndarray:
    low, high = np.percentile(pixels, (policy.low_percentile, policy.high_percentile))
    scaled = (pixels.astype(np.float32) - float(low)) * (255.0 / float(high - low))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("bits", range(9, 17))
def test_the_lookup_table_gives_the_float_formulas_value_for_every_16_bit_level(bits: int) -> None:
    every = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    np.testing.assert_array_equal(eight_bit(every, BitDepth(bits=bits), bits), _float_formula(every, bits))


@pytest.mark.parametrize("bits", range(8, 17))
def test_16_bit_channels_scale_the_same_by_opencv_or_by_the_table(
    bits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenCV's scaling is used only where it equals the table at every level; either way,
    the same pixels (and so the same labels) come out."""
    import agent.stacks.preprocess as module

    pixels = np.random.default_rng(bits).integers(0, 2**bits, (300, 200)).astype(np.uint16)
    fast = eight_bit(pixels, BitDepth(bits=bits), bits)
    monkeypatch.setattr(module, "_scales_exactly", lambda bits: False)
    np.testing.assert_array_equal(fast, eight_bit(pixels, BitDepth(bits=bits), bits))


def test_opencv_scaling_is_taken_for_the_usual_camera_depths() -> None:
    """Where the speed at 2048 x 2048 comes from: with this OpenCV the fast path is exact."""
    from agent.stacks.preprocess import _scales_exactly

    assert all(_scales_exactly(bits) for bits in (10, 12, 14, 16))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_percentile_mode_by_lookup_table_is_the_float_stretch(dtype: type) -> None:
    rng = np.random.default_rng(4)
    policy = BitDepth(mode="percentile", low_percentile=2.5, high_percentile=97.0)
    pixels: np.ndarray = rng.gamma(2.0, 300 if dtype is np.uint16 else 20, (123, 77)).astype(dtype)
    np.testing.assert_array_equal(eight_bit(pixels, policy, None), _float_stretch(pixels, policy))


def _stack_16(peaks: dict[str, int], side: int = 96) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(5)
    return {c: rng.integers(0, peaks[c], (side, side), endpoint=True).astype(np.uint16) for c in CHANNELS}


@pytest.mark.parametrize(
    ("peaks", "again"),
    [
        ({"red": 4000, "green": 3000, "blue": 900, "yellow": 1000}, []),  # 12 bits from the first channel
        ({"red": 900, "green": 3000, "blue": 900, "yellow": 1000}, ["red"]),  # red guessed 10
        ({"red": 900, "green": 1000, "blue": 800, "yellow": 9000}, ["red", "green", "blue"]),  # yellow: 14
    ],
)
def test_a_channel_scaled_before_the_stacks_bit_depth_was_known_is_named_and_redone(
    peaks: dict[str, int], again: list[str]
) -> None:
    channels = _stack_16(peaks)
    prep = Preprocessing(size=64)
    reducer = Reducer(prep)
    for name in CHANNELS:
        reducer.add(name, channels[name])
    assert reducer.stale() == again
    if again:
        with pytest.raises(ValueError, match="added again"):
            reducer.image()
    for name in again:
        reducer.add(name, channels[name])
    assert reducer.stale() == []
    np.testing.assert_array_equal(reducer.image(), preprocess(channels, prep))


MIXED_SLOTS = ((("red", 1.0), ("yellow", 0.5)), (("green", 1.0),), (("blue", 1.0),))


@pytest.mark.parametrize(
    "bit_depth",
    [BitDepth(), BitDepth(bits=12), BitDepth(mode="percentile", low_percentile=1, high_percentile=99)],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_preprocess_gives_the_pixels_of_the_full_resolution_float_path(
    bit_depth: BitDepth, dtype: type
) -> None:
    """The original whole-stack code path (every channel to a float copy, then 8 bits, then
    resized), against the one-channel-at-a-time lookup tables."""
    rng = np.random.default_rng(6)
    top = 255 if dtype is np.uint8 else 4095
    channels: dict[str, np.ndarray] = {
        c: rng.integers(0, top, (301, 257), endpoint=True).astype(dtype) for c in CHANNELS
    }
    prep = Preprocessing(size=64, bit_depth=bit_depth, slots=MIXED_SLOTS)
    if bit_depth.mode == "percentile":
        eight = {c: _float_stretch(p, bit_depth) for c, p in channels.items()}
    elif dtype is np.uint8:
        eight = channels
    else:
        bits = bit_depth.bits or auto_bits(channels.values())
        eight = {c: _float_formula(p, bits) for c, p in channels.items()}
    small = {c: cv2.resize(p, (64, 64), interpolation=cv2.INTER_AREA) for c, p in eight.items()}
    red, yellow = small["red"].astype(np.float32), small["yellow"].astype(np.float32)
    mixed = np.clip(np.rint(red + yellow * 0.5), 0, 255)
    expected = np.stack([mixed.astype(np.uint8), small["green"], small["blue"]], axis=-1)
    np.testing.assert_array_equal(preprocess(channels, prep), expected)
