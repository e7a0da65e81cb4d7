"""Conversion: the merged ONNX graph answers as scikit-learn does; TFLite takes raw pixels.

Export and the quantization probe convert through one function, so the probe's variants are
checked here beside the export's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.model.runtimes import load_classifier, load_embedder
from agent.model.runtimes.interpreter import InterpreterEmbedder
from agent.model.similarity import cosine
from agent.stacks.labels import N_LOCATIONS
from export.conversion.convert import (
    QUANTIZATIONS,
    check_variant,
    forests_to_onnx,
    saved_model,
    saved_model_to_tflite,
    to_tflite,
)
from export.training.forests import ForestSettings, fit_forests, predict_scores


def test_every_export_and_probe_variant_is_known_and_an_unknown_one_is_refused_with_the_choices() -> None:
    for variant in (*QUANTIZATIONS, "int16x8", "int8-float-sigmoid", "int8-worst-3"):
        check_variant(variant)
    with pytest.raises(ValueError, match="unknown quantization 'int4'; choose from int8, "):
        check_variant("int4")


def test_a_bundle_is_never_converted_with_a_probe_only_variant() -> None:
    with pytest.raises(ValueError, match="quantization must be one of"):
        to_tflite(object(), "int16x8")  # refused before the model is touched


@pytest.mark.integration
def test_the_merged_onnx_graph_matches_scikit_learn_within_1e_5_with_identical_labels() -> None:
    from export.conversion.make_bundle import onnx_parity

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 1280)).astype(np.float32)
    y = (rng.random((300, N_LOCATIONS)) < 0.2).astype(np.uint8)
    y[:, 27] = 0  # a location without positives: no forest, constant 0
    forests = fit_forests(x, y, ForestSettings(trees=15, jobs=2))
    classifier = load_classifier(forests_to_onnx(forests, 1280))
    fresh = rng.normal(size=(200, 1280)).astype(np.float32)
    onnx, sklearn = classifier(fresh), predict_scores(forests, fresh)
    assert onnx.shape == (200, N_LOCATIONS)
    assert (onnx[:, 27] == 0).all()
    difference, flips, _ = onnx_parity(onnx, sklearn, np.full(N_LOCATIONS, 0.3))
    assert difference < 1e-5
    assert flips == 0


@pytest.mark.integration
def test_int8_tflite_takes_uint8_pixels_and_stays_close_to_the_float_model() -> None:
    from export.features.backbones import BackboneSpec, build

    model = build(BackboneSpec("lite0"), 96)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (12, 96, 96, 3), dtype=np.uint8)
    images[:, 20:60, 20:60] = 200  # some structure, not only noise
    embedder = load_embedder(to_tflite(model, "int8", images[:8]))
    assert isinstance(embedder, InterpreterEmbedder)
    assert embedder.input_dtype == np.uint8
    exported = embedder(images[8:])
    reference = np.asarray(model(images[8:].astype(np.float32)))
    assert cosine(exported, reference).min() > 0.8
    assert exported.shape == (4, 1280)


@pytest.mark.integration
def test_the_probe_variants_convert_from_one_saved_model_and_run_on_the_device_runtime() -> None:
    from export.features.backbones import BackboneSpec, build

    model = build(BackboneSpec("lite0"), 64)
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    images[:, 10:40, 10:40] = 200
    reference = np.asarray(model(images[4:].astype(np.float32)))
    with saved_model(model) as folder:
        for variant in ("int16x8", "int8-worst-2"):
            exported = load_embedder(saved_model_to_tflite(folder, variant, images[:4]))(images[4:])
            assert cosine(exported, reference).min() > 0.8, variant


@pytest.mark.integration
def test_int8_without_calibration_images_is_refused() -> None:
    from export.features.backbones import BackboneSpec, build

    with pytest.raises(ValueError, match="needs calibration images"):
        to_tflite(build(BackboneSpec("lite0"), 64), "int8", None)


@pytest.mark.integration
def test_keeping_the_stem_in_float_brings_int8_lite0_closer_to_float(stack_source: Path) -> None:
    """On the real stacks, or the project's synthetic stand-ins at the real size without them."""
    from agent.stacks.preprocess import Preprocessing, preprocess
    from export.data.dataset import Dataset
    from export.features.backbones import BackboneSpec, build

    prep = Preprocessing(size=224)
    dataset = Dataset(stack_source / "stacks", stack_source / "labels.csv")
    images = np.stack([preprocess(s.channels, prep) for _, s in dataset.stacks_for(set(dataset.ids[:30]))])  # type: ignore[union-attr]
    calibration, held = images[:20], images[20:]
    model = build(BackboneSpec("lite0"), 224)
    reference = np.asarray(model(held.astype(np.float32)))

    def mean_cosine(quantization: str) -> float:
        out = load_embedder(to_tflite(model, quantization, calibration))(held)
        return float(cosine(out, reference).mean())

    assert mean_cosine("int8-float-stem") > mean_cosine("int8") + 0.005
