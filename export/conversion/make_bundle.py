"""`hpa-edge export`: a trained model folder becomes a verified model bundle, behind a fidelity gate.

1. Rebuild the float backbone recorded in the model's embedding key; convert it to TFLite
   (int8 with uint8 input by default, calibrated on real training stacks; float16/float32).
   The key's feature recipe (`agent.model.features`, `lite0-gap` v1 when a key predates
   recipes) turns every embedding below into the classifiers' input, on both sides, as the
   device does; the manifest records it as `features` (name, version, params, layout).
2. Merge the 28 forests into one ONNX graph; check it against scikit-learn (probabilities
   within 1e-5, identical labels) on the recipe's vectors of float embeddings.
3. Fidelity on held-out stacks: the exported pipeline (LiteRT + ONNX Runtime) against the float
   reference (Keras + scikit-learn). When identical label sets fall below the gate, export
   fails, or with --fallback float16,float32 redoes the backbone in the next precision and
   says so.
4. Write the bundle: the two models, golden vectors (preprocessed inputs, their exported
   embeddings, and the probabilities of those through the recipe), `manifest.json` (hashes of every file),
   `fidelity.json`; then load it with the device code (`agent.model.bundle.load_bundle`).

What the device needs to say how far to trust an answer goes in the manifest too (all
optional, so older bundles still load): `locations` (per location its status, "trained",
"not trained" or "not predicted", its training positives, threshold, margin and, when it is
never predicted, the reason; such a location has no forest in the ONNX graph and threshold
1.0), `novelty` with `novelty.npz` (the reference of `agent.model.novelty` fitted on the
training features, i.e. the recipe's vectors, and its threshold), and `quality.reference`
(training ranges of the image-quality figures of `agent.stacks.quality`, measured on the
calibration stacks' raw channels, when that module is installed).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pickle
import platform
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from agent.model import features as feature_recipes
from agent.model.bundle import (
    MANIFEST,
    SCHEMA_VERSION,
    Bundle,
    BundleError,
    golden_images,
    golden_paths,
    load_bundle,
)
from agent.model.features import FeatureError, Recipe
from agent.model.review import SET_RISK_INPUTS, read_set_calibration, risk_inputs
from agent.model.runtimes import load_classifier, load_embedder
from agent.model.similarity import cosine
from agent.model.thresholds import apply
from agent.stacks.digest import file_sha256
from agent.stacks.errors import StackError
from agent.stacks.labels import LOCATIONS
from agent.stacks.preprocess import Preprocessing, preprocess
from export.conversion.convert import QUANTIZATIONS, forests_to_onnx, to_tflite
from export.data.dataset import Dataset, DatasetError
from export.features.backbones import LITE0_LICENCE, BackboneError, BackboneSpec, build
from export.features.embed import EMBEDDER_FILE, EmbedderFileError, read_embedder
from export.training.flagging import SetRiskModel
from export.training.forests import ForestSettings, LocationForests
from export.training.metrics import bootstrap_f1, bootstrap_weights, interval, macro_f1, nanmean_rows
from export.training.train import HELD_OUT, SET_RISK_FILE, novelty_entry

PARITY_TOLERANCE = 1e-5
GOLDEN_TOLERANCE = {"min_cosine": 0.995, "max_probability_difference": 0.05}


class ExportError(ValueError):
    """The model cannot be exported as asked; the message says why."""


QUALITY_MODULE = "agent.stacks.quality"  # image-quality figures; optional until it is installed


@dataclass
class Trained:
    folder: Path
    meta: dict[str, Any]
    classifier: LocationForests
    spec: BackboneSpec
    prep: Preprocessing
    features: Recipe = feature_recipes.LEGACY  # embedding -> the classifiers' input
    embedder: Path | None = None  # the converted file the forests were trained on, if any
    set_risk: SetRiskModel | None = None  # the review flag's set-risk model, if training fitted one

    @property
    def thresholds(self) -> np.ndarray:
        return np.asarray(self.classifier.thresholds_)

    def locations(self) -> list[dict[str, Any]]:
        """The manifest's `locations`; training positives from model.json where the estimator
        predates them (fitted before issue 16)."""
        rows = self.classifier.location_rows(LOCATIONS)
        counts = self.meta.get("data", {}).get("train_positives", {})
        for row in rows:
            if row["positives"] < 0:
                row["positives"] = int(counts.get(row["name"], 0))
        return rows

    def novelty(self) -> dict[str, Any] | None:
        """The manifest's `novelty` entry, or None for an estimator without a novelty reference."""
        if getattr(self.classifier, "novelty_", None) is None:
            return None
        return novelty_entry(self.classifier)


def read_model(folder: Path, weights: str | None) -> Trained:
    """The training output, with the backbone it was embedded with (a weights file by its sha256)."""
    try:
        meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
        with (folder / "classifiers.pkl").open("rb") as handle:
            pickled = pickle.load(handle)  # our own training output, on the workstation only
    except (OSError, ValueError, pickle.UnpicklingError) as exc:
        raise ExportError(f"{folder}: not a model folder from 'hpa-edge train': {exc}") from None
    classifier = _classifier(folder, pickled, meta)
    backbone = meta["embedding"]["backbone"]
    recorded = backbone["weights"]
    if "sha256" in backbone:  # trained on embeddings from a weights file
        if weights is None:
            raise ExportError(f"the model was embedded with weights file {recorded}; pass it with --weights")
        spec = BackboneSpec(backbone["name"], weights)
        if spec.identity()["sha256"] != backbone["sha256"]:
            raise ExportError(
                f"{weights} is not the weights file the model was embedded with (sha256 differs)"
            )
    else:
        spec = BackboneSpec(backbone["name"], recorded, int(backbone.get("seed", 0)))
    prep = Preprocessing.from_dict(meta["embedding"]["preprocessing"])
    key = meta["embedding"]
    try:
        recipe = feature_recipes.from_manifest(key.get("features"), key.get("dim"))
        recipe.check_slots(prep.slots)
    except FeatureError as exc:
        raise ExportError(f"{folder}: {exc}") from None
    width = recipe.width(int(key.get("dim", 1280)))
    n_features = getattr(classifier, "n_features_in_", width)
    if n_features != width:
        raise ExportError(
            f"{folder}: the classifiers take {n_features} values, recipe {recipe.name} v{recipe.version} "
            f"gives {width}"
        )
    return Trained(
        folder, meta, classifier, spec, prep, recipe, _trained_embedder(folder, key), _set_risk(folder, meta)
    )


def _set_risk(folder: Path, meta: dict[str, Any]) -> SetRiskModel | None:
    """The model folder's set-risk model, when model.json names one (trained since it exists)."""
    if "set_risk" not in meta:
        return None
    try:
        with (folder / SET_RISK_FILE).open("rb") as handle:
            model = pickle.load(handle)  # our own training output, on the workstation only
    except (OSError, pickle.UnpicklingError) as exc:
        raise ExportError(f"{folder}: model.json names a set-risk model, but {exc}") from None
    if not isinstance(model, SetRiskModel) or model.manifest_entry() != meta["set_risk"]:
        raise ExportError(f"{folder}: {SET_RISK_FILE} is not the set-risk model model.json describes")
    return model


def set_risk_onnx(trained: Trained) -> bytes | None:
    """The set-risk model as the ONNX graph the device runs, checked against scikit-learn on the
    training stacks' out-of-fold inputs (the rows it was fitted on)."""
    if trained.set_risk is None:
        return None
    onnx = forests_to_onnx([trained.set_risk.model_], SET_RISK_INPUTS)
    scores = np.asarray(trained.classifier.oof_scores_)
    labels = apply(scores, trained.thresholds)
    calibration = read_set_calibration(trained.meta["set_confidence"])
    confidence = np.array([calibration.confidence(s, x) for s, x in zip(scores, labels, strict=True)])
    inputs = risk_inputs(scores, labels, confidence)
    ours = load_classifier(onnx)(inputs)[:, 0]
    theirs = trained.set_risk.predict_proba(inputs)[:, 1]
    difference = float(np.max(np.abs(ours - theirs)))
    cut = trained.set_risk.cut_
    flips = int(np.sum((ours > cut) != (theirs > cut)))
    print(
        f"export: set-risk model, ONNX vs scikit-learn: max difference {difference:.2e}, {flips} flag flips"
    )
    if difference > PARITY_TOLERANCE:
        raise ExportError(f"the set-risk model's ONNX graph disagrees with scikit-learn ({difference:.2e})")
    return onnx


def _trained_embedder(folder: Path, key: dict[str, Any]) -> Path | None:
    """The model folder's copy of the converted embedder its vectors came from (checked by hash)."""
    if "embedder" not in key:
        return None  # trained on float Keras embeddings: export converts the backbone itself
    path = folder / EMBEDDER_FILE
    try:
        _, entry = read_embedder(path)
    except EmbedderFileError as exc:
        raise ExportError(f"{folder}: the model was trained on a converted embedder, but {exc}") from None
    if entry["sha256"] != key["embedder"]["sha256"]:
        raise ExportError(f"{path}: not the embedder the model's vectors came from (sha256 differs)")
    return path


def _classifier(folder: Path, pickled: Any, meta: dict[str, Any]) -> LocationForests:
    """The estimator in classifiers.pkl; a list of forests (model format 1) is wrapped in one."""
    if isinstance(pickled, list):  # written before the estimator: the forests alone
        settings = meta["settings"]
        try:
            return LocationForests.from_forests(
                pickled, meta["thresholds"], ForestSettings(**settings["forest"]), settings["folds"]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"{folder}: classifiers.pkl and model.json do not match: {exc}") from None
    if not isinstance(pickled, LocationForests):
        raise ExportError(
            f"{folder}: classifiers.pkl holds a {type(pickled).__name__}, "
            "not the classifier 'hpa-edge train' writes"
        )
    if not np.allclose(pickled.thresholds_, meta["thresholds"]):
        raise ExportError(
            f"{folder}: the thresholds in model.json differ from those in classifiers.pkl (was one edited?); "
            "retrain, or put back the file as training wrote it"
        )
    return pickled


def quality_module() -> Any | None:
    """`agent.stacks.quality` when it is installed (its `measure` and `reference_from`), else None."""
    if importlib.util.find_spec(QUALITY_MODULE) is None:
        return None
    return importlib.import_module(QUALITY_MODULE)


def stack_images(
    dataset: Dataset, ids: list[str], prep: Preprocessing, figures: list[dict[str, float]] | None = None
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Preprocessed pixels and labels of the readable stacks among ids (unreadable ones are reported).

    With `figures` (a list) and the quality module installed, the image-quality figures of each
    stack's raw channels are appended to it.
    """
    wanted = set(ids)
    kept, images, labels = [], [], []
    quality = quality_module() if figures is not None else None
    for sample, stack in dataset.stacks_for(wanted):
        if isinstance(stack, StackError):
            print(f"export: skipped {sample.stack_id}: {stack}", file=sys.stderr)
            continue
        kept.append(sample.stack_id)
        if quality is not None and figures is not None:
            bits = (
                prep.bit_depth.bits if prep.bit_depth.mode == "bits" else None
            )  # as the device's camera bits
            figures.append(quality.measure(stack.channels, bits))
        images.append(preprocess(stack.channels, prep))
        row = np.zeros(len(LOCATIONS), bool)
        row[list(sample.labels)] = True
        labels.append(row)
    if not images:
        raise ExportError("none of the requested stacks could be read")
    return kept, np.stack(images), np.stack(labels)


def fidelity(
    reference: tuple[np.ndarray, np.ndarray],
    exported: tuple[np.ndarray, np.ndarray],
    thresholds: np.ndarray,
    truth: np.ndarray,
    seed: int = 0,
) -> dict[str, Any]:
    """How far the exported pipeline's answers are from the float reference's, on the same stacks."""
    ref_emb, ref_prob = reference
    exp_emb, exp_prob = exported
    similarity = cosine(ref_emb, exp_emb)
    ref_labels, exp_labels = apply(ref_prob, thresholds), apply(exp_prob, thresholds)
    weights = bootstrap_weights(len(truth), 1000, seed)
    paired = nanmean_rows(bootstrap_f1(truth, exp_labels, weights)) - nanmean_rows(
        bootstrap_f1(truth, ref_labels, weights)
    )
    return {
        "n_stacks": len(truth),
        "embedding_cosine_min": round(float(similarity.min()), 5),
        "embedding_cosine_mean": round(float(similarity.mean()), 5),
        "probability_max_difference": [round(float(v), 5) for v in np.abs(exp_prob - ref_prob).max(axis=0)],
        "identical_label_sets": round(float((ref_labels == exp_labels).all(axis=1).mean()), 5),
        "label_flips": [int(v) for v in (ref_labels != exp_labels).sum(axis=0)],
        "macro_f1_reference": _round(macro_f1(truth, ref_labels)),
        "macro_f1_exported": _round(macro_f1(truth, exp_labels)),
        "macro_f1_difference": _round(macro_f1(truth, exp_labels) - macro_f1(truth, ref_labels)),
        "macro_f1_difference_ci95": [_round(v) for v in interval(paired)],
    }


def onnx_parity(onnx: np.ndarray, sklearn: np.ndarray, thresholds: np.ndarray) -> tuple[float, int, int]:
    """Largest probability difference, label flips, and ties (a probability within float32 rounding
    of its threshold, where float32 ONNX and float64 scikit-learn may fairly fall either side)."""
    tie = np.abs(sklearn - thresholds) <= PARITY_TOLERANCE
    flips = apply(onnx, thresholds) != apply(sklearn, thresholds)
    return float(np.abs(onnx - sklearn).max()), int((flips & ~tie).sum()), int(tie.sum())


def _round(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 5)


def novelty_figures(trained: Trained, reference: np.ndarray, exported: np.ndarray) -> dict[str, Any]:
    """Share of held-out stacks the device would flag as novel, from float and from exported
    embeddings (the threshold is set on float ones; quantization must not push typical stacks over)."""
    entry = trained.novelty()
    if entry is None:
        return {}
    limit, novelty = entry["threshold"], trained.classifier.novelty_
    return {
        "novel_share_float": _round(float((novelty.distance(reference) > limit).mean())),
        "novel_share_exported": _round(float((novelty.distance(exported) > limit).mean())),
    }


GOLDEN_MARGIN = 32  # golden channel files are this much wider than the model input: resizing runs


def write_golden(
    out: Path, dataset: Dataset, source_ids: list[str], trained: Trained, tflite: bytes, onnx: bytes
) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The golden stacks as channel files in the bundle (a reduced copy of held-out stacks, in
    their own bit depth) and what the exported pipeline gives for them, read the agent's way.

    Returns the files written (role -> name) and golden.npz's arrays.
    """
    files: dict[str, str] = {}
    names: list[str] = []
    sources: list[str] = []
    for sample, stack in dataset.stacks_for(set(source_ids)):
        if isinstance(stack, StackError):
            continue
        sources.append(sample.stack_id)
        name = f"golden-{len(names)}"
        for channel, path in golden_paths(out, name).items():
            _write_png(path, _reduced(stack.channels[channel], trained.prep.size + GOLDEN_MARGIN))
            files[path.stem] = path.name
        names.append(name)
    if not names:
        raise ExportError("none of the golden stacks could be read")
    images = golden_images(out, names, trained.prep)
    embeddings = load_embedder(tflite)(images)
    probabilities = load_classifier(onnx)(trained.features(images, embeddings))
    golden = {"stacks": np.asarray(names), "sources": np.asarray(sources)}
    return files, {**golden, "embeddings": embeddings, "probabilities": probabilities}


def _reduced(pixels: np.ndarray, side: int) -> np.ndarray:
    """A channel shrunk (area average, same dtype) so its longer side is `side`, if it is longer."""
    import cv2

    height, width = pixels.shape[:2]
    scale = side / max(height, width)
    if scale >= 1:
        return pixels
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(cv2.resize(pixels, size, interpolation=cv2.INTER_AREA))


def _write_png(path: Path, pixels: np.ndarray) -> None:
    import cv2

    if not cv2.imwrite(str(path), pixels):
        raise ExportError(f"{path}: could not write a golden channel file")


def write_bundle(
    out: Path,
    trained: Trained,
    tflite: bytes,
    onnx: bytes,
    golden_ids: list[str],
    dataset: Dataset,
    quantization: str,
    report: dict[str, Any],
    purpose: str,
    quality_reference: dict[str, Any] | None = None,
    set_risk: bytes | None = None,
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"embedder": "embedder.tflite", "classifiers": "classifiers.onnx", "golden": "golden.npz"}
    (out / files["embedder"]).write_bytes(tflite)
    (out / files["classifiers"]).write_bytes(onnx)
    if set_risk is not None:
        files["set_risk"] = "set_risk.onnx"
        (out / files["set_risk"]).write_bytes(set_risk)
    golden_files, golden = write_golden(out, dataset, golden_ids, trained, tflite, onnx)
    files.update(golden_files)
    with (out / files["golden"]).open("wb") as handle:
        np.savez_compressed(
            handle,
            stacks=golden["stacks"],
            sources=golden["sources"],
            embeddings=golden["embeddings"],
            probabilities=golden["probabilities"],
        )
    novelty = trained.novelty()
    if novelty is not None:
        files["novelty"] = "novelty.npz"
        with (out / files["novelty"]).open("wb") as handle:
            arrays: dict[str, Any] = trained.classifier.novelty_.arrays()
            np.savez_compressed(handle, **arrays)
    (out / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    backbone = dict(trained.meta["embedding"]["backbone"])
    embedding_dim = int(golden["embeddings"].shape[1])
    if backbone["name"] == "lite0" and backbone["weights"] == "imagenet":
        backbone["licence"] = LITE0_LICENCE
        (out / "LICENSE-efficientnet-lite0").write_text(_lite0_notice(), encoding="utf-8")
        files["licence"] = "LICENSE-efficientnet-lite0"
    import onnxruntime
    import sklearn
    import tensorflow as tf

    manifest = {
        "schema_version": SCHEMA_VERSION,
        "purpose": purpose,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "labels": list(LOCATIONS),
        "preprocessing": trained.prep.to_dict(),
        "backbone": backbone,
        "quantization": quantization,
        "thresholds": [float(t) for t in trained.thresholds],
        "files": {
            role: {"path": name, "sha256": file_sha256(out / name), "bytes": (out / name).stat().st_size}
            for role, name in files.items()
        },
        "training": {"data": trained.meta["data"], "settings": trained.meta["settings"]},
        "evaluation": trained.meta["figures"],
        "fidelity": report,
        "golden": {
            **GOLDEN_TOLERANCE,
            "n": len(golden["stacks"]),
            "inputs": "channel files",
            "sources": golden["sources"].tolist(),
        },
        "features": trained.features.entry(embedding_dim),
        "locations": trained.locations(),
        "versions": {
            "hpa-edge": _version(),
            "python": platform.python_version(),
            "tensorflow": tf.__version__,
            "scikit-learn": sklearn.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
        },
    }
    if novelty is not None:
        manifest["novelty"] = novelty
    if "set_confidence" in trained.meta:  # models trained before the set-confidence flag lack it
        manifest["set_confidence"] = trained.meta["set_confidence"]
    if set_risk is not None:
        manifest["set_risk"] = trained.meta["set_risk"]
    if quality_reference is not None:
        manifest["quality"] = {"reference": quality_reference}
    partial = out / f".{MANIFEST}.tmp"
    partial.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, out / MANIFEST)  # last: a bundle without a manifest is not a bundle
    return manifest


def _version() -> str:
    from agent import __version__

    return __version__


def _lite0_notice() -> str:
    notice = Path(__file__).resolve().parents[2] / "models" / "LICENSE-efficientnet-lite0"
    if notice.is_file():
        return notice.read_text(encoding="utf-8")
    return f"EfficientNet-Lite0 ImageNet weights: {LITE0_LICENCE}. Apache License 2.0: http://www.apache.org/licenses/LICENSE-2.0\n"


def export(args: argparse.Namespace) -> int:
    started = time.monotonic()
    trained = read_model(args.model, args.weights)
    deployed = trained.embedder  # the converted file the forests were trained on, or None
    dataset = Dataset(args.data, args.labels or args.data / "train.csv", missing="skip")
    test_ids = list(trained.meta["test_ids"])
    known, held_out = set(dataset.ids), set(test_ids)
    train_ids = [s for s in dataset.ids if s not in held_out]
    rng = np.random.default_rng(args.seed)
    calibration_ids = list(rng.permutation(train_ids)[: args.calibration])
    held_ids = [s for s in test_ids if s in known][: args.fidelity_stacks]
    if not held_ids:
        raise ExportError("none of the model's held-out stacks are in --data; fidelity needs them")
    quality_figures: list[dict[str, float]] = []
    _, calibration, _ = stack_images(dataset, calibration_ids, trained.prep, quality_figures)
    quality = quality_module()
    quality_reference = quality.reference_from(quality_figures) if quality and quality_figures else None
    if quality is None:
        print(f"export: {QUALITY_MODULE} is not installed: the bundle carries no image-quality reference")
    _, held, truth = stack_images(dataset, held_ids, trained.prep)
    print(f"export: {len(calibration)} calibration stacks, {len(held)} held-out stacks for fidelity")
    keras_model = build(trained.spec, trained.prep.size)
    recipe = trained.features
    ref_emb = np.asarray(keras_model.predict(held.astype(np.float32), verbose=0), dtype=np.float32)
    ref_x = recipe(held, ref_emb)  # the classifiers' input, as the device computes it
    print(f"export: features {recipe.name} v{recipe.version} ({ref_x.shape[1]} values)")
    ref_prob = trained.classifier.predict_proba(ref_x)
    onnx = forests_to_onnx(trained.classifier.forests_, ref_x.shape[1])
    classifier = load_classifier(onnx)
    if deployed is not None:
        candidates = [_deployed_quantization(trained, args)]
        print(
            f"export: the forests were trained on {deployed.name} ({candidates[0]}, LiteRT): the bundle "
            "ships that file; the float network is a fidelity comparison only"
        )
    else:
        first = args.quantization or "int8"
        candidates = [first] + [q for q in args.fallback if q != first]
    attempts: list[dict[str, Any]] = []
    for quantization in candidates:
        tflite = (
            deployed.read_bytes()
            if deployed is not None
            else to_tflite(
                keras_model, quantization, calibration if quantization.startswith("int8") else None
            )
        )
        exp_emb = load_embedder(tflite)(held)
        exp_x = recipe(held, exp_emb)
        # ONNX against scikit-learn on the vectors the forests were trained on
        parity_x = exp_x if deployed is not None else ref_x
        parity_prob = trained.classifier.predict_proba(parity_x) if deployed is not None else ref_prob
        parity, flips, ties = onnx_parity(classifier(parity_x), parity_prob, trained.thresholds)
        print(
            f"export: ONNX vs scikit-learn: max probability difference {parity:.2e}, "
            f"{flips} label flips, {ties} ties"
        )
        if parity > PARITY_TOLERANCE or flips:
            raise ExportError(
                f"ONNX classifiers disagree with scikit-learn ({parity:.2e} max difference, {flips} flips)"
            )
        report = fidelity(
            (ref_emb, ref_prob), (exp_emb, classifier(exp_x)), trained.thresholds, truth, args.seed
        )
        gate = None if deployed is not None else args.min_identical
        report.update(quantization=quantization, onnx_parity_max_difference=parity, gate=gate)
        report["trained_on"] = "exported" if deployed is not None else "float"
        report.update(novelty_figures(trained, ref_x, exp_x))
        attempts.append(
            {"quantization": quantization, "identical_label_sets": report["identical_label_sets"]}
        )
        print(
            f"export: {quantization}: embedding cosine min {report['embedding_cosine_min']} mean "
            f"{report['embedding_cosine_mean']}; identical label sets to the float network "
            f"{report['identical_label_sets']:.1%}; macro F1 {report['macro_f1_reference']} float vs "
            f"{report['macro_f1_exported']} exported"
        )
        if gate is None or report["identical_label_sets"] >= gate:
            break
        if quantization != candidates[-1]:
            print(
                f"export: {quantization} is below the gate ({args.min_identical:.0%} identical label sets): "
                f"FALLING BACK to {candidates[candidates.index(quantization) + 1]}"
            )
    else:
        hint = (
            "; EfficientNetB0's activations are too heavy-tailed for int8 (models/README.md, 'B0 and int8'): "
            "use --quantization float16"
            if trained.spec.name == "b0" and quantization.startswith("int8")
            else ""
        )
        raise ExportError(
            f"fidelity gate failed: {report['identical_label_sets']:.1%} of held-out stacks keep their exact "
            f"label set with {quantization} (gate {args.min_identical:.0%}; tried {', '.join(candidates)}); "
            f"train on the converted embedder's features instead ('hpa-edge convert', then "
            f"'hpa-edge embed --embedder'), try more --calibration stacks, --fallback float16,float32, "
            f"or a lower --min-identical{hint}"
        )
    report["attempts"] = attempts
    if trained.spec.weights == "random":
        report["caveat"] = "measured with random backbone weights: says little about real ImageNet weights"
    golden_ids = held_ids[: args.golden]
    write_bundle(
        args.out, trained, tflite, onnx, golden_ids, dataset, quantization, report, args.purpose,
        quality_reference, set_risk_onnx(trained),
    )  # fmt: skip
    bundle = load_bundle(args.out)
    if deployed is not None:
        report["agent_agreement"] = agent_agreement(bundle, dataset, trained)
        _record_fidelity(args.out, report)
        bundle = load_bundle(args.out)
    print(
        f"export: bundle {args.out} ({quantization}, purpose {args.purpose}) verified with the device "
        "runtimes "
        f"({bundle.embedder.runtime}); {time.monotonic() - started:.0f} s"
    )
    return 0


def _deployed_quantization(trained: Trained, args: argparse.Namespace) -> str:
    """The converted embedder's quantization; asking for another one is an error, not a surprise."""
    quantization = str(trained.meta["embedding"]["embedder"]["quantization"])
    if (args.quantization not in (None, quantization)) or args.fallback:
        raise ExportError(
            f"the forests were trained on the features of the model's {quantization} embedder, so the "
            f"bundle ships that file; for another quantization, 'hpa-edge convert' it, embed and train again"
        )
    return quantization


def agent_agreement(bundle: Bundle, dataset: Dataset, trained: Trained) -> dict[str, Any]:
    """The agent's own pipeline (files -> decode -> ... -> probabilities) on the held-out stacks
    against the probabilities the training evaluation scored: they must give the same labels.

    Differences within float32 rounding of a threshold (ONNX computes in float32, scikit-learn
    in float64) are counted as ties, as in the ONNX parity check; any other flip fails the
    export, because the evaluation report would then not describe what the device says.
    """
    from agent.model.pipeline import Pipeline

    try:
        with np.load(trained.folder / HELD_OUT, allow_pickle=False) as data:
            ids, expected = data["ids"].tolist(), np.asarray(data["probabilities"])
    except (OSError, ValueError, KeyError) as exc:
        raise ExportError(f"{trained.folder / HELD_OUT}: unreadable held-out predictions: {exc}") from None
    samples = {sample.stack_id: sample for sample in dataset}
    pipeline = Pipeline(bundle, instrument="export")
    rows, scores, labels, unreadable = [], [], [], 0
    for i, stack_id in enumerate(ids):
        if stack_id not in samples:
            continue
        analysis = pipeline.analyse(stack_id, samples[stack_id].paths)
        if analysis.kind != "result":
            unreadable += 1
            continue
        rows.append(i)  # what the agent publishes: the labels, and the scores (6 decimals)
        scores.append([analysis.document["scores"][name] for name in LOCATIONS])
        labels.append([name in analysis.document["labels"] for name in LOCATIONS])
    if not rows:
        raise ExportError("none of the held-out stacks could be run through the agent's pipeline")
    wanted = expected[rows]
    differs = np.asarray(labels) != bundle.labels_for(wanted)
    tie = np.abs(wanted - bundle.thresholds) <= PARITY_TOLERANCE
    flips, ties = int((differs & ~tie).sum()), int((differs & tie).sum())
    difference = float(np.abs(np.asarray(scores) - wanted).max())
    agreement = {
        "stacks": len(rows),
        "unreadable": unreadable,
        "identical_label_sets": round(float((~differs).all(axis=1).mean()), 5),
        "label_flips": flips,
        "ties": ties,
        "probability_max_difference": float(f"{difference:.3g}"),
    }
    print(
        f"export: the agent's pipeline on {len(rows)} held-out stacks' files against the evaluation: "
        f"identical label sets {agreement['identical_label_sets']:.1%}, max probability difference "
        f"{difference:.2e}, {flips} flips, {ties} ties"
    )
    if flips or difference > GOLDEN_TOLERANCE["max_probability_difference"]:
        (bundle.folder / MANIFEST).unlink()  # a bundle without a manifest is not a bundle
        raise ExportError(
            f"the agent's pipeline disagrees with the evaluation on held-out stacks ({flips} label flips, "
            f"max probability difference {difference:.2e}): the report would not describe the device; "
            f"{bundle.folder} was left without a manifest"
        )
    return agreement


def _record_fidelity(out: Path, report: dict[str, Any]) -> None:
    """Put the final fidelity report in fidelity.json and the manifest (rewritten atomically)."""
    (out / "fidelity.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    manifest["fidelity"] = report
    partial = out / f".{MANIFEST}.tmp"
    partial.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, out / MANIFEST)


def _quantizations(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    for value in values:
        if value not in QUANTIZATIONS:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(QUANTIZATIONS)}")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="model folder written by 'hpa-edge train'")
    parser.add_argument(
        "--data", type=Path, required=True, help="the image folder the model was trained from"
    )
    parser.add_argument("--labels", type=Path, help="its Id,Target label file (default: DATA/train.csv)")
    parser.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    parser.add_argument("--weights", help="the backbone weights file, if the model was embedded with one")
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        help="for a model trained on float embeddings (default int8); a model trained on a converted "
        "embedder ships that file and its quantization",
    )
    parser.add_argument(
        "--calibration",
        type=int,
        default=100,
        help="training stacks for int8 calibration and the image-quality reference (default 100)",
    )
    parser.add_argument(
        "--fidelity-stacks", type=int, default=200, help="held-out stacks for fidelity (default 200)"
    )
    parser.add_argument(
        "--min-identical", type=float, default=0.99, help="gate: share of identical label sets (default 0.99)"
    )
    parser.add_argument(
        "--fallback",
        type=_quantizations,
        default=[],
        help="quantizations to try in order when the gate fails, e.g. float16,float32 (default: none, fail)",
    )
    parser.add_argument("--golden", type=int, default=4, help="golden stacks in the bundle (default 4)")
    parser.add_argument("--purpose", choices=("production", "demo"), default="production")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    try:
        return export(args)
    except (ExportError, BackboneError, BundleError, DatasetError) as exc:
        print(f"hpa-edge export: {exc}", file=sys.stderr)
        return 2
