"""Shared fixtures: where the real HPA stacks are, and artefacts built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TIERS = {"unit", "integration", "slow"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test without a tier marker is a unit test, so `-m unit` selects the fast tier."""
    for item in items:
        if not TIERS & {mark.name for mark in item.iter_markers()}:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def real_dir() -> Path:
    """../shared/hpa-real beside the checkout (or $HPA_REAL); tests skip when it is absent."""
    folder = Path(os.environ.get("HPA_REAL", REPO.parent / "shared" / "hpa-real"))
    if not (folder / "stacks").is_dir():
        pytest.skip(f"real HPA stacks not found at {folder} (set HPA_REAL to their folder)")
    return folder


@pytest.fixture(scope="session")
def synthetic_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 synthetic stacks at 256 x 256 with train.csv, made once per test session."""
    from export.synth import generate

    folder = tmp_path_factory.mktemp("synthetic")
    generate(folder, n=300, seed=11, size=256, workers=2)
    return folder


@pytest.fixture(scope="session")
def synthetic_embeddings(synthetic_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Lite0 (ImageNet weights) embeddings of the session's synthetic set at 224 px: a cache folder."""
    from agent.preprocess import Preprocessing
    from export.backbones import BackboneSpec
    from export.dataset import Dataset
    from export.embed import Embedder, EmbeddingCache, embed_dataset

    folder = tmp_path_factory.mktemp("embeddings") / "lite0"
    dataset = Dataset(synthetic_set, synthetic_set / "train.csv")
    embed_dataset(dataset, Embedder(BackboneSpec("lite0"), Preprocessing(size=224)), EmbeddingCache(folder))
    return folder
