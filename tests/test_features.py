"""Feature recipes (`agent.model.features`): the registry, the manifest entry and the numbers."""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.model import features
from agent.model.features import (
    HAND2_PARAMS,
    HAND_PARAMS,
    FeatureError,
    difference_of_gaussians,
    from_manifest,
    hand2_features,
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
        # float32 rounding (sums in another order), nothing more
        np.testing.assert_allclose(found, expected, rtol=1e-4, atol=1e-6)


def _stacks_of_every_size(seed: int, step: int) -> list[np.ndarray]:
    """Painted stacks preprocessed to sizes from 32 to 512, then the hard cases: an empty
    field (no cell, no green: every empty-region rule at once), one value everywhere (no
    spread, no correlation) and noise (hundreds of tiny "nuclei")."""
    from export.data.cells import paint_stack

    rng = np.random.default_rng(seed)
    images = [
        preprocess(paint_stack(rng, (i % 28, (step * i) % 28), size=256, depth=8), Preprocessing(size=size))
        for i, size in enumerate([32, 48, 64, 96, 224, 224, 224, 300, 512])
    ]
    edge = np.zeros((64, 64, 3), np.uint8)
    flat = np.full((64, 64, 3), 90, np.uint8)
    noisy = rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)
    return [*images, edge, flat, noisy]


def _real_stacks(stack_source: Path) -> list[np.ndarray]:
    """The 101 real stacks at 224 px, or the project's 24 synthetic stand-ins at the real size
    without them."""
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
    return images


def test_hand_features_equal_the_plain_reference_on_synthetic_stacks_of_every_size() -> None:
    _assert_same_features(_stacks_of_every_size(seed=5, step=7))


def test_hand_features_equal_the_plain_reference_on_the_real_stacks(stack_source: Path) -> None:
    _assert_same_features(_real_stacks(stack_source))


@pytest.mark.parametrize("size", [24, 64, 224])
def test_differences_of_gaussians_are_two_opencv_blurs_exactly(size: int) -> None:
    green = np.random.default_rng(size).random((size, size), np.float32)
    sigmas = [0.8, 1.5, 3.0, 6.0]
    for sigma in sigmas:
        dog = difference_of_gaussians(green, sigma, 1.6)
        expected = cv2.GaussianBlur(green, (0, 0), sigma) - cv2.GaussianBlur(green, (0, 0), sigma * 1.6)
        np.testing.assert_array_equal(dog, expected)


@pytest.mark.parametrize("level", [-1.0, 0.0, 0.02, 0.5, 2.0])
def test_the_blob_percentile_is_the_one_a_full_sort_gives_whatever_the_level(level: float) -> None:
    rng = np.random.default_rng(int(level * 100) + 107)
    for values in (
        rng.normal(0, 0.3, 5000).astype(np.float32),
        np.round(rng.normal(0, 0.3, 997), 1).astype(np.float32),  # ties, some on the level
        np.zeros(1, np.float32),
        np.array([0.5, -0.5], np.float32),
        rng.normal(0, 0.3, 101).astype(np.float32),  # the percentile's ranks at the last two
    ):
        found = features._percentile_and_share(values.copy(), 99.0, level)
        ordered = np.sort(values)
        position = (values.size - 1) * 0.99
        low = int(position)
        a = float(ordered[low])
        b = float(ordered[min(low + 1, values.size - 1)])
        assert found == [a + (b - a) * (position - low), np.count_nonzero(values > level) / values.size]


def test_the_measuring_tasks_give_the_same_vector_on_one_thread_or_two(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = _stacks_of_every_size(seed=11, step=5)
    split = [(hand_features(image), hand2_features(image)) for image in images]

    def one_thread(tasks: Any) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for task in tasks:
            found.update(task())
        return found

    monkeypatch.setattr(features, "_run_split", one_thread)
    for image, (v1, v2) in zip(images, split, strict=True):
        assert np.array_equal(hand_features(image), v1)
        assert np.array_equal(hand2_features(image), v2)


# ------------------------------------------------------------------ hand-rgb2: the extra parts


def reference_extra_values(image: np.ndarray, params: Mapping[str, Any] = HAND2_PARAMS) -> np.ndarray:
    """What `hand-rgb2` v1 adds to `hand-rgb` v1, written the plain way (one boolean mask per
    region, np.mean / np.median on the selected pixels, a loop over the connected nuclei): what
    the tuned `extra_values` must equal."""
    eps = float(params["eps"])
    slots = params["slots"]
    red, green, blue = (image[..., slots[c]].astype(np.float32) / 255 for c in ("red", "green", "blue"))
    g8 = image[..., slots["green"]]
    nucleus = otsu(cv2.GaussianBlur(blue, (0, 0), float(params["nucleus_blur"])))
    cell = otsu(cv2.GaussianBlur(red + blue, (0, 0), float(params["cell_blur"]))) | nucleus
    cytoplasm = cell & ~nucleus
    k = int(params["rim_kernel"])
    kernel = np.ones((k, k), np.uint8)
    n8, c8 = nucleus.astype(np.uint8), cell.astype(np.uint8)
    nuclear_rim = cv2.dilate(n8, kernel).astype(bool) & ~cv2.erode(n8, kernel).astype(bool)
    cell_rim = cell & ~cv2.erode(c8, kernel).astype(bool)

    def mean(values: np.ndarray) -> float:
        return float(values.astype(np.float64).mean()) if values.size else 0.0

    cell_mean, nucleus_mean, cytoplasm_mean = (mean(green[m]) for m in (cell, nucleus, cytoplasm))
    values: list[float] = []
    # radial
    reach = float(max(green.shape))  # the distance when there is no pixel on the other side
    inside = cv2.distanceTransform(n8, cv2.DIST_L2, 3) if (~nucleus).any() else np.full_like(green, reach)
    outside = cv2.distanceTransform(1 - n8, cv2.DIST_L2, 3) if nucleus.any() else np.full_like(green, reach)
    inside, outside = np.minimum(inside, reach), np.minimum(outside, reach)
    for region, distance, edges in (
        (nucleus, inside, params["radial_inside"]),
        (cytoplasm, outside, params["radial_outside"]),
    ):
        bounds = [0.0, *edges, np.inf]
        for low, high in itertools.pairwise(bounds):
            band = region & (distance > low) & (distance <= high)
            values.append(mean(green[band]) / (cell_mean + eps))
    signed = np.where(nucleus, -inside, outside)[cell].astype(np.float64)
    weights = green[cell].astype(np.float64)
    values.append(float(weights @ signed / weights.sum() - signed.mean()) if weights.sum() > 0 else 0.0)
    # texture and granularity
    sigma = float(params["texture_sigma"])
    local_mean = cv2.GaussianBlur(green, (0, 0), sigma)
    local_std = np.sqrt(np.maximum(cv2.GaussianBlur(green * green, (0, 0), sigma) - local_mean**2, 0))
    gradient = np.hypot(cv2.Sobel(green, cv2.CV_32F, 1, 0), cv2.Sobel(green, cv2.CV_32F, 0, 1))
    tops = [
        green - cv2.morphologyEx(green, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (s, s)))
        for s in params["openings"]
    ]
    for region, region_mean in ((nucleus, nucleus_mean), (cytoplasm, cytoplasm_mean)):
        total = float(green[region].astype(np.float64).sum())
        values += [
            mean(local_std[region]) / (region_mean + eps),
            mean(gradient[region]) / (region_mean + eps),
        ]
        values += [float(top[region].astype(np.float64).sum()) / (total + eps) for top in tops]
    # nucleolus-like
    holes = nucleus & (
        blue < float(params["hole_ratio"]) * cv2.GaussianBlur(blue, (0, 0), float(params["hole_blur"]))
    )
    nucleus_green = float(green[nucleus].astype(np.float64).sum())
    median8 = float(np.median(g8[nucleus])) if nucleus.any() else 0.0
    bright = nucleus & (g8 > float(params["nuclear_bright"]) * median8)
    values += [
        float(holes.sum()) / max(int(nucleus.sum()), 1),
        mean(green[holes]) / (nucleus_mean + eps),
        float(green[holes].astype(np.float64).sum()) / (nucleus_green + eps),
        _correlation(green[nucleus], blue[nucleus]),
        _correlation(green[cytoplasm], red[cytoplasm]),
        float(green[bright].astype(np.float64).sum()) / (nucleus_green + eps),
    ]
    # per connected nucleus
    count, labels = cv2.connectedComponents(n8, connectivity=8)
    means, spreads = [], []
    for label in range(1, count):
        inside_one = green[labels == label].astype(np.float64)
        if inside_one.size >= int(params["min_nucleus"]):
            means.append(inside_one.mean())
            spreads.append(inside_one.std() / (inside_one.mean() + eps))
    per = np.asarray(means)
    values += [
        len(means) / float(params["nucleus_count_scale"]),
        float(per.std() / (per.mean() + eps)) if means else 0.0,
        float(np.mean(spreads)) if means else 0.0,
        float((per > float(params["bright_nucleus"]) * cytoplasm_mean).mean()) if means else 0.0,
    ]
    # levels and ratios
    top = float(np.percentile(green, float(params["top_percentile"]))) + eps
    values += [mean(green[m]) / top for m in (nucleus, cytoplasm, nuclear_rim, cell_rim, ~cell)]
    values += [
        float(np.log((nucleus_mean + eps) / (cytoplasm_mean + eps))),
        float(np.log((mean(green[nuclear_rim]) + eps) / (nucleus_mean + eps))),
        float(np.log((mean(green[cell_rim]) + eps) / (cytoplasm_mean + eps))),
        float(np.log(cell_mean + eps)),
    ]
    return np.asarray(values, dtype=np.float32)


def _assert_same_hand2(images: list[np.ndarray]) -> None:
    for image in images:
        found = hand2_features(image)
        assert np.array_equal(found[:44], hand_features(image))  # v1's part, computed the same way
        # float rounding (sums in another order, float64 against float32) and nothing more
        np.testing.assert_allclose(found[44:], reference_extra_values(image), rtol=2e-4, atol=2e-5)


def test_hand2_is_hand_rgb_v1_then_its_extra_parts_in_layout_order() -> None:
    entry = recipe("hand-rgb2").entry(1280)
    json.dumps(entry)
    assert (entry["name"], entry["version"]) == ("hand-rgb2", 1)
    assert entry["params"] == features._plain(HAND2_PARAMS)
    assert (
        entry["layout"][: len(recipe("hand-rgb").entry(1280)["layout"])]
        == recipe("hand-rgb").entry(1280)["layout"]
    )
    assert [part["name"] for part in entry["layout"][-5:]] == [
        "radial",
        "texture",
        "nucleolar",
        "nuclei",
        "ratios",
    ]
    assert recipe("hand-rgb2").width(1280) == 81
    assert from_manifest(entry, 1280) is recipe("hand-rgb2", 1)
    altered = {**entry, "params": {**entry["params"], "openings": [3, 7]}}
    with pytest.raises(FeatureError, match=r"params .* differ"):
        from_manifest(altered, 1280)
    images = _images()
    x = recipe("hand-rgb2")(images, np.zeros((2, 1280), np.float32))
    assert x.shape == (2, 81)
    assert np.isfinite(x).all()
    assert np.array_equal(x, recipe("hand-rgb2")(images, np.zeros((2, 1280), np.float32)))  # deterministic
    assert np.array_equal(x[:, :44], recipe("hand-rgb")(images, np.zeros((2, 1280), np.float32)))
    both = recipe("lite0-gap+hand-rgb2")(images, np.ones((2, 1280), np.float32))
    assert np.array_equal(both[:, 1280:], x)
    assert (both[:, :1280] == 1).all()
    recipe("hand-rgb2").check_slots(DEFAULT_SLOTS)
    with pytest.raises(FeatureError, match="reads green from input slot 1"):
        recipe("hand-rgb2").check_slots(parse_slots("red,green+yellow,blue"))


def _part(image: np.ndarray, name: str) -> np.ndarray:
    layout = recipe("hand-rgb2").layout(0)
    found = next(part for part in layout if part["name"] == name)
    return hand2_features(image)[found["start"] : found["start"] + found["length"]]


def _disc(x: int, y: int, radius: int, width: int = -1) -> np.ndarray:
    """A filled circle (or a ring of this width) on a 96 px plane, as a boolean mask."""
    plane = np.zeros((96, 96), np.uint8)
    cv2.circle(plane, (x, y), radius, 1, width)
    return plane.astype(bool)


def _cell() -> np.ndarray:
    """One round nucleus (radius 12) in a round cell (radius 28), at 96 px, no green."""
    image = np.zeros((96, 96, 3), np.uint8)
    image[_disc(48, 48, 28), 0] = 160
    image[_disc(48, 48, 12), 2] = 200
    return image


def test_hand2_radial_bands_see_green_at_the_nuclear_edge_and_far_out() -> None:
    near, far = _cell(), _cell()
    near[_disc(48, 48, 14), 1] = 150  # the nucleus and a ring just outside it
    far[_disc(48, 48, 25, 4), 1] = 150  # a ring near the cell's edge
    radial_near, radial_far = _part(near, "radial"), _part(far, "radial")
    # bands: 3 inside the nucleus, then cytoplasm at <3, 3-8, 8-16, >16 px; then the signed distance
    assert radial_near[3] > 0.5 > radial_near[5]
    assert radial_far[6] > 1 > radial_far[3]
    assert radial_far[0] == radial_far[1] == radial_far[2] == 0  # no green in the nucleus
    assert radial_far[7] > 0 > radial_near[7]  # green outward of the cell's average distance, or inward


def test_hand2_sees_green_in_a_nucleolus_the_blue_leaves_dim() -> None:
    image = _cell()
    image[_disc(48, 48, 4), 2] = 60  # a dim hole in the DNA stain
    even = image.copy()
    image[_disc(48, 48, 4), 1] = 200
    even[_disc(48, 48, 12), 1] = 40
    holes_area, hole_green, hole_share, with_blue, _, bright = _part(image, "nucleolar")
    assert 0 < holes_area < 0.3
    assert hole_green > 3
    assert hole_share > 0.8
    assert with_blue < 0
    assert bright > 0.8
    assert _part(even, "nucleolar")[1] < 1.5  # an evenly green nucleus: the hole is not brighter


def test_hand2_counts_nuclei_and_sees_one_brighter_than_the_other() -> None:
    image = np.zeros((96, 96, 3), np.uint8)
    for x, level in ((24, 200), (72, 40)):
        image[_disc(x, 48, 20), 0] = 160
        image[_disc(x, 48, 20), 1] = 60  # the cytoplasm's green
        image[_disc(x, 48, 10), 2] = 200
        image[_disc(x, 48, 10), 1] = level
    count, between, within, bright = _part(image, "nuclei")
    assert count == pytest.approx(0.2)
    assert between > 0.5
    assert within < between / 2  # each nucleus evenly green but its blurred edge
    assert bright == 0.5  # above 1.5 x the cytoplasm's green: the bright one only


def test_hand2_ratios_hardly_move_when_the_exposure_halves() -> None:
    image = _images(1, 224)[0]
    dim = image.copy()
    dim[..., 1] = (image[..., 1].astype(np.uint16) // 2).astype(np.uint8)
    levels, dim_levels = _part(image, "ratios")[:5], _part(dim, "ratios")[:5]
    np.testing.assert_allclose(dim_levels, levels, atol=0.03)
    assert _part(dim, "ratios")[8] < _part(image, "ratios")[8] - 0.5  # the log mean does move


def test_hand2_equals_the_plain_reference_on_synthetic_stacks_of_every_size() -> None:
    _assert_same_hand2([*_stacks_of_every_size(seed=6, step=5), _cell()])


def test_hand2_equals_the_plain_reference_on_the_real_stacks(stack_source: Path) -> None:
    _assert_same_hand2(_real_stacks(stack_source))


def test_a_recipes_image_values_computed_apart_give_the_same_vector() -> None:
    images = _images()
    embeddings = np.random.default_rng(3).random((len(images), 1280), dtype=np.float32)
    assert features.recipe("lite0-gap").image_part(images) is None
    for name, version in features.RECIPES:
        recipe = features.recipe(name, version)
        apart = recipe.image_part(images)
        whole = recipe(images, embeddings)
        np.testing.assert_array_equal(recipe(images, embeddings, apart), whole, err_msg=name)
        assert whole.shape == (len(images), recipe.width(1280)), name
