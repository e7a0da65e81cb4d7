"""Feature recipes (`agent.model.features`): the registry, the manifest entry and the numbers."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.model import features
from agent.model.features import (
    HAND_PARAMS,
    FeatureError,
    differences_of_gaussians,
    from_manifest,
    hand_features,
    otsu,
    recipe,
    region_pool,
)
from agent.stacks.preprocess import DEFAULT_SLOTS, Preprocessing, parse_slots, preprocess
from tests.conftest import SOURCE_STACKS


def _images(n: int = 2, size: int = 96) -> np.ndarray:
    from export.data.cells import paint_stack

    rng = np.random.default_rng(0)
    prep = Preprocessing(size=size)
    return np.stack([preprocess(paint_stack(rng, (i, 25), size=128, depth=8), prep) for i in range(n)])


def test_a_manifest_without_features_is_todays_recipe() -> None:
    found = from_manifest(None)
    assert (found.name, found.version) == ("lite0-gap", 1)
    embeddings = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(found(np.zeros((2, 8, 8, 3), np.uint8), embeddings), embeddings)
    assert found.width(1280) == 1280


def test_the_manifest_entry_names_every_parameter_and_the_layout() -> None:
    entry = recipe("lite0-gap+hand-rgb").entry(1280)
    json.dumps(entry)  # plain JSON
    assert (entry["name"], entry["version"]) == ("lite0-gap+hand-rgb", 1)
    assert entry["params"]["dog_sigmas"] == [0.8, 1.5, 3.0, 6.0]
    layout = entry["layout"]
    assert layout[0] == {"name": "embedding", "start": 0, "length": 1280, "what": layout[0]["what"]}
    starts = [part["start"] for part in layout]
    assert starts == sorted(starts)
    assert layout[-1]["start"] + layout[-1]["length"] == 1280 + 44
    assert from_manifest(entry, 1280) is recipe("lite0-gap+hand-rgb", 1)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "lite0-region", "version": 1}, r"unknown feature recipe 'lite0-region' \(this agent knows"),
        ({"name": "lite0-gap", "version": 2}, r"'lite0-gap' version 2 is unknown to this agent"),
        ({"name": "lite0-gap", "version": "1"}, "version must be an integer"),
        ({"version": 1}, "name and version"),
        ({"name": "hand-rgb", "version": 1, "params": {"nucleus_blur": 3.0}}, "params .* differ"),
    ],
)
def test_an_unknown_or_altered_recipe_is_refused(entry: dict[str, object], message: str) -> None:
    with pytest.raises(FeatureError, match=message):
        from_manifest(entry, 1280)


def test_a_layout_that_is_not_what_this_agent_computes_is_refused() -> None:
    entry = recipe("lite0-gap").entry(1280)
    with pytest.raises(FeatureError, match="layout differs"):
        from_manifest(entry, 640)


def test_hand_features_need_red_green_blue_in_their_slots() -> None:
    hand = recipe("hand-rgb")
    hand.check_slots(DEFAULT_SLOTS)
    with pytest.raises(FeatureError, match="reads green from input slot 1"):
        hand.check_slots(parse_slots("red,green+yellow,blue"))
    recipe("lite0-gap").check_slots(parse_slots("green,green,green"))  # reads no slot itself


def test_hand_features_are_finite_deterministic_and_match_their_layout() -> None:
    images = _images()
    hand = recipe("hand-rgb")
    x = hand(images, np.zeros((2, 1280), np.float32))
    assert x.shape == (2, hand.width(1280)) == (2, 44)
    assert np.isfinite(x).all()
    assert np.array_equal(x, hand(images, np.zeros((2, 1280), np.float32)))
    both = recipe("lite0-gap+hand-rgb")(images, np.ones((2, 1280), np.float32))
    assert np.array_equal(both[:, 1280:], x)
    assert (both[:, :1280] == 1).all()


def test_hand_features_see_where_the_green_protein_sits() -> None:
    image = np.zeros((64, 64, 3), np.uint8)
    image[16:48, 16:48, 2] = 200  # one nucleus
    image[8:56, 8:56, 0] = 80  # its cell
    nuclear, cytosolic = image.copy(), image.copy()
    nuclear[20:44, 20:44, 1] = 150
    cytosolic[8:56, 8:56, 1] = 150
    cytosolic[16:48, 16:48, 1] = 0
    share_in_nucleus = 2  # the third number of the nucleus region: its share of all green
    assert hand_features(nuclear)[share_in_nucleus] > 0.9
    assert hand_features(cytosolic)[share_in_nucleus] < 0.1


def test_region_pool_averages_inside_outside_and_their_difference() -> None:
    maps = np.zeros((2, 2, 1), np.float32)
    maps[0, 0, 0] = 4.0
    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True  # exactly the top-left cell
    assert region_pool(maps, mask).tolist() == [4.0, 0.0, 4.0]
    assert region_pool(maps, np.zeros((8, 8), bool)).tolist() == [0.0, 1.0 * 4 / 4, -1.0]


def test_every_registered_recipe_has_a_version_and_a_json_entry() -> None:
    for (name, version), found in features.RECIPES.items():
        assert (found.name, found.version) == (name, version)
        entry = found.entry(1280)
        assert json.loads(json.dumps(entry)) == entry
        assert sum(part["length"] for part in entry["layout"]) == found.width(1280)


def test_features_compare_scores_candidates_with_the_reduction_fitted_inside_the_folds() -> None:
    from export.training.features_compare import candidate_auc, pca_reducer
    from export.training.forests import ForestSettings

    rng = np.random.default_rng(0)
    y = np.zeros((40, 2), bool)
    y[::2, 0] = True
    y[::4, 1] = True
    parts = {
        "signal": y[:, :1] + rng.normal(0, 0.1, (40, 3)),
        "noise": rng.normal(0, 1, (40, 30)),
    }
    settings = ForestSettings(trees=20, seed=0, jobs=1)
    good = candidate_auc(parts, ("signal",), (), y, [0], 4, 2, settings)
    bad = candidate_auc(parts, ("noise",), (), y, [0], 4, 2, settings)
    both = candidate_auc(parts, ("signal",), ("noise",), y, [0], 4, 2, settings)
    assert good.shape == (2, 1)
    assert good.min() > 0.95
    assert bad.mean() < 0.8
    assert both.min() > 0.9
    fit, held = parts["noise"][:30], parts["noise"][30:]
    reduce = pca_reducer(4)
    a, _ = reduce(fit, held)
    b, _ = reduce(fit, held * 100)  # held rows never shape the reduction
    assert np.array_equal(a, b)
    assert a.shape == (30, 4)


# ------------------------------------------------------------------ the hand recipe against a plain reference


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def reference_hand_features(image: np.ndarray, params: Mapping[str, Any] = HAND_PARAMS) -> np.ndarray:
    """`hand-rgb` v1 written the plain way (one boolean mask per region, np.percentile, two
    GaussianBlur calls per difference of Gaussians): what the tuned `hand_features` must equal."""
    slots = params["slots"]
    plane = {c: image[..., slots[c]].astype(np.float32) / 255 for c in ("red", "green", "blue")}
    green, blue, red = plane["green"], plane["blue"], plane["red"]
    nucleus = otsu(cv2.GaussianBlur(blue, (0, 0), float(params["nucleus_blur"])))
    cell = otsu(cv2.GaussianBlur(red + blue, (0, 0), float(params["cell_blur"]))) | nucleus
    cytoplasm = cell & ~nucleus
    k = int(params["rim_kernel"])
    kernel = np.ones((k, k), np.uint8)
    n8, c8 = nucleus.astype(np.uint8), cell.astype(np.uint8)
    nuclear_rim = cv2.dilate(n8, kernel).astype(bool) & ~cv2.erode(n8, kernel).astype(bool)
    cell_rim = cell & ~cv2.erode(c8, kernel).astype(bool)
    total = float(green.sum()) + 1e-6
    high = green > green.mean() + float(params["bright_sigmas"]) * green.std()
    values: list[float] = []
    for mask in (nucleus, cytoplasm, nuclear_rim, cell_rim, ~cell):
        inside = green[mask] if mask.any() else np.zeros(1, np.float32)
        values += [
            float(inside.mean()),
            float(inside.std()),
            float(green[mask].sum()) / total,
            float(high[mask].mean()) if mask.any() else 0.0,
        ]
    for other in (red, blue):
        values.append(_correlation(green[cell], other[cell]))
    ratio, level = float(params["dog_ratio"]), float(params["dog_level"])
    for sigma in params["dog_sigmas"]:
        dog = cv2.GaussianBlur(green, (0, 0), float(sigma)) - cv2.GaussianBlur(green, (0, 0), sigma * ratio)
        for mask in (nucleus, cytoplasm):
            part = dog[mask] if mask.any() else np.zeros(1, np.float32)
            values += [float(np.percentile(part, 99)), float((part > level).mean())]
    values += [float(v) for v in np.percentile(green, list(params["percentiles"]))]
    values += [float(nucleus.mean()), float(cell.mean())]
    return np.asarray(values, dtype=np.float32)


def _assert_same_features(images: list[np.ndarray]) -> None:
    for image in images:
        expected, found = reference_hand_features(image), hand_features(image)
        # float32 rounding (sums in another order, a DFT for the wide blurs), nothing more
        np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-6)


def test_hand_features_equal_the_plain_reference_on_synthetic_stacks_of_every_size() -> None:
    from export.data.cells import paint_stack

    rng = np.random.default_rng(5)
    images = [
        preprocess(paint_stack(rng, (i % 28, (7 * i) % 28), size=256, depth=8), Preprocessing(size=size))
        for i, size in enumerate([32, 48, 64, 96, 224, 224, 224, 300, 512])
    ]
    edge = np.zeros((64, 64, 3), np.uint8)  # no cell, no green: every empty-region rule at once
    flat = np.full((64, 64, 3), 90, np.uint8)  # one value everywhere: no spread, no correlation
    noisy = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    _assert_same_features([*images, edge, flat, noisy])


def test_hand_features_equal_the_plain_reference_on_the_real_stacks(stack_source: Path) -> None:
    """The 101 real stacks, or the project's 24 synthetic stand-ins at the real size without them."""
    prep = Preprocessing(size=224)
    images = []
    for green in sorted((stack_source / "stacks").glob("*_green.png")):
        stem = green.name.removesuffix("_green.png")
        channels = {
            c: np.asarray(cv2.imread(str(green.with_name(f"{stem}_{c}.png")), cv2.IMREAD_UNCHANGED))
            for c in ("red", "green", "blue", "yellow")
        }
        images.append(preprocess(channels, prep))
    assert len(images) >= SOURCE_STACKS
    _assert_same_features(images)


@pytest.mark.parametrize("size", [24, 64, 224])
def test_differences_of_gaussians_equal_two_opencv_blurs(size: int) -> None:
    green = np.random.default_rng(size).random((size, size), np.float32)
    sigmas = [0.8, 1.5, 3.0, 6.0]
    found = differences_of_gaussians(green, sigmas, 1.6)
    for sigma, dog in zip(sigmas, found, strict=True):
        expected = cv2.GaussianBlur(green, (0, 0), sigma) - cv2.GaussianBlur(green, (0, 0), sigma * 1.6)
        np.testing.assert_allclose(dog, expected, rtol=0, atol=2e-6)
