"""A simple, honest baseline: hand-made image features + Extra-Trees, scored by macro F1.

It answers one question about a data set (mainly the synthetic one): can the locations be
learned from the pixels, and how hard is it? Features describe where the green protein
sits relative to the nucleus (blue), the cell (red + yellow) and the other markers, and how
punctate it is at a few scales. Thresholds are tuned per location on out-of-fold
predictions of the training part only; the held-out part is scored once.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.model.thresholds import apply
from agent.stacks.errors import StackError
from agent.stacks.labels import LOCATIONS
from agent.stacks.preprocess import BitDepth, to_uint8
from export.data.dataset import Dataset, DatasetError
from export.data.split import stratified_folds, train_test_split
from export.training.folds import out_of_fold
from export.training.metrics import best_thresholds, chance_macro_f1, f1_per_location, macro_f1

FEATURE_SIZE = 256


def features(channels: Mapping[str, np.ndarray]) -> np.ndarray:
    """About 60 numbers describing the green channel relative to the other three."""
    eight = to_uint8(channels, BitDepth())
    small = {
        c: cv2.resize(p, (FEATURE_SIZE, FEATURE_SIZE), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
        for c, p in eight.items()
    }
    green, blue = small["green"], small["blue"]
    nucleus = _otsu(cv2.GaussianBlur(blue, (0, 0), 2))
    cell = _otsu(cv2.GaussianBlur(small["red"] + small["yellow"] + blue, (0, 0), 3)) | nucleus
    cytoplasm = cell & ~nucleus
    kernel = np.ones((5, 5), np.uint8)
    nuclear_rim = cv2.dilate(nucleus.astype(np.uint8), kernel).astype(bool) & ~cv2.erode(
        nucleus.astype(np.uint8), kernel
    ).astype(bool)
    cell_rim = cell & ~cv2.erode(cell.astype(np.uint8), kernel).astype(bool)
    regions = {
        "nucleus": nucleus,
        "cytoplasm": cytoplasm,
        "nuclear_rim": nuclear_rim,
        "cell_rim": cell_rim,
        "background": ~cell,
    }
    total = float(green.sum()) + 1e-6
    values: list[float] = []
    high = green > green.mean() + 2 * green.std()
    for mask in regions.values():
        inside = green[mask] if mask.any() else np.zeros(1, np.float32)
        values += [
            float(inside.mean()),
            float(inside.std()),
            float(green[mask].sum()) / total,
            float(high[mask].mean()) if mask.any() else 0.0,
        ]
    for other in ("red", "yellow", "blue"):
        values.append(_correlation(green[cell], small[other][cell]))
    for sigma in (0.8, 1.5, 3.0, 6.0):  # blob strength at several sizes (difference of Gaussians)
        dog = cv2.GaussianBlur(green, (0, 0), sigma) - cv2.GaussianBlur(green, (0, 0), sigma * 1.6)
        for mask in (nucleus, cytoplasm):
            part = dog[mask] if mask.any() else np.zeros(1, np.float32)
            values += [float(np.percentile(part, 99)), float((part > 0.02).mean())]
    values += list(np.percentile(green, (50, 90, 99, 99.9)).astype(float))
    values += [float(nucleus.mean()), float(cell.mean())]
    return np.asarray(values, dtype=np.float32)


def _otsu(image: np.ndarray) -> np.ndarray:
    eight = np.clip(image * 255, 0, 255).astype(np.uint8)
    _, mask = cv2.threshold(eight, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return mask.astype(bool)


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def feature_matrix(dataset: Dataset) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Features and labels of every readable stack; unreadable ones are reported and skipped."""
    rows, keep = [], []
    for i, (sample, stack) in enumerate(dataset.stacks()):
        if isinstance(stack, StackError):
            print(f"baseline: skipped {sample.stack_id}: {stack}")
            continue
        rows.append(features(stack.channels))
        keep.append(i)
    y = dataset.label_matrix()[keep]
    return np.stack(rows), y, [dataset.ids[i] for i in keep]


def evaluate(x: np.ndarray, y: np.ndarray, seed: int = 0, test_fraction: float = 0.3) -> dict[str, Any]:
    """Train on a stratified split, tune thresholds out-of-fold, score the held-out part."""
    from sklearn.ensemble import ExtraTreesClassifier

    train, test = train_test_split(y, test_fraction, seed)

    def model() -> ExtraTreesClassifier:
        return ExtraTreesClassifier(
            n_estimators=300,
            min_samples_leaf=2,
            max_features=0.3,
            class_weight="balanced",
            n_jobs=-1,
            random_state=seed,
        )

    def fit_predict(x_fit: np.ndarray, y_fit: np.ndarray, x_held: np.ndarray) -> np.ndarray:
        return _scores(model().fit(x_fit, y_fit), x_held, y.shape[1])

    oof = out_of_fold(fit_predict, x[train], y[train], stratified_folds(y[train], 3, seed))
    thresholds = best_thresholds(y[train], oof)
    predicted = apply(fit_predict(x[train], y[train], x[test]), thresholds)
    per_location = f1_per_location(y[test], predicted)
    return {
        "n_train": len(train),
        "n_test": len(test),
        "macro_f1": macro_f1(y[test], predicted),
        "chance_macro_f1": chance_macro_f1(y[test]),
        "locations_scored": int(np.isfinite(per_location).sum()),
        "per_location_f1": {
            LOCATIONS[j]: (None if np.isnan(v) else round(float(v), 4)) for j, v in enumerate(per_location)
        },
        "support": {LOCATIONS[j]: int(y[test][:, j].sum()) for j in range(y.shape[1])},
    }


def _scores(model: Any, x: np.ndarray, n_labels: int) -> np.ndarray:
    """P(location present) per column; multi-output Extra-Trees gives one array per label."""
    out = np.zeros((len(x), n_labels))
    for j, proba in enumerate(model.predict_proba(x)):
        classes = list(model.classes_[j])
        if 1 in classes:
            out[:, j] = proba[:, classes.index(1)]
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="folder with the channel files")
    parser.add_argument("--labels", type=Path, help="Id,Target label file (default: DATA/train.csv)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")


def run(args: argparse.Namespace) -> int:
    try:
        dataset = Dataset(args.data, args.labels or args.data / "train.csv")
    except DatasetError as exc:
        print(f"hpa-edge baseline: {exc}")
        return 2
    x, y, _ = feature_matrix(dataset)
    result = evaluate(x, y, seed=args.seed, test_fraction=args.test_fraction)
    print(
        f"baseline: macro F1 {result['macro_f1']:.3f} on {result['n_test']} held-out stacks "
        f"({result['locations_scored']} locations scored; chance {result['chance_macro_f1']:.3f})"
    )
    for name, f1 in result["per_location_f1"].items():
        shown = "  n/a" if f1 is None else f"{f1:5.2f}"
        print(f"  {name:32s} F1 {shown}  support {result['support'][name]}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0
