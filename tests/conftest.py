"""Shared fixtures: where the real HPA stacks are (or synthetic ones in their place), and artefacts
built once per session."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TIERS = {"unit", "integration", "slow"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test without a tier marker is a unit test, so `-m unit` selects the fast tier."""
    for item in items:
        if not TIERS & {mark.name for mark in item.iter_markers()}:
            item.add_marker(pytest.mark.unit)


def real_folder() -> Path:
    """Where the real HPA stacks are looked for: ../shared/hpa-real beside the checkout, or
    $HPA_REAL. Absent on a user's fresh clone: every test that reads them then uses a synthetic
    stand-in made by the project (`stack_source`, `kaggle_labels`) and still runs."""
    return Path(os.environ.get("HPA_REAL", REPO.parent / "shared" / "hpa-real"))


SOURCE_STACKS = 24  # synthetic stacks when the real ones are absent: the tests index 0..23


@pytest.fixture(scope="session")
def stack_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder whose `stacks/` holds real-format stacks (`<id>_<channel>.png`, 8-bit, 512 x 512).

    The real HPA stacks (`real_folder()`) when their `stacks/` exists: real pixels are the better
    test input, and CI has them. Otherwise, as on a user's fresh clone, 24 synthetic stacks from
    the project's generator at the real size, made once per session (seconds), with their labels
    in `labels.csv` beside `stacks/` as in the real folder; so the tests that need only some
    stacks in the real format run everywhere instead of skipping.
    """
    real = real_folder()
    if (real / "stacks").is_dir():
        return real
    from export.data.synth import generate

    folder = tmp_path_factory.mktemp("stack_source")
    labels = generate(folder / "stacks", n=SOURCE_STACKS, seed=3, size=512, workers=2)
    labels.rename(folder / "labels.csv")
    (folder / "stacks" / "synth.json").rename(folder / "synth.json")
    return folder


KAGGLE_STACKS = 31072  # rows of Kaggle's train.csv


@pytest.fixture(scope="session")
def kaggle_labels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Kaggle's full label file (the real folder's `train.csv`); without it, as on a user's fresh
    clone, a stand-in of the same form and size: 31,072 rows whose label sets the project's
    generator draws from Kaggle's per-location frequencies (`sample_label_sets`)."""
    real = real_folder() / "train.csv"
    if real.is_file():
        return real
    from export.data.synth import sample_label_sets

    out = tmp_path_factory.mktemp("kaggle_labels") / "train.csv"
    rows = [f"{i:08x}-0000-0000-0000-000000000000,{' '.join(map(str, labels))}"
            for i, labels in enumerate(sample_label_sets(KAGGLE_STACKS, seed=0))]  # fmt: skip
    out.write_text("Id,Target\n" + "\n".join(rows) + "\n")
    return out


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 synthetic stacks at 256 x 256 with train.csv, made once per test session."""
    from export.data.synth import generate

    folder = tmp_path_factory.mktemp("synthetic")
    generate(folder, n=300, seed=11, size=256, workers=2)
    return folder


@pytest.fixture(scope="session")
def synthetic_embeddings(synthetic_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Lite0 (ImageNet weights) embeddings of the session's synthetic set at 224 px: a cache folder."""
    from agent.stacks.preprocess import Preprocessing
    from export.data.dataset import Dataset
    from export.features.backbones import BackboneSpec
    from export.features.embed import Embedder, EmbeddingCache, embed_dataset

    folder = tmp_path_factory.mktemp("embeddings") / "lite0"
    dataset = Dataset(synthetic_set, synthetic_set / "train.csv")
    embed_dataset(dataset, Embedder(BackboneSpec("lite0"), Preprocessing(size=224)), EmbeddingCache(folder))
    return folder


def export_args(**overrides: object) -> argparse.Namespace:
    """Options of `hpa-edge export` for small test bundles (fast: few stacks)."""
    values: dict[str, object] = {
        "weights": None,
        "labels": None,
        "quantization": "int8",
        "calibration": 20,
        "fidelity_stacks": 30,
        "min_identical": 0.0,  # tests of the mechanics; the gate has its own test
        "fallback": [],
        "golden": 3,
        "purpose": "demo",
        "seed": 0,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


@pytest.fixture(scope="session")
def small_model(
    synthetic_set: Path, synthetic_embeddings: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A model folder trained with small forests on the session's Lite0 embeddings."""
    from agent.cli import main

    out = tmp_path_factory.mktemp("model") / "model"
    args = ["train", "--embeddings", str(synthetic_embeddings), "--labels", str(synthetic_set / "train.csv"),
            "--out", str(out), "--trees", "10", "--original-trees", "10", "--bootstrap", "50"]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def small_bundle(synthetic_set: Path, small_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An int8 Lite0 bundle of the small model, exported once per session."""
    from export.conversion.make_bundle import export

    out = tmp_path_factory.mktemp("bundle") / "bundle"
    assert export(export_args(model=small_model, data=synthetic_set, out=out)) == 0
    return out


@pytest.fixture(scope="session")
def demo_bundle() -> Any:
    """The committed demo bundle, loaded and checked once (hashes, golden vectors)."""
    from agent.model.bundle import load_bundle

    return load_bundle(REPO / "models" / "demo", threads=2)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Any]:
    """A real mosquitto on a free loopback port, for this test only."""
    from tests.broker import Broker

    running = Broker(tmp_path / "broker").start()
    yield running
    running.stop()


@pytest.fixture
def subscriber(broker: Any) -> Iterator[Any]:
    """Records every message the test's broker carries."""
    from tests.broker import Subscriber

    listening = Subscriber(broker.port)
    yield listening
    listening.close()
