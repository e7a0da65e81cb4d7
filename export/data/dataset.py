"""A labelled data set: a label file (Id,Target) and a folder of images.

The folder may hold stacks in the Kaggle layout (`<id>_<channel>.png` or `.tif`, grayscale),
in the HPA's external HPAv18 layout (`<id>_<channel>.jpg`, RGB JPEGs with the signal in one
colour plane, `export.data.hpav18`), or both: the winners of the 2018 competition trained on
the two sets together, so one folder (or one label file naming stacks of both) just works,
without a layout option to get wrong. Each stack is read by what its files hold.

The label file is read and checked whole (it is small: 31,072 rows for the full set); the
images are read one stack at a time when iterated, so memory does not grow with the set.
All bad rows are reported together, each by its line number, so a user fixes them in one go.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.stacks.errors import StackError
from agent.stacks.image import Limits
from agent.stacks.labels import CHANNELS, N_LOCATIONS, parse_target
from agent.stacks.naming import NamingScheme
from agent.stacks.stack import Stack, find_stacks, read_stack
from export.data import hpav18

_MAX_LISTED = 20


class DatasetError(ValueError):
    """The label file or the image folder does not form a usable data set."""


@dataclass(frozen=True)
class Sample:
    stack_id: str
    labels: tuple[int, ...]
    paths: dict[str, Path]


@dataclass(frozen=True)
class LabelRow:
    line: int
    stack_id: str
    labels: tuple[int, ...]


def read_labels(csv_path: Path) -> list[LabelRow]:
    """Parse and check a Kaggle label file; raise DatasetError listing every bad row."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise DatasetError(f"{csv_path}: cannot open label file: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{csv_path}: label file is not UTF-8 text") from None
    rows: list[LabelRow] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [h.strip() for h in header[:2]] != ["Id", "Target"]:
        raise DatasetError(f"{csv_path}: line 1: expected the header 'Id,Target', found {header!r}")
    for line, record in enumerate(reader, start=2):
        if not record or all(not field.strip() for field in record):
            continue
        if len(record) != 2:
            problems.append(f"line {line}: expected 2 fields (Id,Target), found {len(record)}")
            continue
        stack_id, target = record[0].strip(), record[1]
        if not stack_id:
            problems.append(f"line {line}: empty Id")
            continue
        if stack_id in seen:
            problems.append(f"line {line}: duplicate Id {stack_id!r} (first on line {seen[stack_id]})")
            continue
        seen[stack_id] = line
        try:
            labels = parse_target(target)
        except ValueError as exc:
            problems.append(f"line {line}: Id {stack_id!r}: {exc}")
            continue
        rows.append(LabelRow(line, stack_id, labels))
    _raise_if(problems, f"{csv_path}: {len(problems)} bad row(s)")
    if not rows:
        raise DatasetError(f"{csv_path}: the label file has no rows")
    return rows


class Dataset:
    """Label rows joined with the channel files found in the image folder."""

    def __init__(
        self,
        images: Path,
        labels_csv: Path,
        naming: NamingScheme = NamingScheme(),
        missing: str = "error",
        limits: Limits = Limits(),
    ) -> None:
        if missing not in ("error", "skip"):
            raise ValueError("missing must be 'error' or 'skip'")
        if not images.is_dir():
            raise DatasetError(f"{images}: image folder does not exist or is not a folder")
        rows = read_labels(labels_csv)
        found = find_stacks(images, naming)
        jpeg = find_stacks(images, hpav18.NAMING)
        problems: list[str] = []
        samples: list[Sample] = []
        for row in rows:
            paths = found.get(row.stack_id)
            if row.stack_id in jpeg:
                if paths is not None:
                    problems.append(
                        f"line {row.line}: Id {row.stack_id!r}: both PNG/TIFF and JPEG channel files in "
                        f"{images}; keep one set, so it is clear which one is trained on"
                    )
                    continue
                paths = jpeg[row.stack_id]
            lacking = [c for c in CHANNELS if c not in (paths or {})]
            if paths is None or lacking:
                if missing == "error":
                    what = "no image files" if paths is None else f"no {', '.join(lacking)} channel"
                    problems.append(f"line {row.line}: Id {row.stack_id!r}: {what} in {images}")
                continue
            samples.append(Sample(row.stack_id, row.labels, paths))
        _raise_if(problems, f"{labels_csv}: {len(problems)} row(s) name stacks not found")
        if not samples:
            raise DatasetError(f"{labels_csv}: no row has all four channel files in {images}")
        self.images = images
        self.samples = samples
        self.limits = limits

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    @property
    def ids(self) -> list[str]:
        return [s.stack_id for s in self.samples]

    def label_matrix(self) -> np.ndarray:
        """N x 28 matrix of 0/1, rows in data-set order."""
        matrix = np.zeros((len(self.samples), N_LOCATIONS), dtype=np.uint8)
        for i, sample in enumerate(self.samples):
            matrix[i, list(sample.labels)] = 1
        return matrix

    def read(self, sample: Sample) -> Stack:
        """The stack's grayscale channels: an HPAv18 stack (any channel file holding JPEG
        data, whatever its name) through `hpav18.read_stack`, others as the device reads."""
        if any(hpav18.is_jpeg(path) for path in sample.paths.values()):
            return hpav18.read_stack(sample.stack_id, sample.paths, self.limits)
        return read_stack(sample.stack_id, sample.paths, self.limits)

    def stacks(self) -> Iterator[tuple[Sample, Stack | StackError]]:
        """Each sample with its decoded stack, or the error that stack gave; one at a time."""
        return self.stacks_for(None)

    def stacks_for(self, ids: set[str] | None) -> Iterator[tuple[Sample, Stack | StackError]]:
        """As `stacks`, for the samples whose id is in `ids` (all if None), in data-set order."""
        for sample in self.samples:
            if ids is not None and sample.stack_id not in ids:
                continue
            try:
                yield sample, self.read(sample)
            except StackError as exc:
                yield sample, exc


def _raise_if(problems: list[str], title: str) -> None:
    if not problems:
        return
    listed = "\n  ".join(problems[:_MAX_LISTED])
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    raise DatasetError(f"{title}:\n  {listed}{more}")
