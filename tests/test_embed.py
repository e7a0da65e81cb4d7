"""The embedding cache: resumable, keyed, never stale; pixels are the agent's own preprocessing.

Most tests stand a small numpy function in for the network (it records what it is fed), so
they run in milliseconds; the integration tests at the end run the real Keras backbones.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.stacks.digest import stack_fingerprint
from agent.stacks.preprocess import Preprocessing, preprocess
from agent.stacks.stack import read_stack
from export.data.dataset import Dataset
from export.features.backbones import BackboneSpec
from export.features.embed import (
    CACHE_FORMAT,
    CacheError,
    Embedder,
    EmbeddingCache,
    cache_key,
    embed_dataset,
)
from tests.helpers import write_stack

PREP = Preprocessing(size=32)


class PixelStats:
    """Stand-in network: 1280 numbers from the image's slot means; remembers every batch."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.batches: list[np.ndarray] = []
        self.fail_after = fail_after

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        if self.fail_after is not None and len(self.batches) >= self.fail_after:
            raise KeyboardInterrupt("stopped mid-run")
        self.batches.append(images.copy())
        means = images.reshape(len(images), -1, 3).mean(axis=1)
        return np.tile(means, (1, 1280 // 3 + 1))[:, :1280]


def _embedder(network: PixelStats, prep: Preprocessing = PREP) -> Embedder:
    embedder = Embedder(BackboneSpec("b0", "random", seed=0), prep)
    embedder._model = network
    return embedder


def _dataset(folder: Path, n: int, bad: tuple[int, ...] = ()) -> Dataset:
    folder.mkdir()
    lines = ["Id,Target"]
    for i in range(n):
        write_stack(folder, f"s{i:02d}", size=(40, 40), seed=i)
        lines.append(f"s{i:02d},{i % 28}")
        if i in bad:
            (folder / f"s{i:02d}_green.png").write_bytes(b"not a png at all")
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    return Dataset(folder, folder / "train.csv")


def test_every_stack_is_embedded_once_with_the_agents_preprocessing(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path / "data", 5)
    network = PixelStats()
    report = embed_dataset(dataset, _embedder(network), EmbeddingCache(tmp_path / "cache"), batch_size=2)
    assert report.embedded == 5
    assert not report.failures
    fed = np.concatenate(network.batches)
    expected = np.stack([preprocess(s.channels, PREP) for _, s in dataset.stacks()])  # type: ignore[union-attr]
    np.testing.assert_array_equal(fed, expected)
    loaded = EmbeddingCache(tmp_path / "cache").load()
    assert sorted(loaded.ids) == dataset.ids
    assert loaded.vectors.shape == (5, 1280)


def test_a_rerun_skips_stacks_already_embedded(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path / "data", 4)
    embed_dataset(dataset, _embedder(PixelStats()), EmbeddingCache(tmp_path / "cache"))
    network = PixelStats()
    report = embed_dataset(dataset, _embedder(network), EmbeddingCache(tmp_path / "cache"))
    assert (report.embedded, report.skipped) == (0, 4)
    assert network.batches == []


def test_an_interrupted_run_resumes_where_it_stopped(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path / "data", 6)
    cache = EmbeddingCache(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        embed_dataset(dataset, _embedder(PixelStats(fail_after=2)), cache, batch_size=1, shard_size=1)
    assert len(cache.load().ids) == 2
    network = PixelStats()
    report = embed_dataset(dataset, _embedder(network), cache, batch_size=1, shard_size=1)
    assert (report.embedded, report.skipped) == (4, 2)
    assert sorted(cache.load().ids) == dataset.ids


def test_a_stack_whose_files_changed_is_embedded_again_and_the_new_vector_wins(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path / "data", 3)
    cache = EmbeddingCache(tmp_path / "cache")
    embed_dataset(dataset, _embedder(PixelStats()), cache)
    old = cache.load().rows(["s01"])
    write_stack(tmp_path / "data", "s01", size=(40, 40), seed=99)
    report = embed_dataset(dataset, _embedder(PixelStats()), cache)
    assert (report.embedded, report.skipped) == (1, 2)
    loaded = cache.load()
    assert len(loaded.ids) == 3
    assert not np.allclose(loaded.rows(["s01"]), old)


def test_the_cache_fingerprints_a_stack_as_the_device_does(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path / "data", 2)
    cache = EmbeddingCache(tmp_path / "cache")
    embed_dataset(dataset, _embedder(PixelStats()), cache)
    stack = read_stack("s01", dataset.samples[1].paths)
    assert cache.fingerprints()["s01"] == stack_fingerprint(stack.sha256)


def test_a_cache_from_before_the_device_fingerprint_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """Format 1 hashed the channels in another order: resuming it would re-embed every stack."""
    dataset = _dataset(tmp_path / "data", 2)
    old = EmbeddingCache(tmp_path / "cache")
    old.open({**cache_key(BackboneSpec("b0", "random", seed=0), PREP), "format": 1})
    old.append(["s00"], ["an old fingerprint"], np.zeros((1, 1280), np.float32))
    network = PixelStats()
    message = rf"older hpa-edge \(cache format 1; this one writes {CACHE_FORMAT}.*delete it and rerun embed"
    with pytest.raises(CacheError, match=message):
        embed_dataset(dataset, _embedder(network), EmbeddingCache(tmp_path / "cache"))
    assert network.batches == []
    assert old.load().ids == ["s00"]  # still readable by train and auc


def test_a_cache_made_with_other_preprocessing_is_refused(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path / "data", 2)
    embed_dataset(dataset, _embedder(PixelStats()), EmbeddingCache(tmp_path / "cache"))
    with pytest.raises(CacheError, match="differs in preprocessing"):
        embed_dataset(
            dataset, _embedder(PixelStats(), Preprocessing(size=48)), EmbeddingCache(tmp_path / "cache")
        )


def test_a_cache_made_with_another_backbone_seed_is_refused(tmp_path: Path) -> None:
    cache = EmbeddingCache(tmp_path / "cache")
    cache.open(cache_key(BackboneSpec("b0", "random", seed=0), PREP))
    with pytest.raises(CacheError, match="differs in backbone"):
        cache.open(cache_key(BackboneSpec("b0", "random", seed=1), PREP))


def _embed_three(tmp_path: Path, name: str) -> tuple[Any, PixelStats, Any, np.ndarray]:
    """Three small stacks embedded with recipe `name` over a stand-in network: the recipe, the
    network, the loaded cache, and the preprocessed images."""
    from agent.model.features import recipe

    chosen = recipe(name)
    dataset = _dataset(tmp_path / "data", 3)
    network = PixelStats()
    embedder = Embedder(BackboneSpec("b0", "random", seed=0), PREP, chosen)
    embedder._model = network
    embed_dataset(dataset, embedder, EmbeddingCache(tmp_path / "cache"))
    loaded = EmbeddingCache(tmp_path / "cache").load()
    assert list(loaded.ids) == list(dataset.ids)
    images = np.stack([preprocess(s.channels, PREP) for _, s in dataset.stacks()])  # type: ignore[union-attr]
    return chosen, network, loaded, images


def test_the_cache_stores_the_recipes_vectors_under_a_key_that_names_the_recipe(tmp_path: Path) -> None:
    gap_hand, network, loaded, images = _embed_three(tmp_path, "lite0-gap+hand-rgb")
    assert loaded.key["features"] == gap_hand.entry(1280)
    assert loaded.features is gap_hand
    expected = gap_hand(images, network.predict_on_batch(images))
    assert loaded.vectors.shape == (3, 1280 + 44)
    np.testing.assert_allclose(loaded.vectors, expected, rtol=1e-6)


def test_a_recipe_of_the_image_alone_never_runs_the_network(tmp_path: Path) -> None:
    hand, network, loaded, images = _embed_three(tmp_path, "hand-rgb2")
    assert network.batches == []  # nor is TensorFlow loaded to build it
    np.testing.assert_allclose(loaded.vectors, hand(images, np.zeros((3, 0), np.float32)), rtol=1e-6)


def test_a_cache_made_with_another_recipe_is_refused_and_one_from_before_recipes_is_lite0_gap(
    tmp_path: Path,
) -> None:
    from agent.model.features import recipe

    spec = BackboneSpec("b0", "random", seed=0)
    cache = EmbeddingCache(tmp_path / "cache")
    cache.open(cache_key(spec, PREP, recipe("hand-rgb")))
    with pytest.raises(CacheError, match="differs in features"):
        cache.open(cache_key(spec, PREP))
    old = EmbeddingCache(tmp_path / "old")
    key = cache_key(spec, PREP)
    del key["features"]  # as written before recipes
    old.open(key)
    old.open(cache_key(spec, PREP))  # today's default resumes it
    with pytest.raises(CacheError, match="differs in features"):
        old.open(cache_key(spec, PREP, recipe("lite0-gap+hand-rgb")))
    old.append(["s00"], ["f"], np.zeros((1, 1280), np.float32))
    assert old.load().features.name == "lite0-gap"


def test_vectors_of_another_width_than_the_recipe_gives_are_refused(tmp_path: Path) -> None:
    from agent.model.features import FeatureError, recipe

    cache = EmbeddingCache(tmp_path / "cache")
    cache.open(cache_key(BackboneSpec("b0", "random", seed=0), PREP, recipe("lite0-gap+hand-rgb")))
    cache.append(["s00"], ["f"], np.zeros((1, 1280), np.float32))
    with pytest.raises(
        FeatureError, match=r"1280 values per stack, recipe lite0-gap\+hand-rgb v1 gives 1324"
    ):
        _ = cache.load().features


def test_a_non_empty_folder_that_is_not_a_cache_is_not_written_into(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(CacheError, match="not an embedding cache"):
        EmbeddingCache(tmp_path / "photos").open(cache_key(BackboneSpec("b0", "random"), PREP))


def test_an_unreadable_stack_is_reported_and_the_rest_embedded(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path / "data", 4, bad=(2,))
    report = embed_dataset(dataset, _embedder(PixelStats()), EmbeddingCache(tmp_path / "cache"), batch_size=3)
    assert report.embedded == 3
    assert [(f["id"], f["code"]) for f in report.failures] == [("s02", "not_an_image")]
    written = json.loads((tmp_path / "cache" / "failures.json").read_text())
    assert written[0]["id"] == "s02"
    assert "s02" not in EmbeddingCache(tmp_path / "cache").load().ids


def test_a_damaged_shard_is_named_with_the_fix(tmp_path: Path) -> None:
    dataset = _dataset(tmp_path / "data", 2)
    cache = EmbeddingCache(tmp_path / "cache")
    embed_dataset(dataset, _embedder(PixelStats()), cache)
    cache.shards()[0].write_bytes(b"garbage")
    with pytest.raises(CacheError, match=r"damaged shard.*delete it and rerun"):
        cache.load()


def test_loading_a_folder_without_a_key_says_it_is_not_a_cache(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="not an embedding cache"):
        EmbeddingCache(tmp_path).load()


def _first_stacks(synthetic_set: Path, n: int, data: Path) -> tuple[Path, list[str]]:
    """A folder with the first n stacks of the session's synthetic set and their train.csv rows."""
    data.mkdir()
    rows = (synthetic_set / "train.csv").read_text().splitlines()[: n + 1]
    for row in rows[1:]:
        for path in synthetic_set.glob(f"{row.split(',')[0]}_*.png"):
            shutil.copy(path, data / path.name)
    (data / "train.csv").write_text("\n".join(rows) + "\n")
    return data, rows


@pytest.mark.integration
def test_embed_command_computes_the_recipe_chosen_on_real_stacks_unless_told(
    tmp_path: Path, synthetic_set: Path
) -> None:
    from agent.cli import main
    from agent.model import features

    data, _ = _first_stacks(synthetic_set, 3, tmp_path / "data")
    assert main(["embed", "--data", str(data), "--out", str(tmp_path / "cache"), "--quiet"]) == 0
    loaded = EmbeddingCache(tmp_path / "cache").load()
    assert loaded.key["features"]["name"] == "hand-rgb2"
    assert loaded.vectors.shape == (3, features.recipe("hand-rgb2").width(0))


@pytest.mark.integration
def test_embed_command_with_lite0_writes_a_cache_and_a_rerun_resumes(
    tmp_path: Path, synthetic_set: Path
) -> None:
    from agent.cli import main

    data, rows = _first_stacks(synthetic_set, 12, tmp_path / "data")
    args = ["embed", "--data", str(data), "--out", str(tmp_path / "cache"), "--size", "96", "--quiet",
            "--features", "lite0-gap"]  # fmt: skip
    assert main(args) == 0
    loaded = EmbeddingCache(tmp_path / "cache").load()
    assert loaded.vectors.shape == (12, 1280)
    assert loaded.vectors.std(axis=0).mean() > 1e-3
    assert loaded.key["backbone"]["name"] == "lite0"
    (data / rows[1].split(",")[0]).with_name(rows[1].split(",")[0] + "_blue.png").write_bytes(b"broken")
    assert main(args) == 1  # the broken stack fails, the other eleven are already cached
    assert json.loads((tmp_path / "cache" / "failures.json").read_text())[0]["code"] == "not_an_image"


def test_embed_command_refuses_bad_options_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    _dataset(tmp_path / "data", 2)
    code = main(
        ["embed", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "c"), "--channels", "red,green"]
    )
    assert code == 2
    assert "must name 3 input slots" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    code = main(["embed", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "c"),
                 "--features", "hand-rgb", "--channels", "green,red,blue"])  # fmt: skip
    assert code == 2
    assert "recipe hand-rgb v1 reads red from input slot 0" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
