"""Training on what ships: the converted embedder comes first, the forests learn its numbers,
the bundle ships that very file, and the agent gives the evaluation's labels on held-out files.

One chain per session, on the session's synthetic set: `hpa-edge convert` (int8, 20
calibration stacks), `embed --embedder`, `train` (small forests), `export`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.model.bundle import BundleError, load_bundle
from agent.model.review import SET_RISK_INPUTS
from agent.model.runtimes import load_embedder
from agent.model.thresholds import apply
from agent.stacks.digest import file_sha256
from agent.stacks.labels import CHANNELS, LOCATIONS
from agent.stacks.preprocess import preprocess
from tests.conftest import export_args

pytestmark = pytest.mark.integration

RECIPE = "lite0-gap+hand-rgb"


@pytest.fixture(scope="session")
def converted(synthetic_set: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from agent.cli import main

    out = tmp_path_factory.mktemp("converted") / "embedder.tflite"
    assert main(["convert", "--data", str(synthetic_set), "--out", str(out), "--calibration", "20"]) == 0
    return out


@pytest.fixture(scope="session")
def deployed_cache(synthetic_set: Path, converted: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from agent.cli import main

    out = tmp_path_factory.mktemp("deployed-cache") / "cache"
    args = ["embed", "--data", str(synthetic_set), "--embedder", str(converted), "--out", str(out),
            "--features", RECIPE, "--quiet"]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def deployed_model(
    synthetic_set: Path, deployed_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from agent.cli import main

    out = tmp_path_factory.mktemp("deployed-model") / "model"
    args = ["train", "--embeddings", str(deployed_cache), "--labels", str(synthetic_set / "train.csv"),
            "--out", str(out), "--trees", "10", "--original-trees", "10", "--bootstrap", "50"]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def deployed_bundle(
    synthetic_set: Path, deployed_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    from export.conversion.make_bundle import export

    out = tmp_path_factory.mktemp("deployed-bundle") / "bundle"
    assert export(export_args(model=deployed_model, data=synthetic_set, out=out, quantization=None)) == 0
    return out


def _sidecar(path: Path) -> dict[str, Any]:
    entry: dict[str, Any] = json.loads(path.with_name(path.name + ".json").read_text())
    return entry


def _manifest(folder: Path) -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((folder / "manifest.json").read_text())
    return manifest


def test_convert_describes_the_file_it_writes(converted: Path, synthetic_set: Path) -> None:
    entry = _sidecar(converted)
    assert entry["sha256"] == file_sha256(converted)
    assert entry["quantization"] == "int8"
    assert entry["calibration"]["stacks"] == len(entry["calibration"]["ids"]) == 20
    labelled = {line.split(",")[0] for line in (synthetic_set / "train.csv").read_text().splitlines()[1:]}
    assert set(entry["calibration"]["ids"]) <= labelled
    assert entry["preprocessing"]["size"] == 224


def test_embed_keys_the_cache_by_the_converted_file_and_keeps_a_copy(
    deployed_cache: Path, converted: Path
) -> None:
    key = json.loads((deployed_cache / "cache.json").read_text())
    assert key["embedder"]["sha256"] == file_sha256(converted)
    assert key["features"]["name"] == RECIPE
    assert (deployed_cache / "embedder.tflite").read_bytes() == converted.read_bytes()


def test_the_cached_vectors_are_the_device_runtimes_numbers(
    deployed_cache: Path, converted: Path, synthetic_set: Path
) -> None:
    """The vectors the forests are fitted on are what LiteRT gives for the device's pixels."""
    from agent.model.features import recipe
    from export.data.dataset import Dataset
    from export.features.embed import EmbeddingCache

    embeddings = EmbeddingCache(deployed_cache).load()
    entry = _sidecar(converted)
    from agent.stacks.preprocess import Preprocessing

    prep = Preprocessing.from_dict(entry["preprocessing"])
    runtime = load_embedder(converted.read_bytes())
    dataset = Dataset(synthetic_set, synthetic_set / "train.csv")
    wanted = set(embeddings.ids[:3])
    for sample, stack in dataset.stacks_for(wanted):
        assert not isinstance(stack, Exception)
        image = preprocess(stack.channels, prep)[None]
        expected = recipe(RECIPE)(image, runtime(image))
        np.testing.assert_array_equal(embeddings.rows([sample.stack_id]), expected)


def test_a_converted_file_that_no_longer_matches_its_description_is_refused(
    converted: Path, synthetic_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    copy = tmp_path / "embedder.tflite"
    shutil.copyfile(converted, copy)
    shutil.copyfile(converted.with_name(converted.name + ".json"), copy.with_name(copy.name + ".json"))
    copy.write_bytes(copy.read_bytes() + b"\0")
    code = main(
        ["embed", "--data", str(synthetic_set), "--embedder", str(copy), "--out", str(tmp_path / "c")]
    )
    assert code == 2
    assert "sha256 differs" in capsys.readouterr().err


def test_a_cache_refuses_vectors_from_another_converted_file(
    deployed_cache: Path,
    converted: Path,
    synthetic_set: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from agent.cli import main

    cache = tmp_path / "cache"
    shutil.copytree(deployed_cache, cache)
    other = tmp_path / "other.tflite"
    other.write_bytes(converted.read_bytes() + b"\0")  # a different file (same network, runs the same)
    entry = {**_sidecar(converted), "sha256": file_sha256(other)}
    other.with_name(other.name + ".json").write_text(json.dumps(entry))
    args = ["embed", "--data", str(synthetic_set), "--embedder", str(other), "--out", str(cache),
            "--features", RECIPE]  # fmt: skip
    assert main(args) == 2
    assert "other settings" in capsys.readouterr().err


def test_train_passes_on_the_embedder_and_the_held_out_probabilities(
    deployed_model: Path, converted: Path
) -> None:
    meta = json.loads((deployed_model / "model.json").read_text())
    assert (deployed_model / "embedder.tflite").read_bytes() == converted.read_bytes()
    with np.load(deployed_model / "held_out.npz") as data:
        assert data["ids"].tolist() == meta["test_ids"]
        assert data["probabilities"].shape == (len(meta["test_ids"]), len(LOCATIONS))
    assert meta["set_confidence"]["method"] == "calibrated-product"


def test_train_refuses_a_cache_that_lost_its_embedder(
    deployed_cache: Path, synthetic_set: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    cache = tmp_path / "cache"
    shutil.copytree(deployed_cache, cache)
    (cache / "embedder.tflite").unlink()
    args = ["train", "--embeddings", str(cache), "--labels", str(synthetic_set / "train.csv"),
            "--out", str(tmp_path / "model")]  # fmt: skip
    assert main(args) == 2
    assert "copy of its embedder is missing" in capsys.readouterr().err


def test_export_ships_the_file_the_forests_were_trained_on(deployed_bundle: Path, converted: Path) -> None:
    manifest = _manifest(deployed_bundle)
    assert (deployed_bundle / "embedder.tflite").read_bytes() == converted.read_bytes()
    fidelity = manifest["fidelity"]
    assert fidelity["trained_on"] == "exported"
    assert fidelity["gate"] is None
    assert fidelity["agent_agreement"]["label_flips"] == 0
    assert fidelity["agent_agreement"]["identical_label_sets"] == 1.0
    assert fidelity["agent_agreement"]["stacks"] > 0


def test_the_agent_gives_the_evaluations_labels_on_the_held_out_stacks(
    deployed_bundle: Path,
    deployed_model: Path,
    synthetic_set: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The bundle's own held-out predictions (what the evaluation scored) are what
    `hpa-edge predict`, the agent's pipeline, says about the same files on this machine."""
    from agent.cli import main

    with np.load(deployed_model / "held_out.npz") as data:
        ids, probabilities = data["ids"].tolist()[:20], data["probabilities"][:20]
    thresholds = np.asarray(_manifest(deployed_bundle)["thresholds"])
    folder = tmp_path / "held"
    folder.mkdir()
    for stack_id in ids:
        for channel in CHANNELS:
            shutil.copyfile(synthetic_set / f"{stack_id}_{channel}.png", folder / f"{stack_id}_{channel}.png")
    assert main(["predict", "--bundle", str(deployed_bundle), str(folder)]) == 0
    results = {r["stack_id"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
    expected = apply(probabilities, thresholds)
    for stack_id, row in zip(ids, expected, strict=True):
        assert results[stack_id]["labels"] == [name for name, on in zip(LOCATIONS, row, strict=True) if on]


def test_export_refuses_another_quantization_than_the_trained_on_file(
    deployed_model: Path, synthetic_set: Path, tmp_path: Path
) -> None:
    from export.conversion.make_bundle import ExportError, export

    with pytest.raises(ExportError, match="trained on the features of the model's int8 embedder"):
        export(
            export_args(model=deployed_model, data=synthetic_set, out=tmp_path / "b", quantization="float16")
        )


def test_export_fails_and_leaves_no_manifest_when_the_agent_disagrees_with_the_evaluation(
    deployed_model: Path, synthetic_set: Path, tmp_path: Path
) -> None:
    """As if training had scored other numbers than the device computes (e.g. other pixels)."""
    from export.conversion.make_bundle import ExportError, export

    model = tmp_path / "model"
    shutil.copytree(deployed_model, model)
    with np.load(model / "held_out.npz") as data:
        ids, probabilities = data["ids"], data["probabilities"]
    np.savez(model / "held_out.npz", ids=ids, probabilities=1.0 - probabilities)
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match="disagrees with the evaluation"):
        export(export_args(model=model, data=synthetic_set, out=out, quantization=None))
    assert not (out / "manifest.json").exists()


def test_golden_stacks_are_channel_files_pinned_by_the_manifest(deployed_bundle: Path) -> None:
    manifest = _manifest(deployed_bundle)
    assert manifest["golden"]["inputs"] == "channel files"
    with np.load(deployed_bundle / "golden.npz") as data:
        assert "images" not in data.files  # no preprocessed pixels: the agent makes its own
        stacks = data["stacks"].tolist()
    assert len(stacks) == manifest["golden"]["n"] == 3
    listed = {entry["path"] for entry in manifest["files"].values()}
    for stack_id in stacks:
        for channel in CHANNELS:
            assert f"{stack_id}_{channel}.png" in listed
    assert load_bundle(deployed_bundle).golden is not None


def test_a_change_in_decoding_on_the_device_is_caught_by_the_golden_stacks(
    deployed_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As if a new OpenCV decoded the files darker: the golden stacks go through decoding."""
    import agent.stacks.image as image

    real = image._checked

    def darker(pixels: np.ndarray, header: Any, path: Path) -> np.ndarray:
        return real(pixels, header, path) // 3

    monkeypatch.setattr(image, "_checked", darker)
    with pytest.raises(BundleError, match="golden"):
        load_bundle(deployed_bundle)


def test_a_golden_file_the_manifest_does_not_pin_is_refused(deployed_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    shutil.copytree(deployed_bundle, folder)
    manifest = _manifest(folder)
    del manifest["files"]["golden-0_green"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="golden file not listed"):
        load_bundle(folder)


def test_the_bundle_carries_the_set_confidence_and_results_report_it(
    deployed_bundle: Path, synthetic_set: Path
) -> None:
    from agent.model.pipeline import Pipeline

    bundle = load_bundle(deployed_bundle)
    assert bundle.trust.set_calibration is not None
    stack_id = _manifest(deployed_bundle)["golden"]["sources"][0]
    paths = {c: synthetic_set / f"{stack_id}_{c}.png" for c in CHANNELS}
    document = Pipeline(bundle, "test").analyse(stack_id, paths).document
    assert 0.0 <= document["set_confidence"] <= 1.0
    assert bundle.trust.set_risk is not None  # the flag's cut is the set-risk model's
    assert 0.0 <= document["set_risk"] <= 1.0
    flagged_for_it = document["set_risk"] > bundle.trust.set_risk.cut
    assert ("uncertain_set" in document["review_reasons"]) == flagged_for_it


def test_the_set_risk_graph_gives_scikit_learns_risks(deployed_bundle: Path, deployed_model: Path) -> None:
    from export.conversion.make_bundle import read_model

    trained = read_model(deployed_model, None)
    assert trained.set_risk is not None
    inputs = np.random.default_rng(0).uniform(size=(50, SET_RISK_INPUTS)).astype(np.float32)
    inputs[:, -1] = np.round(inputs[:, -1] * 3)
    bundle = load_bundle(deployed_bundle)
    assert bundle.trust.set_risk is not None
    shipped = np.asarray(bundle.trust.set_risk.model(inputs))[:, 0]
    assert shipped == pytest.approx(trained.set_risk.predict_proba(inputs)[:, 1], abs=1e-5)
    assert bundle.trust.set_risk.cut == pytest.approx(trained.set_risk.cut_)


def test_a_set_risk_entry_without_its_file_or_for_other_inputs_is_refused(
    deployed_bundle: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "bundle"
    shutil.copytree(deployed_bundle, folder)
    manifest = _manifest(folder)
    manifest["set_risk"]["inputs"] = 29
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="set_risk: inputs 29"):
        load_bundle(folder)
    del manifest["files"]["set_risk"]
    (folder / "set_risk.onnx").unlink()
    manifest["set_risk"]["inputs"] = SET_RISK_INPUTS
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="set_risk needs"):
        load_bundle(folder)


def test_a_malformed_set_confidence_entry_is_refused(deployed_bundle: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bundle"
    shutil.copytree(deployed_bundle, folder)
    manifest = _manifest(folder)
    manifest["set_confidence"]["locations"] = manifest["set_confidence"]["locations"][:5]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="set_confidence"):
        load_bundle(folder)
