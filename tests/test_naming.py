"""File names -> stack id and channel."""

from __future__ import annotations

import pytest

from agent.stacks.naming import NamingScheme, is_temporary


def test_kaggle_names_give_id_and_channel() -> None:
    parsed = NamingScheme().parse("000a9596-bbc4-11e8-b2bc-ac1f6b6435d0_green.png")
    assert parsed is not None
    assert (parsed.stack_id, parsed.channel) == ("000a9596-bbc4-11e8-b2bc-ac1f6b6435d0", "green")


@pytest.mark.parametrize("name", ["a_red.tif", "a_red.TIFF", "a_Red.png"])
def test_kaggle_names_accept_tiff_and_any_case(name: str) -> None:
    parsed = NamingScheme().parse(name)
    assert parsed is not None
    assert parsed.channel == "red"


@pytest.mark.parametrize(
    "name",
    ["a_purple.png", "a_red.jpg", "readme.txt", ".a_red.png", "a_red.png.tmp", "~a_red.png", "a_red.png~"],
)
def test_other_and_temporary_files_are_not_channels(name: str) -> None:
    assert NamingScheme().parse(name) is None


def test_custom_pattern_with_plate_well_site_and_channel_map() -> None:
    scheme = NamingScheme(
        pattern=r"^(?P<plate>P\d+)_(?P<well>[A-P]\d{2})_s(?P<site>\d+)_w(?P<channel>\d)\.tif$",
        channel_map={"1": "blue", "2": "green", "3": "red", "4": "yellow"},
    )
    parsed = scheme.parse("P17_B03_s2_w2.tif")
    assert parsed is not None
    assert (parsed.stack_id, parsed.channel) == ("P17_B03_2", "green")
    assert (parsed.plate, parsed.well, parsed.site) == ("P17", "B03", "2")
    assert scheme.parse("P17_B03_s2_w5.tif") is None  # channel token not mapped


@pytest.mark.parametrize(
    ("pattern", "words"),
    [
        ("(", "not a valid regular expression"),
        (r"^(?P<id>.+)\.png$", "no (?P<channel>"),
        (r"^x_(?P<channel>red)\.png$", "needs an (?P<id>"),
    ],
)
def test_bad_patterns_are_refused_with_the_reason(pattern: str, words: str) -> None:
    with pytest.raises(ValueError, match="pattern") as info:
        NamingScheme(pattern=pattern)
    assert words in str(info.value)


def test_channel_map_must_target_known_channels() -> None:
    with pytest.raises(ValueError, match="channel_map"):
        NamingScheme(channel_map={"1": "purple"})


@pytest.mark.parametrize("name", ["a\x01b_red.png", "a b_red.png", "-x_red.png"])
def test_ids_with_control_characters_or_odd_starts_are_not_stacks(name: str) -> None:
    assert NamingScheme().parse(name) is None


def test_group_collects_channels_and_prefers_the_first_duplicate() -> None:
    names = ["s1_red.tif", "s1_red.png", "s1_green.png", "s2_blue.png", "notes.txt"]
    grouped = NamingScheme().group(names)
    assert grouped == {"s1": {"red": "s1_red.png", "green": "s1_green.png"}, "s2": {"blue": "s2_blue.png"}}


def test_temporary_names() -> None:
    assert is_temporary(".hidden.png")
    assert is_temporary("x_red.png.part")
    assert not is_temporary("x_red.png")


def test_a_channel_file_with_an_unusable_stack_id_is_recognised_as_unsafe() -> None:
    scheme = NamingScheme()
    assert scheme.unsafe("bell\x07_red.png") == "red"
    assert scheme.unsafe("back\\slash_green.png") == "green"
    assert scheme.unsafe("fine_red.png") is None  # a proper stack file
    assert scheme.unsafe("notes.txt") is None  # not a channel file at all
    assert scheme.unsafe(".hidden\x07_red.png") is None  # temporaries stay ignored
