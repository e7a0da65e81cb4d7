"""A model bundle: the only contract between the workstation and the device.

A folder with `manifest.json`, the embedder (`.tflite`), the classifiers (`.onnx`) and the
golden vectors (`golden.npz`: the embeddings and probabilities that a few golden stacks must
give). The golden stacks are channel files in the bundle (`golden-0_red.png`...), read the
way the agent reads any stack (`agent.stacks.stack.read_reduced`: decode, hash, resize,
scale), so a change in decoding or preprocessing is caught at start as well as one in the
runtimes; a bundle made before that carries preprocessed `images` in golden.npz instead.
`load_bundle` refuses a bundle, before anything runs on real data, when:
- the manifest is unreadable, of an unknown schema version, or lacks a field;
- a listed file is missing or its sha256 differs (one changed byte is enough);
- its labels are not the 28 locations in order, or the models' shapes disagree with them;
- the golden inputs, run here, miss their outputs beyond the stated tolerances (catches a
  runtime version, CPU architecture or preprocessing change that alters answers);
- its feature recipe (the optional `features` entry: name, version, params, layout) is not
  one this agent knows (`agent.model.features`), or does not fit the preprocessing or the
  models' shapes. A manifest without `features` is an older bundle: recipe `lite0-gap` v1.
The published JSON Schema of the manifest is `models/manifest.schema.json`; this module
checks what the device relies on without needing a schema library. No pickle is ever read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.model import features as feature_recipes
from agent.model import thresholds as threshold_rule
from agent.model.features import FeatureError, Recipe
from agent.model.novelty import NoveltyReference
from agent.model.review import SET_RISK_INPUTS, Trust, read_set_calibration, read_set_risk
from agent.model.runtimes import Classifier, Embedder, load_classifier, load_embedder
from agent.model.similarity import cosine
from agent.stacks import heap
from agent.stacks.digest import file_sha256
from agent.stacks.errors import StackError
from agent.stacks.labels import CHANNELS, LOCATIONS
from agent.stacks.preprocess import Preprocessing
from agent.stacks.stack import read_reduced

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
FILE_ROLES = ("embedder", "classifiers", "golden")
REQUIRED = (
    "schema_version",
    "purpose",
    "labels",
    "preprocessing",
    "backbone",
    "quantization",
    "thresholds",
    "files",
    "golden",
)


class BundleError(ValueError):
    """The bundle cannot be used; the message says exactly why."""


@dataclass(frozen=True)
class GoldenCheck:
    n: int
    min_cosine: float
    max_probability_difference: float
    labels_identical: bool


@dataclass
class Bundle:
    folder: Path
    manifest: dict[str, Any]
    preprocessing: Preprocessing
    thresholds: np.ndarray
    embedder: Embedder
    classifier: Classifier
    sha256: str  # of manifest.json, which pins every other file by hash
    golden: GoldenCheck | None = None
    trust: Trust = field(default_factory=Trust)
    features: Recipe = feature_recipes.LEGACY  # embedder output -> the classifiers' input

    @property
    def n_features(self) -> int:
        """Length of the vector the classifiers take (the recipe's layout)."""
        return int(self.classifier.n_features)

    @property
    def purpose(self) -> str:
        return str(self.manifest["purpose"])

    @property
    def id(self) -> str:
        """A short name for logs and results: backbone, quantization and the manifest's hash."""
        return f"{self.manifest['backbone']['name']}-{self.manifest['quantization']}-{self.sha256[:12]}"

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        return self.classifier(self.feature_vectors(images, self.features.embeddings(self.embedder, images)))

    def feature_vectors(
        self, images: np.ndarray, embeddings: np.ndarray, image_part: np.ndarray | None = None
    ) -> np.ndarray:
        """The classifiers' input for preprocessed images and their embeddings: the recipe's one
        function (`image_part`: its values of the images alone, when already computed)."""
        return self.features(images, embeddings, image_part)

    def labels_for(self, probabilities: np.ndarray) -> np.ndarray:
        """N x 28 booleans, by the bundle's thresholds (the rule itself: `agent.model.thresholds`)."""
        return threshold_rule.apply(probabilities, self.thresholds)


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not folder.is_dir():
        raise BundleError(f"{folder}: bundle folder does not exist")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{folder}: no {MANIFEST}; not a model bundle") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: manifest must be a JSON object")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{path}: schema_version {version!r} is not supported (this agent reads {SCHEMA_VERSION})"
        )
    missing = [key for key in REQUIRED if key not in manifest]
    if missing:
        raise BundleError(f"{path}: manifest lacks {', '.join(missing)}")
    if list(manifest["labels"]) != list(LOCATIONS):
        raise BundleError(f"{path}: labels are not the 28 locations in the agent's order")
    if len(manifest["thresholds"]) != len(LOCATIONS):
        raise BundleError(f"{path}: {len(manifest['thresholds'])} thresholds for {len(LOCATIONS)} labels")
    return manifest


def check_files(folder: Path, manifest: dict[str, Any]) -> None:
    """Every listed file present with its recorded sha256; the three roles all listed."""
    files = manifest["files"]
    for role in FILE_ROLES:
        if role not in files:
            raise BundleError(f"{folder / MANIFEST}: files lacks the {role!r} entry")
    for role, entry in files.items():
        name = str(entry["path"])
        if Path(name).name != name:
            raise BundleError(f"{folder / MANIFEST}: file {name!r} must sit in the bundle folder")
        path = folder / name
        if not path.is_file():
            raise BundleError(f"{path}: {role} file is missing")
        digest = file_sha256(path)
        if digest != entry["sha256"]:
            raise BundleError(
                f"{path}: sha256 {digest[:12]}... differs from the manifest's {entry['sha256'][:12]}..."
            )


@dataclass
class ReleasedEmbedder:
    """In place of an embedder that the bundle's recipe never reads, once the golden check has
    run it: the interpreter, its weights and buffers are given back (about 15 MB of the agent's
    resident memory with the demo bundle, `hpa-edge bench --startup`); its facts stay for
    logs and status."""

    runtime: str
    size: int
    dim: int
    input_dtype: np.dtype[Any]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        raise RuntimeError(
            "the embedder was released after the golden check: this bundle's feature recipe does not read it"
        )


def load_bundle(
    folder: Path, threads: int = 2, check_golden: bool = True, release_unread_embedder: bool = False
) -> Bundle:
    """Read, check and load a bundle; BundleError says what is wrong.

    `release_unread_embedder`: for the device's pipeline, which never runs the embedder of a
    recipe that does not read it (`Recipe.embedding`): give it back once the golden check
    (which does run it) has passed. Workstation tools that compare embeddings keep it.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    check_files(folder, manifest)
    try:
        preprocessing = Preprocessing.from_dict(manifest["preprocessing"])
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{folder / MANIFEST}: bad preprocessing: {exc}") from None
    files = manifest["files"]
    try:
        embedder = load_embedder(folder / files["embedder"]["path"], threads)
        classifier = load_classifier(folder / files["classifiers"]["path"], threads=1)
    except (ValueError, RuntimeError) as exc:
        raise BundleError(f"{folder}: a model does not load: {exc}") from None
    if embedder.size != preprocessing.size:
        raise BundleError(
            f"{folder}: embedder takes {embedder.size} px but preprocessing makes {preprocessing.size}"
        )
    try:
        recipe = feature_recipes.from_manifest(manifest.get("features"), embedder.dim)
        recipe.check_slots(preprocessing.slots)
    except FeatureError as exc:
        raise BundleError(f"{folder / MANIFEST}: {exc}") from None
    width = recipe.width(embedder.dim)
    if width != classifier.n_features:
        raise BundleError(
            f"{folder}: feature recipe {recipe.name} v{recipe.version} gives {width} values "
            f"(embedder {embedder.dim}), classifiers take {classifier.n_features}"
        )
    if classifier.n_outputs != len(LOCATIONS):
        raise BundleError(
            f"{folder}: classifiers give {classifier.n_outputs} outputs for {len(LOCATIONS)} labels"
        )
    bundle = Bundle(
        folder=folder,
        manifest=manifest,
        preprocessing=preprocessing,
        thresholds=np.asarray(manifest["thresholds"], dtype=np.float64),
        embedder=embedder,
        classifier=classifier,
        sha256=file_sha256(folder / MANIFEST),
        trust=read_trust(folder, manifest, classifier.n_features),
        features=recipe,
    )
    if check_golden:
        bundle.golden = run_golden(bundle)
    if release_unread_embedder and not recipe.embedding:
        facts = (embedder.runtime, embedder.size, embedder.dim, embedder.input_dtype)
        del embedder
        bundle.embedder = ReleasedEmbedder(*facts)
        heap.trim()  # the interpreter's freed buffers sit below live data in glibc's heap
    return bundle


STATUSES = ("trained", "not trained", "not predicted")


def read_trust(folder: Path, manifest: dict[str, Any], n_features: int) -> Trust:
    """The optional `locations`, `novelty`, `quality`, `set_confidence` and `set_risk` entries;
    BundleError when malformed."""
    where = folder / MANIFEST
    margins = np.zeros(len(LOCATIONS))
    available = np.ones(len(LOCATIONS), dtype=bool)
    locations = manifest.get("locations")
    if locations is not None:
        if [entry.get("name") for entry in locations] != list(LOCATIONS):
            raise BundleError(f"{where}: locations are not the 28 locations in the agent's order")
        for i, entry in enumerate(locations):
            if entry.get("status") not in STATUSES:
                raise BundleError(
                    f"{where}: {entry['name']}: status {entry.get('status')!r} is not one of {STATUSES}"
                )
            margin = float(entry.get("margin", 0.0))
            if not margin >= 0:
                raise BundleError(f"{where}: {entry['name']}: margin {margin} is negative")
            margins[i], available[i] = margin, entry["status"] == "trained"
    reference, limit = None, None
    if "novelty" in manifest["files"]:
        path = folder / manifest["files"]["novelty"]["path"]
        try:
            with np.load(path, allow_pickle=False) as data:
                residual = float(data["residual_scale"]) if "residual_scale" in data.files else None
                reference = NoveltyReference(data["mean"], data["components"], data["scales"], residual)
            limit = float(manifest["novelty"]["threshold"])
            method = manifest["novelty"].get("method", reference.method)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise BundleError(f"{path}: unreadable novelty reference: {exc}") from None
        if reference.mean.shape != (n_features,) or reference.components.shape[1:] != (n_features,):
            raise BundleError(f"{path}: novelty reference is not for {n_features} features")
        if method != reference.method:  # the threshold was set for the other formula
            raise BundleError(f"{path}: holds a {reference.method} reference, the manifest says {method}")
    quality = manifest.get("quality", {}).get("reference")
    set_calibration = None
    if "set_confidence" in manifest:
        try:
            set_calibration = read_set_calibration(manifest["set_confidence"])
        except ValueError as exc:
            raise BundleError(f"{where}: set_confidence: {exc}") from None
    set_risk = None
    if "set_risk" in manifest:
        if set_calibration is None or "set_risk" not in manifest["files"]:
            raise BundleError(f"{where}: set_risk needs a set_confidence entry and a set_risk file")
        path = folder / manifest["files"]["set_risk"]["path"]
        try:
            model = load_classifier(path, threads=1)
        except (ValueError, RuntimeError) as exc:
            raise BundleError(f"{path}: the set-risk model does not load: {exc}") from None
        if (model.n_features, model.n_outputs) != (SET_RISK_INPUTS, 1):
            raise BundleError(
                f"{path}: maps {model.n_features} inputs to {model.n_outputs} outputs, "
                f"not {SET_RISK_INPUTS} to 1"
            )
        try:
            set_risk = read_set_risk(manifest["set_risk"], model)
        except ValueError as exc:
            raise BundleError(f"{where}: set_risk: {exc}") from None
    return Trust(margins, available, reference, limit, quality, set_calibration, set_risk)


def golden_paths(folder: Path, stack_id: str) -> dict[str, Path]:
    """Where a golden stack's channel files sit in a bundle: `<stack_id>_<channel>.png`."""
    return {channel: folder / f"{stack_id}_{channel}.png" for channel in CHANNELS}


def golden_images(folder: Path, stack_ids: list[str], prep: Preprocessing) -> np.ndarray:
    """The golden stacks read from their files the agent's way: N x size x size x 3 uint8."""
    try:
        return np.stack([read_reduced(s, golden_paths(folder, s), prep).image for s in stack_ids])
    except StackError as exc:
        raise BundleError(f"{folder}: golden stack unreadable: {exc}") from None


def run_golden(bundle: Bundle) -> GoldenCheck:
    """Run the golden inputs; raise BundleError if the outputs miss the manifest's tolerances."""
    path = bundle.folder / bundle.manifest["files"]["golden"]["path"]
    try:
        with np.load(path, allow_pickle=False) as data:
            embeddings, probabilities = data["embeddings"], data["probabilities"]
            stacks = data["stacks"].tolist() if "stacks" in data.files else None
            images = data["images"] if stacks is None else None  # a bundle from before golden files
    except (OSError, ValueError, KeyError) as exc:
        raise BundleError(f"{path}: unreadable golden vectors: {exc}") from None
    if stacks is not None:
        pinned = {str(entry["path"]) for entry in bundle.manifest["files"].values()}
        for stack_id in stacks:
            for file in golden_paths(bundle.folder, stack_id).values():
                if file.name not in pinned:
                    raise BundleError(f"{file}: golden file not listed (with its sha256) in the manifest")
        images = golden_images(bundle.folder, stacks, bundle.preprocessing)
    assert images is not None
    tolerance = bundle.manifest["golden"]
    got_embeddings = bundle.embedder(images)
    got = bundle.classifier(bundle.feature_vectors(images, got_embeddings))
    similarity = float(np.min(cosine(got_embeddings, embeddings)))
    difference = float(np.max(np.abs(got - probabilities)))
    same_labels = bool((bundle.labels_for(got) == bundle.labels_for(probabilities)).all())
    if similarity < tolerance["min_cosine"]:
        raise BundleError(
            f"{bundle.folder}: golden embeddings differ "
            f"(cosine {similarity:.5f} < {tolerance['min_cosine']}): "
            "the runtime or CPU computes this model differently from where it was made"
        )
    if difference > tolerance["max_probability_difference"]:
        raise BundleError(
            f"{bundle.folder}: golden probabilities differ by {difference:.4f} "
            f"(allowed {tolerance['max_probability_difference']})"
        )
    return GoldenCheck(len(images), similarity, difference, same_labels)
