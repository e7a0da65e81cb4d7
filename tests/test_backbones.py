"""Backbones: Lite0 with its ImageNet weights classifies photos right; B0 random is not degenerate."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from export.features.backbones import (
    IMAGENET_NORMALISATION,
    LITE0_NORMALISATION,
    BackboneError,
    BackboneSpec,
    build,
    lite0_model,
    lite0_state,
    lite0_weights_path,
    set_batchnorm_statistics,
    stem_statistics,
)

EGYPTIAN_CAT, ESPRESSO = 285, 967


def _photo(name: str) -> np.ndarray:
    """A scikit-image photo, centre-cropped square and resized to 224 (RGB uint8)."""
    import skimage.data

    image = getattr(skimage.data, name)()
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    return cv2.resize(image[top : top + side, left : left + side], (224, 224), interpolation=cv2.INTER_AREA)


def test_lite0_refuses_random_weights() -> None:
    with pytest.raises(BackboneError, match="random weights are for b0"):
        BackboneSpec("lite0", "random")


def test_an_unknown_backbone_is_refused() -> None:
    with pytest.raises(BackboneError, match="backbone must be one of"):
        BackboneSpec("resnet50")


def test_a_weights_file_is_identified_by_its_sha256(tmp_path: Path) -> None:
    weights = tmp_path / "b0.weights.h5"
    weights.write_bytes(b"one")
    first = BackboneSpec("b0", str(weights)).identity()
    weights.write_bytes(b"two")
    assert first["sha256"] != BackboneSpec("b0", str(weights)).identity()["sha256"]


def test_a_missing_weights_file_is_named() -> None:
    with pytest.raises(BackboneError, match="does not exist"):
        BackboneSpec("b0", "/nonexistent/b0.h5").identity()


@pytest.mark.integration
def test_lite0_with_its_imagenet_weights_names_the_cat_and_the_espresso() -> None:
    model = lite0_model(lite0_state(lite0_weights_path()), 224, True, LITE0_NORMALISATION)
    probabilities = np.asarray(model(np.stack([_photo("chelsea"), _photo("coffee")]).astype(np.float32)))
    assert int(np.argmax(probabilities[0])) == EGYPTIAN_CAT
    assert int(np.argmax(probabilities[1])) == ESPRESSO


@pytest.mark.integration
def test_lite0_weights_were_trained_on_127_128_scaling_not_imagenet_mean_std() -> None:
    """The stem BatchNorm remembers its input variance; the right scaling reproduces it best."""
    state = lite0_state(lite0_weights_path())
    photos = np.stack([_photo(n) for n in ("chelsea", "coffee", "rocket", "astronaut")])
    ours = stem_statistics(state, photos, LITE0_NORMALISATION)
    other = stem_statistics(state, photos, IMAGENET_NORMALISATION)
    assert abs(np.log(ours)) < abs(np.log(other))


@pytest.mark.integration
def test_lite0_embeddings_are_1280_wide() -> None:
    model = build(BackboneSpec("lite0"), 96)
    out = np.asarray(model(np.zeros((2, 96, 96, 3), np.float32)))
    assert out.shape == (2, 1280)


@pytest.mark.integration
def test_b0_random_weights_give_spread_out_embeddings_and_the_same_ones_for_the_same_seed() -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (6, 64, 64, 3)).astype(np.float32)
    first = np.asarray(build(BackboneSpec("b0", "random", seed=3), 64)(images))
    again = np.asarray(build(BackboneSpec("b0", "random", seed=3), 64)(images))
    np.testing.assert_allclose(first, again, rtol=1e-5, atol=1e-6)
    assert first.shape == (6, 1280)
    assert first.std(axis=0).mean() > 1e-3


@pytest.mark.integration
def test_setting_batchnorm_statistics_is_what_keeps_random_embeddings_apart() -> None:
    import keras

    keras.utils.set_random_seed(1)
    model = keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(64, 64, 3), pooling="avg"
    )
    images = np.random.default_rng(1).integers(0, 255, (6, 64, 64, 3)).astype(np.float32)
    before = np.asarray(model(images)).std(axis=0).mean()
    set_batchnorm_statistics(model, images)
    after = np.asarray(model(images)).std(axis=0).mean()
    assert after > 100 * before


@pytest.mark.integration
def test_b0_loads_a_local_weights_file(tmp_path: Path) -> None:
    """The offline route for real B0 weights: a file downloaded elsewhere gives the same network."""
    images = np.random.default_rng(2).integers(0, 255, (3, 64, 64, 3)).astype(np.float32)
    random_model = build(BackboneSpec("b0", "random", seed=5), 64)
    weights = tmp_path / "b0.weights.h5"
    random_model.save_weights(weights)
    loaded = build(BackboneSpec("b0", str(weights)), 64)
    np.testing.assert_allclose(
        np.asarray(loaded(images)), np.asarray(random_model(images)), rtol=1e-5, atol=1e-6
    )
