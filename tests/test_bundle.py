"""Model bundles: what export writes, what the device accepts, and every way a bundle is refused."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.model.bundle import BundleError, load_bundle
from agent.stacks.digest import file_sha256
from agent.stacks.labels import LOCATIONS
from tests.conftest import REPO, export_args

pytestmark = pytest.mark.integration


def _copy(bundle: Path, tmp_path: Path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(bundle, target)
    return target


def _edit_manifest(folder: Path, change: dict[str, object]) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(change)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_the_manifest_follows_the_published_schema(small_bundle: Path) -> None:
    import jsonschema

    schema = json.loads((REPO / "models" / "manifest.schema.json").read_text())
    manifest = json.loads((small_bundle / "manifest.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(manifest, schema, cls=jsonschema.Draft202012Validator)


def test_an_exported_bundle_loads_and_passes_its_golden_vectors(small_bundle: Path) -> None:
    bundle = load_bundle(small_bundle)
    assert bundle.golden is not None
    assert bundle.golden.n == 3
    assert bundle.golden.min_cosine > 0.9999
    assert bundle.embedder.input_dtype == np.uint8  # int8 model: raw pixels in
    manifest = bundle.manifest
    assert manifest["purpose"] == "demo"
    assert manifest["fidelity"]["quantization"] == "int8"
    assert 0.0 <= manifest["fidelity"]["identical_label_sets"] <= 1.0


def test_a_bundle_of_lite0_carries_the_weights_licence(small_bundle: Path) -> None:
    manifest = json.loads((small_bundle / "manifest.json").read_text())
    assert "Apache" in manifest["backbone"]["licence"]
    assert "Apache License" in (small_bundle / manifest["files"]["licence"]["path"]).read_text()


def test_thresholds_are_applied_in_the_bundle(small_bundle: Path) -> None:
    bundle = load_bundle(small_bundle, check_golden=False)
    probabilities = np.array([bundle.thresholds, bundle.thresholds - 1e-3])
    labels = bundle.labels_for(probabilities)
    assert labels[0].all()
    assert not labels[1].any()


def test_a_missing_file_is_named(small_bundle: Path, tmp_path: Path) -> None:
    folder = _copy(small_bundle, tmp_path)
    (folder / "classifiers.onnx").unlink()
    with pytest.raises(BundleError, match=r"classifiers\.onnx: classifiers file is missing"):
        load_bundle(folder)


def test_one_changed_byte_is_caught_by_its_hash(small_bundle: Path, tmp_path: Path) -> None:
    folder = _copy(small_bundle, tmp_path)
    data = bytearray((folder / "embedder.tflite").read_bytes())
    data[len(data) // 2] ^= 1
    (folder / "embedder.tflite").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"embedder\.tflite: sha256 .* differs from the manifest"):
        load_bundle(folder)


def test_an_unknown_schema_version_is_refused(small_bundle: Path, tmp_path: Path) -> None:
    folder = _copy(small_bundle, tmp_path)
    _edit_manifest(folder, {"schema_version": 2})
    with pytest.raises(BundleError, match="schema_version 2 is not supported"):
        load_bundle(folder)


def test_labels_that_do_not_match_the_model_are_refused(small_bundle: Path, tmp_path: Path) -> None:
    folder = _copy(small_bundle, tmp_path)
    _edit_manifest(folder, {"labels": list(reversed(LOCATIONS))})
    with pytest.raises(BundleError, match="labels are not the 28 locations"):
        load_bundle(folder)
    _edit_manifest(folder, {"labels": list(LOCATIONS[:27])})
    with pytest.raises(BundleError, match="labels are not the 28 locations"):
        load_bundle(folder)


def test_golden_outputs_this_machine_cannot_reproduce_are_refused(small_bundle: Path, tmp_path: Path) -> None:
    """As if another runtime or CPU computed different answers: the golden check says so."""
    folder = _copy(small_bundle, tmp_path)
    with np.load(folder / "golden.npz") as data:
        golden = {k: data[k] for k in data.files}
    golden["probabilities"] = np.clip(golden["probabilities"] + 0.2, 0, 1)
    np.savez_compressed(folder / "golden.npz", **golden)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["golden"]["sha256"] = file_sha256(folder / "golden.npz")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="golden probabilities differ"):
        load_bundle(folder)


def test_verify_command_says_ok_or_exactly_what_is_wrong(
    small_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    assert main(["verify", str(small_bundle)]) == 0
    out = capsys.readouterr().out
    assert "verify: OK" in out
    assert "demonstration bundle" in out
    folder = _copy(small_bundle, tmp_path)
    (folder / "golden.npz").unlink()
    assert main(["verify", str(folder)]) == 1
    assert "REFUSED" in capsys.readouterr().out


def test_export_fails_the_fidelity_gate_loudly_and_writes_no_bundle(
    synthetic_set: Path, small_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from export.conversion.make_bundle import run

    out = tmp_path / "refused"
    args = export_args(
        model=small_model, data=synthetic_set, out=out, quantization="float32", min_identical=1.01
    )
    assert run(args) == 2
    assert "fidelity gate failed" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()


def test_the_embedder_refuses_pixels_of_the_wrong_size_or_type(small_bundle: Path) -> None:
    bundle = load_bundle(small_bundle, check_golden=False)
    size = bundle.preprocessing.size
    with pytest.raises(ValueError, match=f"expected uint8 N x {size}"):
        bundle.embedder(np.zeros((1, size, size, 3), np.float32))
    with pytest.raises(ValueError, match=f"expected uint8 N x {size}"):
        bundle.embedder(np.zeros((1, size // 2, size // 2, 3), np.uint8))


def test_without_any_tflite_runtime_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.model import runtimes

    backend = types.ModuleType("tests.absent_backend")
    backend.LIBRARY = "no_such_runtime.interpreter"  # type: ignore[attr-defined]

    def load(model: bytes, threads: int) -> None:
        import no_such_runtime  # type: ignore[import-not-found]  # noqa: F401

    backend.load = load  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, backend.__name__, backend)
    monkeypatch.setattr(runtimes, "EMBEDDERS", (backend.__name__,))
    with pytest.raises(runtimes.RuntimeMissingError, match="install ai-edge-litert"):
        runtimes.load_embedder(b"model")
    with pytest.raises(runtimes.RuntimeMissingError, match="no_such_runtime"):
        runtimes.embedder_runtime()


def test_litert_is_the_runtime_chosen_on_this_machine() -> None:
    from agent.model.runtimes import embedder_runtime

    assert embedder_runtime() == "ai_edge_litert.interpreter"


def test_every_backend_returns_the_same_arrays(demo_bundle: Any) -> None:
    """LiteRT and tf.lite (the workstation's fallback) give float32 N x 1280 from the same pixels."""
    from agent.model.runtimes import litert, tf_lite

    model = (demo_bundle.folder / demo_bundle.manifest["files"]["embedder"]["path"]).read_bytes()
    pixels = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    outputs = [backend.load(model, 1)(pixels) for backend in (litert, tf_lite)]
    assert [(out.dtype, out.shape) for out in outputs] == [(np.dtype(np.float32), (2, 1280))] * 2


def test_the_committed_demo_bundle_verifies_here_and_says_it_is_a_demo() -> None:
    folder = REPO / "models" / "demo"
    bundle = load_bundle(folder)
    assert bundle.purpose == "demo"
    assert bundle.manifest["quantization"] == "int8"
    assert sum(p.stat().st_size for p in folder.iterdir()) < 15_000_000
    assert (folder / "LICENSE-efficientnet-lite0").is_file()


# What the device needs to say how far to trust an answer (issue 16) ---------------------------
def test_the_manifest_lists_every_location_with_its_status_positives_threshold_and_margin(
    small_bundle: Path, small_model: Path
) -> None:
    manifest = json.loads((small_bundle / "manifest.json").read_text())
    locations = manifest["locations"]
    assert [row["name"] for row in locations] == list(LOCATIONS)
    assert [row["threshold"] for row in locations] == manifest["thresholds"]
    meta = json.loads((small_model / "model.json").read_text())
    assert [row["positives"] for row in locations] == [meta["data"]["train_positives"][n] for n in LOCATIONS]
    assert {row["status"] for row in locations} >= {"trained", "not trained"}  # 240 stacks: rare ones too few
    for row in locations:
        assert row["margin"] >= 0
        if row["status"] == "trained":
            assert "reason" not in row
        else:
            assert row["reason"]
            assert row["threshold"] == 1.0
            assert row["margin"] == 0.0
        if row["status"] == "not trained":
            assert row["positives"] < 10


def test_locations_never_predicted_have_no_forest_in_the_onnx_graph(small_bundle: Path) -> None:
    bundle = load_bundle(small_bundle, check_golden=False)
    locations = bundle.manifest["locations"]
    off = np.array([row["status"] != "trained" for row in locations])
    assert off.any()
    embeddings = np.random.default_rng(0).normal(size=(16, bundle.classifier.n_features)).astype(np.float32)
    probabilities = bundle.classifier(embeddings)
    assert (probabilities[:, off] == 0).all()
    assert (probabilities[:, ~off] > 0).any()
    assert not bundle.labels_for(probabilities)[:, off].any()


def test_the_novelty_reference_ships_as_a_hashed_file_with_its_threshold(small_bundle: Path) -> None:
    from agent.model.novelty import NoveltyReference

    manifest = json.loads((small_bundle / "manifest.json").read_text())
    entry = manifest["files"]["novelty"]
    assert entry["path"] == "novelty.npz"
    assert entry["sha256"] == file_sha256(small_bundle / "novelty.npz")
    novelty = manifest["novelty"]
    assert novelty["method"] == "pca-whitened-rms-or-residual"
    assert novelty["percentile"] == 99.5
    with np.load(small_bundle / "novelty.npz", allow_pickle=False) as data:
        reference = NoveltyReference(data["mean"], data["components"], data["scales"])
    assert reference.mean.shape == (1280,)
    assert reference.components.shape == (novelty["components"], 1280)
    assert novelty["threshold"] > 0
    with np.load(small_bundle / "golden.npz") as golden:
        distances = reference.distance(golden["embeddings"])
    assert np.isfinite(distances).all()
    fidelity = manifest["fidelity"]
    assert 0 <= fidelity["novel_share_float"] <= 1
    assert 0 <= fidelity["novel_share_exported"] <= 1


def test_the_manifest_carries_the_image_quality_reference_of_the_training_stacks(small_bundle: Path) -> None:
    from agent.stacks import quality

    manifest = json.loads((small_bundle / "manifest.json").read_text())
    reference = manifest["quality"]["reference"]
    assert reference["stacks"] == 20  # the calibration stacks
    assert set(reference["figures"]) >= {"focus", "nucleus_fraction", "brightness_green"}
    assert quality.assess({"focus": 1.0}, reference) is not None  # the agent's checks read it


def test_a_bundle_without_a_features_entry_is_todays_recipe(small_bundle: Path, tmp_path: Path) -> None:
    folder = _copy(small_bundle, tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest.pop("features")["name"] == "lite0-gap"  # export writes it; older bundles lack it
    (folder / "manifest.json").write_text(json.dumps(manifest))
    bundle = load_bundle(folder)
    assert (bundle.features.name, bundle.features.version) == ("lite0-gap", 1)
    assert bundle.golden is not None
    assert bundle.golden.labels_identical


def test_a_bundle_that_names_todays_recipe_with_its_layout_loads(small_bundle: Path, tmp_path: Path) -> None:
    from agent.model.features import recipe

    folder = _copy(small_bundle, tmp_path)
    _edit_manifest(folder, {"features": recipe("lite0-gap", 1).entry(1280)})
    assert load_bundle(folder).features.name == "lite0-gap"


@pytest.mark.parametrize(
    ("features", "message"),
    [
        ({"name": "lite0-region", "version": 1}, r"manifest\.json: unknown feature recipe 'lite0-region'"),
        ({"name": "lite0-gap", "version": 7}, "'lite0-gap' version 7 is unknown to this agent"),
        ({"name": "hand-rgb", "version": 1, "params": {}}, r"hand-rgb v1: the manifest's params \{\} differ"),
        ("hand-rgb", r"hand-rgb v1 gives 44 values \(embedder 1280\), classifiers take 1280"),
    ],
)
def test_a_feature_recipe_this_agent_does_not_know_or_cannot_feed_is_refused(
    small_bundle: Path, tmp_path: Path, features: dict[str, object] | str, message: str
) -> None:
    from agent.model.features import recipe

    folder = _copy(small_bundle, tmp_path)  # a lite0-gap bundle
    entry = recipe(features).entry(1280) if isinstance(features, str) else features
    _edit_manifest(folder, {"features": entry})
    with pytest.raises(BundleError, match=message):
        load_bundle(folder)


def _recipe_bundle(tmp_path: Path, name: str) -> Path:
    """The demo bundle with classifiers (small forests) that take the recipe's vector, its golden
    probabilities redone through the recipe, and the manifest naming it (no novelty reference)."""
    from sklearn.ensemble import ExtraTreesClassifier

    from agent.model.bundle import golden_images
    from agent.model.features import recipe
    from agent.model.runtimes import load_classifier
    from agent.stacks.preprocess import Preprocessing
    from export.conversion.convert import forests_to_onnx

    folder = _copy(REPO / "models" / "demo", tmp_path)
    found = recipe(name)
    with np.load(folder / "golden.npz") as golden:
        arrays = {key: golden[key] for key in golden.files}
    embeddings = arrays["embeddings"]
    prep = Preprocessing.from_dict(json.loads((folder / "manifest.json").read_text())["preprocessing"])
    images = golden_images(folder, arrays["stacks"].tolist(), prep)  # the golden channel files, read
    width = found.width(embeddings.shape[1])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, width)).astype(np.float32)
    forests = []
    for j in range(len(LOCATIONS)):  # each forest answers from one column of the recipe's tail
        column = (x[:, width - 1 - j % 44] > 0).astype(np.int64)
        forests.append(ExtraTreesClassifier(n_estimators=4, max_leaf_nodes=8, random_state=j).fit(x, column))
    onnx = forests_to_onnx(forests, width)
    (folder / "classifiers.onnx").write_bytes(onnx)
    arrays["probabilities"] = load_classifier(onnx)(found(images, embeddings))
    np.savez_compressed(folder / "golden.npz", **arrays)
    manifest = json.loads((folder / "manifest.json").read_text())
    for role in ("classifiers", "golden"):
        path = folder / manifest["files"][role]["path"]
        manifest["files"][role].update(sha256=file_sha256(path), bytes=path.stat().st_size)
    manifest["files"].pop("novelty", None)
    manifest.pop("novelty", None)
    manifest["features"] = found.entry(embeddings.shape[1])
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def test_the_device_pipeline_feeds_the_classifiers_the_bundles_recipe(
    tmp_path: Path, stack_source: Path
) -> None:
    from agent.model.features import recipe
    from agent.model.pipeline import Pipeline
    from agent.stacks.preprocess import preprocess
    from agent.stacks.stack import find_stacks, read_stack

    folder = _recipe_bundle(tmp_path, "lite0-gap+hand-rgb")
    bundle = load_bundle(folder)
    assert bundle.features is recipe("lite0-gap+hand-rgb", 1)
    assert bundle.golden is not None
    assert bundle.golden.max_probability_difference < 1e-6
    stack_id, paths = sorted(find_stacks(stack_source / "stacks").items())[0]
    document = Pipeline(bundle, "test").analyse(stack_id, paths).document
    image = preprocess(read_stack(stack_id, paths).channels, bundle.preprocessing)[None]
    vector = bundle.features(image, bundle.embedder(image))
    assert vector.shape == (1, 1280 + 44)
    scores = [document["scores"][name] for name in LOCATIONS]
    np.testing.assert_allclose(scores, bundle.classifier(vector)[0], atol=2e-6)


def test_a_bundle_whose_recipe_params_were_altered_is_refused(tmp_path: Path) -> None:
    folder = _recipe_bundle(tmp_path, "lite0-gap+hand-rgb")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["features"]["params"] = {**manifest["features"]["params"], "dog_level": 0.05}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"params .* differ"):
        load_bundle(folder)


# A bundle exported end to end with a feature recipe: embed --features, train, export ----------
RECIPE = "lite0-gap+hand-rgb"


@pytest.fixture(scope="module")
def recipe_export(synthetic_set: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model folder, int8 bundle) of the session's synthetic set with `lite0-gap+hand-rgb`,
    made by the three commands as a user runs them (small forests)."""
    from agent.cli import main
    from export.conversion.make_bundle import export

    work = tmp_path_factory.mktemp("recipe")
    cache, model, bundle = work / "cache", work / "model", work / "bundle"
    assert main(["embed", "--data", str(synthetic_set), "--out", str(cache), "--features", RECIPE,
                 "--quiet"]) == 0  # fmt: skip
    assert main(["train", "--embeddings", str(cache), "--labels", str(synthetic_set / "train.csv"),
                 "--out", str(model), "--trees", "10", "--original-trees", "10", "--bootstrap", "50",
                 "--jobs", "1"]) == 0  # fmt: skip
    assert export(export_args(model=model, data=synthetic_set, out=bundle)) == 0
    return model, bundle


def test_a_bundle_exported_with_a_recipe_names_it_loads_and_passes_its_golden_vectors(
    recipe_export: tuple[Path, Path],
) -> None:
    from agent.model.features import recipe

    model, folder = recipe_export
    found = recipe(RECIPE, 1)
    meta = json.loads((model / "model.json").read_text())
    assert meta["embedding"]["features"] == found.entry(1280)  # the cache key, carried by train
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["features"] == found.entry(1280)
    bundle = load_bundle(folder)
    assert bundle.features is found
    assert bundle.n_features == 1280 + 44
    assert bundle.golden is not None
    assert bundle.golden.labels_identical
    assert bundle.golden.min_cosine > 0.9999
    assert bundle.golden.max_probability_difference < 1e-5
    assert bundle.trust.novelty is not None  # the novelty reference is on the recipe's vectors
    assert bundle.trust.novelty.mean.shape == (1280 + 44,)


def _predict(
    folder: Path, stacks: dict[str, dict[str, Path]], capsys: pytest.CaptureFixture[str]
) -> dict[str, np.ndarray]:
    """`hpa-edge predict`'s scores per stack, in the order of LOCATIONS."""
    from agent.cli import main

    capsys.readouterr()
    files = [str(path) for paths in stacks.values() for path in paths.values()]
    assert main(["predict", "--bundle", str(folder), *files]) == 0
    documents = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return {d["stack_id"]: np.array([d["scores"][name] for name in LOCATIONS]) for d in documents}


def test_the_agents_predict_gives_the_workstations_scores_with_a_recipe_bundle(
    recipe_export: tuple[Path, Path],
    synthetic_set: Path,
    stack_source: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`hpa-edge predict` against the workstation: the int8 bundle's models through the recipe
    (to float rounding); a float32 export of the same model against the float reference
    (Keras, the recipe, scikit-learn) within what float32 against float64 allows."""
    from agent.stacks.preprocess import preprocess
    from agent.stacks.stack import find_stacks, read_stack
    from export.conversion.make_bundle import export
    from export.conversion.reference_pipeline import FloatReference

    model, folder = recipe_export
    stacks = dict(sorted(find_stacks(stack_source / "stacks").items())[:6])
    int8 = _predict(folder, stacks, capsys)
    assert int8.keys() == stacks.keys()
    bundle = load_bundle(folder, check_golden=False)
    images = {
        s: preprocess(read_stack(s, paths).channels, bundle.preprocessing) for s, paths in stacks.items()
    }
    for stack_id, image in images.items():
        exported = bundle.classifier(bundle.features(image[None], bundle.embedder(image[None])))[0]
        np.testing.assert_allclose(int8[stack_id], exported, atol=2e-6)

    float32 = tmp_path / "float32"
    reference = FloatReference(model)
    assert reference.features is bundle.features
    assert export(export_args(model=model, data=synthetic_set, out=float32, quantization="float32")) == 0
    scores = _predict(float32, stacks, capsys)
    for stack_id, image in images.items():
        floats = reference.classify(reference.embed(image))
        np.testing.assert_allclose(scores[stack_id], floats, atol=1e-4)


def test_the_pipeline_computes_the_recipes_image_values_while_the_embedder_runs(
    demo_bundle: Any, tmp_path: Path
) -> None:
    """Each side waits for the other to start: run one after the other, a wait times out."""
    import dataclasses
    import threading

    from agent.model import features
    from agent.model.pipeline import Pipeline
    from agent.model.review import Trust
    from tests.helpers import write_stack

    recipe, embedder = features.recipe("lite0-gap+hand-rgb2"), demo_bundle.embedder
    per_image = recipe.per_image
    assert per_image is not None
    started = {"embedder": threading.Event(), "recipe": threading.Event()}

    def values(image: np.ndarray, params: Any) -> np.ndarray:
        started["recipe"].set()
        assert started["embedder"].wait(10), "the embedder did not run beside the recipe"
        return per_image(image, params)

    def embed(images: np.ndarray) -> np.ndarray:
        started["embedder"].set()
        assert started["recipe"].wait(10), "the recipe did not run beside the embedder"
        return embedder(images)

    given: list[np.ndarray] = []

    def classifier(vectors: np.ndarray) -> np.ndarray:
        given.append(vectors)
        return np.full((len(vectors), len(LOCATIONS)), 0.9, np.float32)

    plain = dataclasses.replace(demo_bundle, features=recipe, classifier=classifier, trust=Trust())
    beside = dataclasses.replace(
        plain, features=dataclasses.replace(recipe, per_image=values), embedder=embed
    )
    paths = write_stack(tmp_path, "s1", size=(96, 96))
    assert Pipeline(beside, "test").analyse("s1", paths).document["kind"] == "result"
    assert Pipeline(plain, "test").analyse("s1", paths).document["kind"] == "result"
    got, expected = given
    assert got.shape == (1, recipe.width(1280))
    np.testing.assert_array_equal(got, expected)


def test_a_recipe_of_the_image_alone_does_not_run_the_embedder(demo_bundle: Any, tmp_path: Path) -> None:
    import dataclasses

    from agent.model import features
    from agent.model.pipeline import Pipeline
    from agent.model.review import Trust
    from tests.helpers import write_stack

    seen: list[np.ndarray] = []

    def embedder(images: np.ndarray) -> np.ndarray:
        raise AssertionError("the embedder ran for a recipe that does not use it")

    def classifier(vectors: np.ndarray) -> np.ndarray:
        seen.append(vectors)
        return np.full((len(vectors), len(LOCATIONS)), 0.9, np.float32)

    hand = features.recipe("hand-rgb")
    bundle = dataclasses.replace(
        demo_bundle, features=hand, embedder=embedder, classifier=classifier, trust=Trust()
    )
    paths = write_stack(tmp_path, "s1", size=(96, 96))
    document = Pipeline(bundle, "test").analyse("s1", paths).document
    assert document["kind"] == "result"
    (vectors,) = seen
    image = Pipeline(bundle, "test").prepare("s1", paths).image[None]  # type: ignore[union-attr]
    np.testing.assert_array_equal(vectors, hand(image, np.zeros((1, 0), np.float32)))


def test_the_device_gives_back_an_embedder_its_recipe_never_reads(tmp_path: Path) -> None:
    from agent.model.bundle import ReleasedEmbedder
    from agent.model.pipeline import Pipeline
    from tests.helpers import write_stack

    kept = load_bundle(REPO / "models" / "demo", threads=1)
    released = load_bundle(REPO / "models" / "demo", threads=1, release_unread_embedder=True)
    assert not released.features.embedding  # the demo's hand-rgb2 reads the image alone
    assert released.golden is not None  # the golden check ran the embedder before it went
    assert isinstance(released.embedder, ReleasedEmbedder)
    assert (released.embedder.runtime, released.embedder.size, released.embedder.dim) == (
        kept.embedder.runtime,
        kept.embedder.size,
        kept.embedder.dim,
    )
    with pytest.raises(RuntimeError, match="released after the golden check"):
        released.embedder(np.zeros((1, 224, 224, 3), np.uint8))
    paths = write_stack(tmp_path, "s1", size=(96, 96))
    with_it, without = (Pipeline(b, "test").analyse("s1", paths).document for b in (kept, released))
    assert without["kind"] == "result"
    assert without["scores"] == with_it["scores"]
    image = Pipeline(kept, "test").prepare("s1", paths).image[None]  # type: ignore[union-attr]
    np.testing.assert_array_equal(released.probabilities(image), kept.probabilities(image))


def test_an_embedder_the_recipe_reads_is_kept(small_bundle: Path) -> None:
    from agent.model.bundle import ReleasedEmbedder

    bundle = load_bundle(small_bundle, threads=1, release_unread_embedder=True)
    assert bundle.features.embedding
    assert not isinstance(bundle.embedder, ReleasedEmbedder)
    assert bundle.embedder(np.zeros((1, 224, 224, 3), np.uint8)).shape == (1, bundle.embedder.dim)
