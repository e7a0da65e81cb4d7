"""The data-set reader: every bad row is named, images are read lazily, and a folder may hold
Kaggle-layout stacks (grayscale PNG/TIFF) and HPAv18 stacks (RGB JPEGs) side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.stacks.errors import StackError
from agent.stacks.labels import N_LOCATIONS
from agent.stacks.stack import find_stacks
from export.data.dataset import Dataset, DatasetError, read_labels
from tests.helpers import write_stack
from tests.test_hpav18 import cells, write_channel, write_hpav18_stack


def _labels(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "train.csv"
    path.write_text(text)
    return path


def test_reads_rows_and_the_label_matrix(tmp_path: Path) -> None:
    write_stack(tmp_path, "a")
    write_stack(tmp_path, "b")
    data = Dataset(tmp_path, _labels(tmp_path, "Id,Target\na,25 0\nb,27\n"))
    assert data.ids == ["a", "b"]
    matrix = data.label_matrix()
    assert matrix.shape == (2, 28)
    assert matrix[0].nonzero()[0].tolist() == [0, 25]
    assert matrix[1].nonzero()[0].tolist() == [27]


@pytest.mark.parametrize(
    ("row", "words"),
    [
        ("a,", "line 3: Id 'a': empty target"),
        ("a,28", "line 3: Id 'a': target 28 is outside 0..27"),
        ("a,x", "line 3: Id 'a': target 'x' is not an integer"),
        (",3", "line 3: empty Id"),
        ("a,1,2", "line 3: expected 2 fields"),
    ],
)
def test_bad_rows_are_named_by_line(tmp_path: Path, row: str, words: str) -> None:
    with pytest.raises(DatasetError) as info:
        read_labels(_labels(tmp_path, f"Id,Target\nz,1\n{row}\n"))
    assert words in str(info.value)


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"line 4: duplicate Id 'a' \(first on line 2\)"):
        read_labels(_labels(tmp_path, "Id,Target\na,1\nb,2\na,3\n"))


def test_all_bad_rows_are_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as info:
        read_labels(_labels(tmp_path, "Id,Target\na,\nb,99\nc,1\n"))
    message = str(info.value)
    assert "2 bad row(s)" in message
    assert "line 2" in message
    assert "line 3" in message


def test_wrong_header_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="line 1: expected the header 'Id,Target'"):
        read_labels(_labels(tmp_path, "id;target\na;1\n"))


def test_unknown_id_names_the_row(tmp_path: Path) -> None:
    write_stack(tmp_path, "a")
    with pytest.raises(DatasetError, match="line 3: Id 'ghost': no image files"):
        Dataset(tmp_path, _labels(tmp_path, "Id,Target\na,1\nghost,2\n"))


def test_missing_channel_names_the_row_and_channel(tmp_path: Path) -> None:
    write_stack(tmp_path, "a")
    (tmp_path / "a_yellow.png").unlink()
    with pytest.raises(DatasetError, match="line 2: Id 'a': no yellow channel"):
        Dataset(tmp_path, _labels(tmp_path, "Id,Target\na,1\n"))


def test_missing_stacks_can_be_skipped(tmp_path: Path) -> None:
    write_stack(tmp_path, "a")
    data = Dataset(tmp_path, _labels(tmp_path, "Id,Target\na,1\nghost,2\n"), missing="skip")
    assert data.ids == ["a"]


def test_images_are_read_only_when_iterated(tmp_path: Path) -> None:
    """Opening a data set reads no pixels, so a corrupt image surfaces at its turn, as an item."""
    write_stack(tmp_path, "a")
    write_stack(tmp_path, "b")
    (tmp_path / "b_green.png").write_bytes(b"garbage")
    data = Dataset(tmp_path, _labels(tmp_path, "Id,Target\na,1\nb,2\n"))
    results = list(data.stacks())
    assert not isinstance(results[0][1], StackError)
    assert isinstance(results[1][1], StackError)
    assert results[1][1].code == "not_an_image"


def test_stacks_is_a_generator_holding_one_stack_at_a_time(tmp_path: Path) -> None:
    for i in range(3):
        write_stack(tmp_path, f"s{i}", seed=i)
    data = Dataset(tmp_path, _labels(tmp_path, "Id,Target\ns0,1\ns1,2\ns2,3\n"))
    iterator = data.stacks()
    first = next(iterator)
    assert first[0].stack_id == "s0"
    assert not isinstance(first[1], StackError)
    assert isinstance(first[1].channels["red"], np.ndarray)
    assert [s.stack_id for s, _ in iterator] == ["s1", "s2"]


def test_a_folder_of_hpav18_jpegs_is_a_data_set_of_grayscale_stacks(tmp_path: Path) -> None:
    paths = write_hpav18_stack(tmp_path, "10580_1758_B1_1")
    data = Dataset(tmp_path, _labels(tmp_path, "Id,Target\n10580_1758_B1_1,0 25\n"))
    [(sample, stack)] = list(data.stacks())
    assert sample.paths == paths
    assert not isinstance(stack, StackError)
    assert {c: stack.channels[c].shape for c in stack.channels} == {c: (64, 64) for c in paths}
    assert data.label_matrix()[0].nonzero()[0].tolist() == [0, 25]


def test_kaggle_and_hpav18_stacks_are_read_from_one_folder(tmp_path: Path) -> None:
    """The 2018 winners trained on both sets; one label file may name stacks of each."""
    write_stack(tmp_path, "kaggle")
    write_hpav18_stack(tmp_path, "10580_1758_B1_1")
    data = Dataset(tmp_path, _labels(tmp_path, "Id,Target\nkaggle,1\n10580_1758_B1_1,2\n"))
    stacks = [stack for _, stack in data.stacks()]
    assert not any(isinstance(stack, StackError) for stack in stacks)
    assert [stack.paths["red"].suffix for stack in stacks] == [".png", ".jpg"]  # type: ignore[union-attr]


def test_jpeg_data_named_png_is_read_as_hpav18(tmp_path: Path) -> None:
    write_hpav18_stack(tmp_path, "10580_1758_B1_1", suffix=".png")
    data = Dataset(tmp_path, _labels(tmp_path, "Id,Target\n10580_1758_B1_1,2\n"))
    [(_, stack)] = list(data.stacks())
    assert not isinstance(stack, StackError)
    assert stack.channels["green"].ndim == 2


def test_a_stack_with_both_png_and_jpeg_files_is_refused_by_its_line(tmp_path: Path) -> None:
    write_stack(tmp_path, "a")
    write_hpav18_stack(tmp_path, "a")
    with pytest.raises(DatasetError, match="line 2: Id 'a': both PNG/TIFF and JPEG channel files"):
        Dataset(tmp_path, _labels(tmp_path, "Id,Target\na,1\n"))


def test_an_hpav18_file_with_the_wrong_planes_surfaces_as_that_stacks_error(tmp_path: Path) -> None:
    write_hpav18_stack(tmp_path, "10580_1758_B1_1")
    paths = write_hpav18_stack(tmp_path, "10580_1758_B1_2", seed=1)
    write_channel(paths["green"], "red", cells(seed=9))
    data = Dataset(tmp_path, _labels(tmp_path, "Id,Target\n10580_1758_B1_1,1\n10580_1758_B1_2,2\n"))
    results = [stack for _, stack in data.stacks()]
    assert not isinstance(results[0], StackError)
    assert isinstance(results[1], StackError)
    assert results[1].code == "wrong_plane"
    assert results[1].path == paths["green"]


def test_a_real_format_folder_reads_with_its_label_file(stack_source: Path) -> None:
    """The real stacks (101) or the synthetic stand-ins (24): every labelled stack is found, and
    the label matrix is the file's labels."""
    data = Dataset(stack_source / "stacks", stack_source / "labels.csv")
    rows = read_labels(stack_source / "labels.csv")
    assert len(data) == len(rows) == len(find_stacks(stack_source / "stacks"))
    counts = data.label_matrix().sum(axis=0)
    assert counts.tolist() == [sum(j in row.labels for row in rows) for j in range(N_LOCATIONS)]
    assert counts[0] > 0  # Nucleoplasm, the commonest location, in both
    assert counts[25] > 0  # Cytosol
    assert counts[27] == 0  # Rods & rings, rare, in neither


def test_full_kaggle_label_file_parses(kaggle_labels: Path) -> None:
    """The real file, or a stand-in of its size and form without ../shared."""
    rows = read_labels(kaggle_labels)
    assert len(rows) == 31072
