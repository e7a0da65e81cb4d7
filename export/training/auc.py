"""`hpa-edge auc`: cross-validated ROC AUC of the frequent locations, to compare embedding caches.

For small labelled sets (such as the 101 real stacks) that are far too few for 28-location
F1 but enough to ask: do these embeddings separate Nucleoplasm and Cytosol stacks? Each
cache (one backbone, weights and preprocessing) gets the same repeated stratified folds and
the same forests; the table says which settings carry more signal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from agent.stacks.labels import LOCATIONS
from agent.stacks.preprocess import Preprocessing, format_slots
from export.data.dataset import DatasetError, read_labels
from export.features.embed import CacheError, EmbeddingCache
from export.training.folds import out_of_fold
from export.training.forests import ForestSettings, fit_forests, predict_scores

DEFAULT_LOCATIONS = (0, 25)


def roc_auc(truth: np.ndarray, scores: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    truth = np.asarray(truth, dtype=bool)
    positives, negatives = scores[truth], scores[~truth]
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))


def stratified_binary_folds(column: np.ndarray, n_folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold number per stack with positives and negatives spread evenly over the folds."""
    folds = np.empty(len(column), dtype=np.int64)
    for value in (False, True):
        rows = rng.permutation(np.flatnonzero(column.astype(bool) == value))
        folds[rows] = np.arange(len(rows)) % n_folds
    return folds


def cross_validated_auc(
    x: np.ndarray, column: np.ndarray, n_folds: int, repeats: int, settings: ForestSettings
) -> tuple[float, float]:
    """Mean and standard deviation over repeats of the out-of-fold ROC AUC of one location."""

    def fit_predict(x_fit: np.ndarray, y_fit: np.ndarray, x_held: np.ndarray) -> np.ndarray:
        return predict_scores(fit_forests(x_fit, y_fit, settings), x_held)

    rng = np.random.default_rng(settings.seed)
    values = []
    for _ in range(repeats):
        folds = stratified_binary_folds(column, n_folds, rng)
        scores = out_of_fold(fit_predict, x, column[:, None], folds)[:, 0]
        values.append(roc_auc(column, scores))
    return float(np.mean(values)), float(np.std(values))


def describe(key: dict[str, object]) -> str:
    backbone = key["backbone"]
    prep = Preprocessing.from_dict(key["preprocessing"])  # type: ignore[arg-type]
    weights = backbone["weights"]  # type: ignore[index]
    return f"{backbone['name']:5s} {weights:8s} {prep.size:4d} px  {format_slots(prep.slots)}"  # type: ignore[index]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", type=Path, required=True, help="Id,Target label file")
    parser.add_argument("--embeddings", type=Path, nargs="+", required=True, help="one or more cache folders")
    parser.add_argument("--folds", type=int, default=5, help="(default 5)")
    parser.add_argument("--repeats", type=int, default=5, help="repeats with new folds (default 5)")
    parser.add_argument("--trees", type=int, default=200, help="trees per forest (default 200)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    try:
        labels = {row.stack_id: row.labels for row in read_labels(args.labels)}
        caches = [(path, EmbeddingCache(path).load()) for path in args.embeddings]
    except (DatasetError, CacheError) as exc:
        print(f"hpa-edge auc: {exc}", file=sys.stderr)
        return 2
    settings = ForestSettings(trees=args.trees, seed=args.seed)
    header = " | ".join(f"AUC {LOCATIONS[j]}" for j in DEFAULT_LOCATIONS)
    print(f"| embeddings (backbone, weights, input, channels) | stacks | {header} |")
    print("|" + " --- |" * (2 + len(DEFAULT_LOCATIONS)))
    for path, embeddings in caches:
        ids = [sid for sid in embeddings.ids if sid in labels]
        if len(ids) < 2 * args.folds:
            print(f"hpa-edge auc: {path}: only {len(ids)} labelled stacks", file=sys.stderr)
            return 2
        x = embeddings.rows(ids)
        cells = []
        for j in DEFAULT_LOCATIONS:
            column = np.array([j in labels[sid] for sid in ids])
            mean, std = cross_validated_auc(x, column, args.folds, args.repeats, settings)
            cells.append(f"{mean:.3f} ± {std:.3f} ({int(column.sum())} pos)")
        print(f"| {describe(embeddings.key)} | {len(ids)} | {' | '.join(cells)} |", flush=True)
    return 0
