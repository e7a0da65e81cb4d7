"""Reading a whole stack: four channels checked against each other."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from agent.stacks.errors import StackError
from agent.stacks.labels import CHANNELS
from agent.stacks.stack import find_stacks, read_stack
from tests.helpers import write_png, write_stack


def test_reads_four_channels_with_hashes(tmp_path: Path) -> None:
    paths = write_stack(tmp_path, "s1", size=(40, 50))
    stack = read_stack("s1", paths)
    assert set(stack.channels) == set(CHANNELS)
    assert stack.shape == (40, 50)
    assert len(set(stack.sha256.values())) == 4


def test_missing_channel_names_the_stack_and_channel(tmp_path: Path) -> None:
    paths = write_stack(tmp_path, "s1")
    del paths["yellow"]
    with pytest.raises(StackError, match="yellow") as info:
        read_stack("s1", paths)
    assert info.value.code == "missing_channel"
    assert "'s1'" in str(info.value)


def test_channels_of_different_shapes_are_refused(tmp_path: Path) -> None:
    paths = write_stack(tmp_path, "s1", size=(64, 64))
    write_png(paths["green"], np.zeros((64, 63), np.uint8))
    with pytest.raises(StackError, match="63 x 64") as info:
        read_stack("s1", paths)
    assert info.value.code == "shape_mismatch"
    assert info.value.path == paths["green"]


def test_channels_of_different_bit_depths_are_refused(tmp_path: Path) -> None:
    paths = write_stack(tmp_path, "s1")
    write_png(paths["blue"], np.zeros((64, 64), np.uint16))
    with pytest.raises(StackError) as info:
        read_stack("s1", paths)
    assert info.value.code == "dtype_mismatch"


def test_one_bad_channel_file_fails_the_stack_naming_that_file(tmp_path: Path) -> None:
    paths = write_stack(tmp_path, "s1")
    paths["red"].write_bytes(b"")
    with pytest.raises(StackError) as info:
        read_stack("s1", paths)
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


def test_real_hpa_stacks_read_with_the_published_hashes(real_dir: Path) -> None:
    expected = {}
    for line in (real_dir / "PROVENANCE.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 8 and cells[0].endswith(".png"):
            expected[cells[0]] = cells[7]
    found = find_stacks(real_dir / "stacks")
    with open(real_dir / "labels.csv", newline="") as handle:
        ids = [row["Id"] for row in csv.DictReader(handle)]
    assert sorted(found) == sorted(ids)
    for stack_id in ids[:10]:
        stack = read_stack(stack_id, found[stack_id])
        assert stack.shape == (512, 512)
        assert stack.dtype == np.uint8
        for channel in CHANNELS:
            assert stack.sha256[channel] == expected[f"{stack_id}_{channel}.png"]
