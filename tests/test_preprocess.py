"""Bit depth, channel mapping and resizing: the pixels the embedder sees."""

from __future__ import annotations

import numpy as np
import pytest

from agent.stacks.labels import CHANNELS
from agent.stacks.preprocess import BitDepth, Preprocessing, auto_bits, preprocess, to_uint8


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
