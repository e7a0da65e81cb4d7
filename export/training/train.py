"""`hpa-edge train`: fit the 28 per-location classifiers on cached embeddings and evaluate them honestly.

1. Join the label file with the embedding cache (optionally only the ids in --include-ids).
   The cache holds its feature recipe's vectors (`hpa-edge embed --features`); they are what
   the forests, their margins and the novelty reference are fitted on, and the cache key (with
   the recipe's manifest entry) goes into model.json for `hpa-edge export`.
2. Hold out a multilabel-stratified test split; it is scored once, at the end.
3. Fit `LocationForests` on the training part: a location with fewer than --min-positives
   training positives is not trained; out-of-fold scores from a multilabel-stratified
   cross-validation decide, per location, whether there is evidence to predict it at all and
   at which threshold (--threshold-rule); the fold forests that gave those scores (natural
   frequencies, class weights), merged per location, are the forests that predict.
4. On the test split, beside ours: the original study's method trained on the same stacks,
   its own balanced-test figure, and the biologists' per-location F1. Locations not trained
   or not predicted count in macro F1 like any other (0 where the split has positives).
   Beside macro F1, the figures a user of the labels feels: labels per stack, exact label
   sets, sample F1, and per location the predicted rate beside the prevalence.

The model folder gets `classifiers.pkl` (the fitted `LocationForests`, for `hpa-edge export`
and the float reference on the workstation; the device never loads a pickle), `model.json`
(thresholds, settings, the embedding cache key, figures), `held_out.npz` (the test split's
probabilities, which `export` checks the device against), `evaluation.json`, `evaluation.png`
and `summary.md`; and, when the cache was made with a converted embedder (`hpa-edge embed
--embedder`), a copy of that file, which the bundle will ship.
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent.model.review import Trust, review
from agent.model.thresholds import apply
from agent.stacks.labels import LOCATIONS, N_LOCATIONS
from export.data.dataset import DatasetError, read_labels
from export.data.split import train_test_split
from export.features.embed import CacheError, EmbeddingCache, Embeddings, embedder_sidecar
from export.reports.report import ORIGINAL, OURS, summary_text, write_chart
from export.training.agreement import flag_summary
from export.training.evaluate import balanced_test_f1, biologist_f1, score_methods
from export.training.flagging import SetConfidence, SetRiskModel
from export.training.folds import out_of_fold
from export.training.forests import (
    DEFAULT_FOLDS,
    DEFAULT_MIN_POSITIVES,
    ForestSettings,
    LocationForests,
    fit_joint,
    fit_original,
    predict_joint,
    predict_scores,
)
from export.training.metrics import DEFAULT_RULE, THRESHOLD_RULES, best_thresholds

HELD_OUT = "held_out.npz"  # the test split's ids and the probabilities its figures come from
SET_RISK_FILE = "set_risk.pkl"  # the review flag's SetRiskModel, when training fitted one
MODEL_FORMAT = 2  # 2: classifiers.pkl holds a LocationForests (1: a list of 28 forests or None)
ORIGINAL_THRESHOLD = 0.5  # the original study's one threshold for every location
JOINT_PAIR = (0, 25)  # Nucleoplasm, Cytosol: the two most frequent locations
# The label-set figures of the held-out split that model.json (and so the manifest) carries.
USER_FIGURES = (
    "labels_per_stack_true",
    "labels_per_stack_predicted",
    "exact_label_sets",
    "samples_f1",
    "no_label_stacks",
    "over_predicted",
)


class TrainError(ValueError):
    """The inputs cannot give a model (no overlap between labels and cache, bad id list...)."""


@dataclass(frozen=True)
class TrainSettings:
    forest: ForestSettings = field(default_factory=ForestSettings)  # its seed also seeds the folds
    folds: int = DEFAULT_FOLDS
    test_fraction: float = 0.2
    seed: int = 0  # of the train/test split
    bootstrap: int = 1000
    try_joint: bool = False
    original_trees: int = 100  # the original study's forests (grown fully)
    min_positives: int = DEFAULT_MIN_POSITIVES
    threshold_rule: str = DEFAULT_RULE

    def __post_init__(self) -> None:
        if not 2 <= self.folds <= 10:
            raise ValueError(f"folds must be 2..10, not {self.folds}")
        if self.min_positives < 1:
            raise ValueError(f"min positives must be at least 1, not {self.min_positives}")
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(
                f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}, not {self.threshold_rule}"
            )
        if not 0.05 <= self.test_fraction <= 0.5:
            raise ValueError(f"test fraction must be 0.05..0.5, not {self.test_fraction}")


@dataclass
class TrainedModel:
    classifier: LocationForests
    evaluation: dict[str, Any]
    train_ids: list[str]
    test_ids: list[str]
    test_probabilities: np.ndarray  # N_test x 28: what the evaluation scored, for export's check
    set_confidence: dict[str, Any]  # the manifest's entry for the review flag (`SetConfidence`)
    set_risk: SetRiskModel | None = None  # the flag's set-risk model (None: too few wrong or right sets)


def join(
    embeddings: Embeddings, labels: dict[str, tuple[int, ...]], include: set[str] | None
) -> tuple[list[str], list[str]]:
    """Ids usable for training (labelled, embedded, included), and labelled ids that lack an embedding."""
    wanted = [sid for sid in labels if include is None or sid in include]
    cached = set(embeddings.ids)
    return [s for s in wanted if s in cached], [s for s in wanted if s not in cached]


def label_matrix(ids: list[str], labels: dict[str, tuple[int, ...]]) -> np.ndarray:
    y = np.zeros((len(ids), N_LOCATIONS), dtype=np.uint8)
    for i, sid in enumerate(ids):
        y[i, list(labels[sid])] = 1
    return y


def train(
    x: np.ndarray, y: np.ndarray, ids: list[str], settings: TrainSettings, data_name: str
) -> TrainedModel:
    """Split, tune thresholds out-of-fold, fit, and score ours against the original method."""
    train_rows, test_rows = train_test_split(y, settings.test_fraction, settings.seed)
    x_train, y_train, x_test, y_test = x[train_rows], y[train_rows], x[test_rows], y[test_rows]
    classifier = LocationForests.from_settings(
        settings.forest,
        settings.folds,
        min_positives=settings.min_positives,
        threshold_rule=settings.threshold_rule,
    ).fit(x_train, y_train)
    set_confidence = SetConfidence().fit(
        classifier.oof_scores_,
        y_train,
        classifier.thresholds_,
        available=classifier.available_,
    )
    set_risk = fit_set_risk(classifier, y_train, set_confidence, settings)
    test_probabilities = classifier.predict_proba(x_test)
    ours = apply(test_probabilities, classifier.thresholds_)
    original_scores = predict_scores(
        fit_original(x_train, y_train, settings.seed, settings.forest.jobs, settings.original_trees), x_test
    )
    original = apply(original_scores, np.full(N_LOCATIONS, ORIGINAL_THRESHOLD))
    split = score_methods(y_test, {OURS: ours, ORIGINAL: original}, settings.bootstrap, settings.seed)
    biologists, source = biologist_f1()
    evaluation: dict[str, Any] = {
        "data": {
            "name": data_name,
            "n_stacks": len(ids),
            "n_train": len(train_rows),
            "n_test": len(test_rows),
            "test_fraction": settings.test_fraction,
            "train_positives": {LOCATIONS[j]: int(y_train[:, j].sum()) for j in range(N_LOCATIONS)},
        },
        "split": split,
        "original_balanced_test_f1": round(
            balanced_test_f1(y_test, original_scores, ORIGINAL_THRESHOLD, settings.seed), 4
        ),
        "biologist_f1": {
            "per_location": [None if np.isnan(v) else float(v) for v in biologists],
            "macro_f1": round(float(np.nanmean(biologists)), 4),
            "source": source,
        },
        "thresholds": [round(float(t), 4) for t in classifier.thresholds_],
        "threshold_rule": settings.threshold_rule,
        "min_positives": settings.min_positives,
        "locations": classifier.threshold_choice_.to_rows(LOCATIONS),
        "novelty": novelty_entry(classifier),
        "review_flag": {  # the set-confidence flag, out of fold on the training stacks
            "cut": round(float(set_confidence.cut_), 6),
            "flagged_share": round(set_confidence.flagged_share_, 4),
            "uncertain_share": round(set_confidence.uncertain_share_, 4),
            "set_risk": None
            if set_risk is None
            else {
                "cut": round(float(set_risk.cut_), 6),
                "flagged_share": round(set_risk.flagged_share_, 4),
                "uncertain_share": round(set_risk.uncertain_share_, 4),
            },
            "held_out": held_out_flag(
                classifier, set_confidence, set_risk, x_test, test_probabilities, ours, y_test
            ),
        },
        "experiments": {},
    }
    if settings.try_joint:
        evaluation["experiments"]["joint_nucleoplasm_cytosol"] = joint_experiment(
            x_train, y_train, x_test, y_test, classifier.oof_folds_, ours, settings
        )
    return TrainedModel(
        classifier,
        evaluation,
        [ids[i] for i in train_rows],
        [ids[i] for i in test_rows],
        test_probabilities,
        set_confidence.manifest_entry(LOCATIONS),
        set_risk,
    )


def fit_set_risk(
    classifier: LocationForests, y_train: np.ndarray, set_confidence: SetConfidence, settings: TrainSettings
) -> SetRiskModel | None:
    """The set-risk model on the out-of-fold scores, or None (said) when the training label sets
    are all right or all wrong out of fold, so the flag keeps the set confidence's cut."""
    try:
        return SetRiskModel(seed=settings.seed, jobs=settings.forest.jobs).fit(
            classifier.oof_scores_, y_train, classifier.thresholds_, set_confidence.confidence_
        )
    except ValueError as exc:
        print(f"train: no set-risk model ({exc}); the review flag uses the set confidence's cut")
        return None


def held_out_flag(
    classifier: LocationForests,
    set_confidence: SetConfidence,
    set_risk: SetRiskModel | None,
    x_test: np.ndarray,
    probabilities: np.ndarray,
    labels: np.ndarray,
    y_test: np.ndarray,
) -> dict[str, Any]:
    """The review flag on the held-out split, raised by the device's own rule
    (`agent.model.review.review`) from these scores, with a `Trust` made of the fitted objects
    instead of the bundle's files; the image-quality reasons need pixels and are left out. The
    training shares above say where the cuts were put; this says whether the flag points at
    the wrong label sets of stacks the cuts never saw."""
    trust = Trust(
        margins=classifier.margins_,
        available=classifier.available_,
        novelty=classifier.novelty_,
        novelty_threshold=float(classifier.novelty_threshold_),
        set_calibration=set_confidence.calibration(),
        set_risk=None if set_risk is None else set_risk.for_device(),
    )
    flagged = np.array(
        [
            review(p, stack_labels, classifier.thresholds_, trust, x).flagged
            for p, stack_labels, x in zip(probabilities, labels, x_test, strict=True)
        ]
    )
    return flag_summary(flagged, (labels != (y_test != 0)).any(axis=1))


def novelty_entry(classifier: LocationForests) -> dict[str, Any]:
    """The manifest's `novelty` entry for the estimator's reference (its arrays go in novelty.npz)."""
    return {
        "threshold": float(classifier.novelty_threshold_),
        "components": len(classifier.novelty_.scales),
        "percentile": float(classifier.novelty_percentile),
        "method": classifier.novelty_.method,
    }


def joint_experiment(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    folds: np.ndarray,
    ours: np.ndarray,
    settings: TrainSettings,
) -> dict[str, Any]:
    """Does one 4-class forest for Nucleoplasm + Cytosol beat their two binary forests (same split)?

    The joint model's thresholds are chosen out-of-fold on the folds the binary forests' were.
    """
    pair = list(JOINT_PAIR)

    def fit_predict(x_fit: np.ndarray, y_fit: np.ndarray, x_held: np.ndarray) -> np.ndarray:
        return predict_joint(fit_joint(x_fit, y_fit, JOINT_PAIR, settings.forest), x_held)

    joint_thresholds = best_thresholds(y_train[:, pair], out_of_fold(fit_predict, x_train, y_train, folds))
    joint = apply(fit_predict(x_train, y_train, x_test), joint_thresholds)
    scored = score_methods(
        y_test[:, pair], {"binary": ours[:, pair], "joint": joint}, settings.bootstrap, settings.seed
    )
    binary_f1 = [r["f1"] for r in scored["methods"]["binary"]["per_location"]]
    joint_f1 = [r["f1"] for r in scored["methods"]["joint"]["per_location"]]
    difference = scored["paired_macro_f1_difference"]["binary - joint"]
    low, high = difference["ci95"]
    helps = high is not None and high < 0  # binary - joint entirely below 0: the joint model is better
    return {
        "binary_f1": binary_f1,
        "joint_f1": joint_f1,
        "mean_f1_binary_minus_joint": difference,
        "helps": helps,
        "summary": (
            f"F1 Nucleoplasm {binary_f1[0]} (binary) vs {joint_f1[0]} (joint), Cytosol {binary_f1[1]} vs "
            f"{joint_f1[1]}; mean difference binary - joint {difference['difference']} (95% {low}..{high}); "
            + (
                "the joint model measurably helps."
                if helps
                else "no measurable gain: the binary forests stay."
            )
        ),
    }


def read_id_list(path: Path) -> set[str]:
    """One id per line (blank lines and '#' comments ignored); a CSV with an Id column also works."""
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except OSError as exc:
        raise TrainError(f"{path}: cannot read id list: {exc.strerror or exc}") from None
    ids = [line.split(",")[0].strip() for line in lines if line.strip() and not line.startswith("#")]
    if ids and ids[0] == "Id":
        ids = ids[1:]
    if not ids:
        raise TrainError(f"{path}: the id list is empty")
    return set(ids)


def save(
    model: TrainedModel,
    out: Path,
    key: dict[str, Any],
    settings: TrainSettings,
    embedder: Path | None = None,
) -> None:
    """The model folder; `embedder` is the converted file the vectors came from (the cache's
    copy), passed on so that `hpa-edge export` ships that very file."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "classifiers.pkl").open("wb") as handle:
        pickle.dump(model.classifier, handle, protocol=5)
    (out / SET_RISK_FILE).unlink(missing_ok=True)
    if model.set_risk is not None:
        with (out / SET_RISK_FILE).open("wb") as handle:
            pickle.dump(model.set_risk, handle, protocol=5)
    with (out / HELD_OUT).open("wb") as handle:
        np.savez(handle, ids=np.asarray(model.test_ids), probabilities=model.test_probabilities)
    if embedder is not None:
        for source in (embedder, embedder_sidecar(embedder)):
            shutil.copyfile(source, out / source.name)
    import sklearn

    evaluation = model.evaluation
    ours = evaluation["split"]["methods"][OURS]
    meta = {
        "format": MODEL_FORMAT,
        "labels": list(LOCATIONS),
        "thresholds": [float(t) for t in model.classifier.thresholds_],
        "trained_locations": model.classifier.trained_locations,
        "locations": model.classifier.location_rows(LOCATIONS),
        "novelty": novelty_entry(model.classifier),
        "set_confidence": model.set_confidence,
        **({} if model.set_risk is None else {"set_risk": model.set_risk.manifest_entry()}),
        "embedding": key,
        "settings": {
            "forest": settings.forest.to_dict(),
            "folds": settings.folds,
            "test_fraction": settings.test_fraction,
            "seed": settings.seed,
            "min_positives": settings.min_positives,
            "threshold_rule": settings.threshold_rule,
        },
        "data": evaluation["data"],
        "figures": {
            "macro_f1": ours["macro_f1"],
            "macro_f1_ci95": ours["macro_f1_ci95"],
            "per_location_f1": [r["f1"] for r in ours["per_location"]],
            "original_method_macro_f1": evaluation["split"]["methods"][ORIGINAL]["macro_f1"],
            **{key: ours[key] for key in USER_FIGURES},
            "predicted_rate": [r["predicted_rate"] for r in ours["per_location"]],
            "prevalence": [r["prevalence"] for r in ours["per_location"]],
        },
        "test_ids": model.test_ids,
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
        },
    }
    (out / "model.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    (out / "evaluation.json").write_text(json.dumps(evaluation, indent=2) + "\n", encoding="utf-8")
    write_chart(evaluation, out / "evaluation.png")
    (out / "summary.md").write_text(summary_text(evaluation), encoding="utf-8")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--embeddings", type=Path, required=True, help="cache folder written by 'hpa-edge embed'"
    )
    parser.add_argument("--labels", type=Path, required=True, help="Id,Target label file")
    parser.add_argument("--out", type=Path, required=True, help="model folder to write")
    parser.add_argument(
        "--include-ids", type=Path, help="train and evaluate only on these ids (one per line)"
    )
    parser.add_argument("--name", help="data set name for the report (default: the label file's folder)")
    forest = parser.add_argument_group("forests")
    forest.add_argument(
        "--trees", type=int, default=ForestSettings.trees, help="trees per location (default %(default)s)"
    )
    forest.add_argument(
        "--max-leaf-nodes",
        type=int,
        default=ForestSettings.max_leaf_nodes,
        help="leaves per tree, 0 = grown fully (default %(default)s: all 28 forests under 12 MB as ONNX)",
    )
    forest.add_argument(
        "--class-weight", default="balanced", choices=("balanced", "balanced_subsample", "none")
    )
    forest.add_argument("--jobs", type=int, default=-1, help="CPU cores for fitting (default: all)")
    forest.add_argument(
        "--min-positives",
        type=int,
        default=DEFAULT_MIN_POSITIVES,
        help="fewer training positives and a location is not trained (default %(default)s)",
    )
    forest.add_argument(
        "--threshold-rule",
        choices=THRESHOLD_RULES,
        default=DEFAULT_RULE,
        help="how thresholds are chosen on out-of-fold scores (default %(default)s; docs/training.md)",
    )
    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument(
        "--test-fraction", type=float, default=TrainSettings.test_fraction, help="(default %(default)s)"
    )
    evaluation.add_argument(
        "--folds",
        type=int,
        default=TrainSettings.folds,
        help="cross-validation folds for thresholds (default %(default)s)",
    )
    evaluation.add_argument(
        "--bootstrap",
        type=int,
        default=TrainSettings.bootstrap,
        help="bootstrap resamples (default %(default)s)",
    )
    evaluation.add_argument(
        "--seed", type=int, default=0, help="seed of the split, folds and forests (default 0)"
    )
    evaluation.add_argument(
        "--original-trees",
        type=int,
        default=TrainSettings.original_trees,
        help="trees per forest of the original method, for comparison (default %(default)s, as the study)",
    )
    evaluation.add_argument(
        "--try-joint",
        action="store_true",
        help="also compare a joint Nucleoplasm + Cytosol model on the same split",
    )


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        settings = TrainSettings(
            forest=ForestSettings(
                trees=args.trees,
                max_leaf_nodes=args.max_leaf_nodes or None,
                class_weight=None if args.class_weight == "none" else args.class_weight,
                seed=args.seed,
                jobs=args.jobs,
            ),
            folds=args.folds,
            test_fraction=args.test_fraction,
            seed=args.seed,
            bootstrap=args.bootstrap,
            try_joint=args.try_joint,
            original_trees=args.original_trees,
            min_positives=args.min_positives,
            threshold_rule=args.threshold_rule,
        )
        labels = {row.stack_id: row.labels for row in read_labels(args.labels)}
        cache = EmbeddingCache(args.embeddings)
        embeddings = cache.load()
        embedder = cache.embedder_file  # the converted file the vectors came from, passed on
        if embedder is not None and not embedder.is_file():
            raise TrainError(f"{embedder}: the cache's copy of its embedder is missing; embed again")
        recipe = embeddings.features  # refuses a recipe this code does not know, or a width it does not give
        include = read_id_list(args.include_ids) if args.include_ids else None
        ids, lacking = join(embeddings, labels, include)
        if include is not None and (unknown := include - set(labels)):
            print(
                f"train: {len(unknown)} id(s) in {args.include_ids} have no label row: {sorted(unknown)[:3]}"
            )
        if lacking:
            print(
                f"train: {len(lacking)} labelled stack(s) lack an embedding and are left out: {lacking[:3]}"
            )
        if len(ids) < 10 * settings.folds:
            raise TrainError(f"only {len(ids)} stacks have both a label and an embedding; too few to train")
    except (ValueError, DatasetError, CacheError) as exc:
        print(f"hpa-edge train: {exc}", file=sys.stderr)
        return 2
    x, y = embeddings.rows(ids), label_matrix(ids, labels)
    name = args.name or args.labels.resolve().parent.name
    model = train(x, y, ids, settings, name)
    save(model, args.out, embeddings.key, settings, embedder)
    print(summary_text(model.evaluation), end="")
    print(
        f"train: features {recipe.name} v{recipe.version} ({x.shape[1]} values); "
        f"model and report in {args.out} ({time.monotonic() - started:.0f} s)"
    )
    return 0
