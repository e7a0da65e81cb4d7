"""The synthetic generator: real label priors, patterns in the right places, repeatable."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from agent.stacks.labels import CHANNELS, KAGGLE_LABELS_PER_STACK, KAGGLE_LOCATION_COUNTS, KAGGLE_N_STACKS
from agent.stacks.stack import find_stacks, read_stack
from export.data.cells import Field, make_field, paint_stack
from export.data.dataset import Dataset, read_labels
from export.data.synth import add_arguments, generate, run, sample_label_sets


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.png")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_label_frequencies_follow_the_kaggle_training_set() -> None:
    sets = sample_label_sets(30_000, seed=3)
    counts = np.zeros(28)
    for labels in sets:
        counts[list(labels)] += 1
    wanted = np.asarray(KAGGLE_LOCATION_COUNTS) / KAGGLE_N_STACKS
    got = counts / len(sets)
    # Within 15% of the real frequency, or 0.1 percentage point for the rarest locations.
    assert np.all(np.abs(got - wanted) <= np.maximum(0.15 * wanted, 0.001)), np.round(got / wanted, 2)


def test_labels_per_stack_follow_the_kaggle_training_set() -> None:
    sets = sample_label_sets(20_000, seed=4)
    sizes = np.bincount([len(s) for s in sets], minlength=6)[1:6] / len(sets)
    wanted = np.asarray(KAGGLE_LABELS_PER_STACK) / KAGGLE_N_STACKS
    np.testing.assert_allclose(sizes, wanted, atol=0.015)
    assert all(len(set(s)) == len(s) for s in sets)


def test_a_prior_supplies_the_label_sets_in_its_proportions() -> None:
    """A stand-in prior of known make-up: only its sets come out, about as often as in it."""
    prior: list[tuple[int, ...]] = [(0,)] * 70 + [(0, 25)] * 25 + [(3, 7, 11)] * 5
    sets = sample_label_sets(2_000, seed=5, prior=prior)
    assert set(sets) == set(prior)
    assert abs(sum(1 for s in sets if s == (0, 25)) / len(sets) - 0.25) < 0.03


def test_a_prior_file_supplies_its_label_sets(kaggle_labels: Path) -> None:
    """Kaggle's label file, or its stand-in drawn from Kaggle's frequencies without ../shared."""
    prior = [row.labels for row in read_labels(kaggle_labels)]
    sets = sample_label_sets(2_000, seed=5, prior=prior)
    assert set(sets) <= set(prior)
    both = sum(1 for s in sets if 0 in s and 25 in s) / len(sets)
    assert 0.05 < both < 0.2  # Nucleoplasm + Cytosol: the commonest real pair (~13%; ~8% in the stand-in)


def test_same_seed_gives_identical_files_whatever_the_worker_count(tmp_path: Path) -> None:
    generate(tmp_path / "one", n=6, seed=9, size=96, workers=1)
    generate(tmp_path / "two", n=6, seed=9, size=96, workers=2)
    generate(tmp_path / "other", n=6, seed=10, size=96, workers=1)
    assert _digest(tmp_path / "one") == _digest(tmp_path / "two")
    assert _digest(tmp_path / "one") != _digest(tmp_path / "other")
    assert (tmp_path / "one" / "train.csv").read_text() == (tmp_path / "two" / "train.csv").read_text()


def test_output_is_a_readable_kaggle_data_set(tmp_path: Path) -> None:
    generate(tmp_path, n=5, seed=1, size=128, workers=1)
    data = Dataset(tmp_path, tmp_path / "train.csv")
    assert len(data) == 5
    for _, stack in data.stacks():
        assert not isinstance(stack, Exception)
        assert stack.shape == (128, 128)
    assert not list(tmp_path.glob(".*")), "no temporary files left behind"


def test_16_bit_output_holds_12_bit_data(tmp_path: Path) -> None:
    generate(tmp_path, n=2, seed=1, size=64, depth=12, workers=1)
    stacks = find_stacks(tmp_path)
    stack = read_stack(*next(iter(stacks.items())))
    assert stack.dtype == np.uint16
    assert max(int(p.max()) for p in stack.channels.values()) < 4096
    assert max(int(p.max()) for p in stack.channels.values()) > 255


def _painted_with_field(labels: tuple[int, ...], seed: int) -> tuple[dict[str, np.ndarray], Field]:
    """A painted stack and the cell geometry it was painted on (replayed from the same seed,
    drawing the same numbers in the same order as paint_stack does)."""
    rng = np.random.default_rng(seed)
    state = rng.bit_generator.state
    channels = paint_stack(rng, labels, size=256)
    rng.bit_generator.state = state
    field = make_field(rng, 256, mitotic=17 in labels, crowded=22 in labels or rng.random() < 0.15)
    return channels, field


def _green_by_region(labels: tuple[int, ...], seed: int = 0) -> dict[str, float]:
    """Mean green in nucleus, cytoplasm and background for one painted stack."""
    channels, field = _painted_with_field(labels, seed)
    green = channels["green"].astype(np.float64)
    return {
        "nucleus": float(green[field.nucleus_map > 0].mean()),
        "cytoplasm": float(green[field.cytoplasm].mean()),
        "background": float(green[field.cell_map == 0].mean()),
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nucleoplasm_is_green_inside_the_nucleus(seed: int) -> None:
    region = _green_by_region((0,), seed)
    assert region["nucleus"] > 2 * region["cytoplasm"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cytosol_is_green_outside_the_nucleus(seed: int) -> None:
    region = _green_by_region((25,), seed)
    assert region["cytoplasm"] > 1.5 * region["nucleus"]


def _median_correlation(location: int, marker: str) -> float:
    values = []
    for seed in range(5):
        channels = paint_stack(np.random.default_rng(seed), (location,), size=256)
        values.append(np.corrcoef(channels["green"].ravel(), channels[marker].ravel())[0, 1])
    return float(np.median(values))


@pytest.mark.parametrize(("location", "marker"), [(6, "yellow"), (14, "red")])
def test_er_and_microtubule_proteins_follow_their_marker_channel(location: int, marker: str) -> None:
    followed = _median_correlation(location, marker)
    nuclear = _median_correlation(0, marker)  # a nuclear protein: related to the marker only via the cell
    assert followed > 0.7
    assert followed > nuclear + 0.25


def test_every_location_changes_the_green_channel() -> None:
    """Each of the 28 patterns draws something (no location is silently blank)."""
    for location in range(28):
        painted = paint_stack(np.random.default_rng(location), (location,), size=256)
        green = painted["green"].astype(np.float64)
        assert np.percentile(green, 99.9) > 3 * max(np.median(green), 1.0), location


def test_channels_show_nuclei_in_blue() -> None:
    channels, field = _painted_with_field((25,), seed=0)
    blue = channels["blue"].astype(np.float64)
    assert blue[field.nucleus_map > 0].mean() > 3 * blue[field.cell_map == 0].mean()
    assert set(channels) == set(CHANNELS)


def test_cli_refuses_to_overwrite_a_data_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--out", str(tmp_path), "--n", "2", "--size", "64", "--quiet"])) == 0
    assert run(parser.parse_args(["--out", str(tmp_path), "--n", "2", "--size", "64", "--quiet"])) == 2
    assert "--overwrite" in capsys.readouterr().out


def test_cli_rejects_a_bad_prior_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    prior = tmp_path / "prior.csv"
    prior.write_text("Id,Target\na,99\n")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--out", str(tmp_path / "o"), "--prior", str(prior), "--quiet"])) == 2
    assert "line 2" in capsys.readouterr().out
