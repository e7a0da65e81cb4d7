"""Reading a whole stack: four channels checked against each other."""

from __future__ import annotations

import csv
import hashlib
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from agent.stacks import image, quality, stack
from agent.stacks.budget import Budget
from agent.stacks.errors import StackError
from agent.stacks.labels import CHANNELS
from agent.stacks.preprocess import Preprocessing, Reducer, preprocess
from agent.stacks.stack import find_stacks, read_reduced, read_stack
from tests.helpers import write_png, write_stack

PREP = Preprocessing(size=32)


def _reduced(stack_id: str, paths: Mapping[str, Path]) -> object:
    return read_reduced(stack_id, paths, PREP)


# Both readers check the same things and fail with the same error.
Reader = Callable[[str, Mapping[str, Path]], object]
READERS = pytest.mark.parametrize("read", [read_stack, _reduced], ids=["whole", "reduced"])


def test_reads_four_channels_with_hashes(tmp_path: Path) -> None:
    paths = write_stack(tmp_path, "s1", size=(40, 50))
    stack = read_stack("s1", paths)
    assert set(stack.channels) == set(CHANNELS)
    assert stack.shape == (40, 50)
    assert len(set(stack.sha256.values())) == 4


@READERS
def test_missing_channel_names_the_stack_and_channel(tmp_path: Path, read: Reader) -> None:
    paths = write_stack(tmp_path, "s1")
    del paths["yellow"]
    with pytest.raises(StackError, match="yellow") as info:
        read("s1", paths)
    assert info.value.code == "missing_channel"
    assert "'s1'" in str(info.value)


@READERS
def test_channels_of_different_shapes_are_refused(tmp_path: Path, read: Reader) -> None:
    paths = write_stack(tmp_path, "s1", size=(64, 64))
    write_png(paths["green"], np.zeros((64, 63), np.uint8))
    with pytest.raises(StackError, match="63 x 64") as info:
        read("s1", paths)
    assert info.value.code == "shape_mismatch"
    assert info.value.path == paths["green"]


@READERS
def test_channels_of_different_bit_depths_are_refused(tmp_path: Path, read: Reader) -> None:
    paths = write_stack(tmp_path, "s1")
    write_png(paths["blue"], np.zeros((64, 64), np.uint16))
    with pytest.raises(StackError) as info:
        read("s1", paths)
    assert info.value.code == "dtype_mismatch"


@READERS
def test_one_bad_channel_file_fails_the_stack_naming_that_file(tmp_path: Path, read: Reader) -> None:
    paths = write_stack(tmp_path, "s1")
    paths["red"].write_bytes(b"")
    with pytest.raises(StackError) as info:
        read("s1", paths)
    assert (info.value.code, info.value.path) == ("empty_file", paths["red"])


def test_find_stacks_groups_a_folder(tmp_path: Path) -> None:
    write_stack(tmp_path, "a")
    write_stack(tmp_path, "b")
    (tmp_path / "b_red.png").unlink()
    (tmp_path / ".a_red.png.tmp").write_bytes(b"partial")
    found = find_stacks(tmp_path)
    assert sorted(found) == ["a", "b"]
    assert set(found["a"]) == set(CHANNELS)
    assert "red" not in found["b"]


def test_real_format_stacks_read_with_their_files_published_hashes(stack_source: Path) -> None:
    """The real stacks against the sha256 their PROVENANCE.md publishes; the synthetic stand-ins
    (no ../shared) against hashlib's sha256 of each file's bytes."""
    expected = {}
    provenance = stack_source / "PROVENANCE.md"
    if provenance.is_file():
        for line in provenance.read_text().splitlines():
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) == 8 and cells[0].endswith(".png"):
                expected[cells[0]] = cells[7]
    else:
        for file in (stack_source / "stacks").glob("*.png"):
            expected[file.name] = hashlib.sha256(file.read_bytes()).hexdigest()
    found = find_stacks(stack_source / "stacks")
    with open(stack_source / "labels.csv", newline="") as handle:
        ids = [row["Id"] for row in csv.DictReader(handle)]
    assert sorted(found) == sorted(ids)
    for stack_id in ids[:10]:
        stack = read_stack(stack_id, found[stack_id])
        assert stack.shape == (512, 512)
        assert stack.dtype == np.uint8
        for channel in CHANNELS:
            assert stack.sha256[channel] == expected[f"{stack_id}_{channel}.png"]


# ---------------------------------------------------------------- one channel at a time


@READERS
def test_a_files_own_error_comes_before_a_mismatch_found_earlier(tmp_path: Path, read: Reader) -> None:
    """green differs in size, yellow is not an image: both readers name yellow, as they read
    every file before comparing them."""
    paths = write_stack(tmp_path, "s1")
    write_png(paths["green"], np.zeros((64, 63), np.uint8))
    paths["yellow"].write_text("not an image")
    with pytest.raises(StackError) as info:
        read("s1", paths)
    assert (info.value.code, info.value.path) == ("not_an_image", paths["yellow"])


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_the_reduced_stack_is_the_whole_stack_reduced(tmp_path: Path, dtype: type) -> None:
    paths = write_stack(tmp_path, "s1", size=(90, 70), dtype=dtype)
    whole = read_stack("s1", paths)
    reduced = read_reduced("s1", paths, PREP, bits=12)
    assert reduced.sha256 == whole.sha256
    assert reduced.paths == whole.paths
    assert (reduced.shape, reduced.dtype) == (whole.shape, whole.dtype)
    np.testing.assert_array_equal(reduced.image, preprocess(whole.channels, PREP))
    assert reduced.quality == quality.measure(whole.channels, 12)
    assert reduced.decoded_again == ()
    assert not hasattr(reduced, "channels")


def _peaks(folder: Path, peaks: Mapping[str, int]) -> dict[str, Path]:
    rng = np.random.default_rng(9)
    paths = {}
    for c in CHANNELS:
        pixels = rng.integers(0, peaks[c], (40, 40), endpoint=True).astype(np.uint16)
        paths[c] = write_png(folder / f"s1_{c}.png", pixels)
    return paths


def test_a_channel_scaled_before_the_bit_depth_was_known_is_decoded_again(tmp_path: Path) -> None:
    paths = _peaks(tmp_path, {"red": 900, "green": 3000, "blue": 2000, "yellow": 100})
    reduced = read_reduced("s1", paths, PREP)
    assert reduced.decoded_again == ("red",)  # scaled as 10-bit before green showed 12
    np.testing.assert_array_equal(reduced.image, preprocess(read_stack("s1", paths).channels, PREP))


def test_a_channel_that_differs_when_decoded_again_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _peaks(tmp_path, {"red": 900, "green": 3000, "blue": 2000, "yellow": 100})
    opened: list[Path] = []
    real_open = image.open_channel

    def rewritten_between(path: Path, limits: object) -> object:
        if path in opened and path == paths["red"]:
            write_png(path, np.full((40, 40), 5, np.uint16))  # another exposure saved meanwhile
        opened.append(path)
        return real_open(path, limits)  # type: ignore[arg-type]

    monkeypatch.setattr(stack, "open_channel", rewritten_between)
    with pytest.raises(StackError) as info:
        read_reduced("s1", paths, PREP)
    assert (info.value.code, info.value.path) == ("changed", paths["red"])


# ---------------------------------------------------------------- channels read at once


def test_two_channels_of_a_stack_are_read_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each read waits for another to start: read one after the other, the barrier breaks."""
    paths = write_stack(tmp_path, "s1", size=(64, 64))
    whole = read_stack("s1", paths)
    meet = threading.Barrier(stack.CHANNEL_THREADS, timeout=10)
    real_read = image.ChannelFile.read

    def read_together(self: image.ChannelFile) -> image.Channel:
        meet.wait()
        return real_read(self)

    monkeypatch.setattr(image.ChannelFile, "read", read_together)
    reduced = read_reduced("s1", paths, PREP)
    assert reduced.sha256 == whole.sha256
    np.testing.assert_array_equal(reduced.image, preprocess(whole.channels, PREP))


def test_the_first_channels_error_wins_even_when_a_later_one_fails_sooner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_stack(tmp_path, "s1")
    paths["green"].write_bytes(b"")  # fails at once
    real_read = image.ChannelFile.read

    def red_slow_and_corrupt(self: image.ChannelFile) -> image.Channel:
        if self.path == paths["red"]:
            time.sleep(0.2)
            raise StackError("corrupt", "image cannot be decoded", self.path)
        return real_read(self)

    monkeypatch.setattr(image.ChannelFile, "read", red_slow_and_corrupt)
    with pytest.raises(StackError) as info:
        read_reduced("s1", paths, PREP)
    assert (info.value.code, info.value.path) == ("corrupt", paths["red"])


def test_an_8_bit_channel_is_reduced_without_waiting_for_an_earlier_channels_pixels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """red's decoding waits until green is reduced: that can happen only if green is compared
    with red by red's header, not red's pixels (the thread would otherwise sit idle)."""
    paths = write_stack(tmp_path, "s1", size=(64, 64))
    whole = read_stack("s1", paths)
    green_reduced = threading.Event()
    real_read, real_add = image.ChannelFile.read, Reducer.add

    def red_after_green(self: image.ChannelFile) -> image.Channel:
        if self.path == paths["red"]:
            assert green_reduced.wait(timeout=10), "green waited for red's pixels"
        return real_read(self)

    def add(self: Reducer, name: str, pixels: np.ndarray, seen: int | None = None) -> None:
        real_add(self, name, pixels, seen)
        if name == "green":
            green_reduced.set()

    monkeypatch.setattr(image.ChannelFile, "read", red_after_green)
    monkeypatch.setattr(Reducer, "add", add)
    reduced = read_reduced("s1", paths, PREP)
    np.testing.assert_array_equal(reduced.image, preprocess(whole.channels, PREP))
    assert reduced.quality == quality.measure(whole.channels)


def test_pixels_that_differ_from_their_files_header_are_refused_as_corrupt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = write_stack(tmp_path, "s1", size=(64, 64))
    real_read = image.ChannelFile.read

    def green_decodes_smaller(self: image.ChannelFile) -> image.Channel:
        channel = real_read(self)
        if self.path == paths["green"]:
            return image.Channel(pixels=channel.pixels[:32], sha256=channel.sha256, header=channel.header)
        return channel

    monkeypatch.setattr(image.ChannelFile, "read", green_decodes_smaller)
    with pytest.raises(StackError) as info:
        read_reduced("s1", paths, PREP)
    assert (info.value.code, info.value.path) == ("corrupt", paths["green"])


# ---------------------------------------------------------------- reading order


def test_red_is_started_first_the_unused_channels_next_and_the_nucleus_channel_last() -> None:
    assert [CHANNELS[i] for i in stack.reading_order({"red", "green", "blue"})] == [
        "red",
        "yellow",
        "green",
        "blue",
    ]
    assert stack.reading_order(set(CHANNELS)) == [0, 1, 2, 3]


@pytest.mark.parametrize("used", range(16))
def test_a_channel_that_may_wait_for_earlier_ones_starts_after_them(used: int) -> None:
    """A used channel may wait for the brightest pixel of every channel before it in channel
    order: those must have been started before it, or two stacks could block each other."""
    needed = {c for bit, c in enumerate(CHANNELS) if used >> bit & 1}
    order = stack.reading_order(needed)
    assert order[0] == 0
    assert sorted(order) == list(range(len(CHANNELS)))
    for at, i in enumerate(order):
        if CHANNELS[i] in needed:
            assert set(range(i)) <= set(order[:at]), (needed, order)


@READERS
def test_two_mismatches_name_the_first_in_channel_order_whatever_was_started_first(
    tmp_path: Path, read: Reader
) -> None:
    paths = write_stack(tmp_path, "s1")
    write_png(paths["green"], np.zeros((64, 63), np.uint8))
    write_png(paths["yellow"], np.zeros((64, 62), np.uint8))  # started before green
    with pytest.raises(StackError) as info:
        read("s1", paths)
    assert (info.value.code, info.value.path) == ("shape_mismatch", paths["green"])


def test_stacks_read_at_once_with_an_automatic_16_bit_depth_do_not_block_each_other(tmp_path: Path) -> None:
    """Eight stacks from four threads through the two reading threads, started in the default
    reading order (red, yellow, green, blue), each used channel waiting for the brightest
    pixel of the ones before it, red decoded again, a budget that lets one channel at a time
    run: every stack is read, as read in order."""
    stacks = {}
    for n in range(8):
        folder = tmp_path / f"s{n}"
        folder.mkdir()
        stacks[f"s{n}"] = _peaks(folder, {"red": 900, "green": 3000, "blue": 2000, "yellow": 100 + n})
    budget = Budget(1)
    with ThreadPoolExecutor(4) as readers:
        futures = {
            s: readers.submit(read_reduced, "s1", paths, PREP, budget=budget) for s, paths in stacks.items()
        }
        reduced = {s: future.result(timeout=30) for s, future in futures.items()}
    for stack_id, paths in stacks.items():
        assert reduced[stack_id].decoded_again == ("red",)
        np.testing.assert_array_equal(
            reduced[stack_id].image, preprocess(read_stack("s1", paths).channels, PREP)
        )


def test_channels_decoded_again_are_decoded_in_channel_order(tmp_path: Path) -> None:
    paths = _peaks(tmp_path, {"red": 900, "green": 900, "blue": 3000, "yellow": 100})
    for _ in range(30):  # whichever of red and green is reduced first
        assert read_reduced("s1", paths, PREP).decoded_again == ("red", "green")
