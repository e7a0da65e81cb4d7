"""`hpa-edge features-compare`: which feature recipe carries the location signal, on real stacks.

For a small labelled set (the 101 real HPA stacks in ../shared/hpa-real), every candidate
feature set is computed once per stack, then scored by repeated stratified k-fold
cross-validated ROC AUC for every location with at least `--min-positives` positives, with the
same Extra-Trees for all (`export.training.forests`, 200 trees of 24 leaves, as `hpa-edge auc`).
A reduction (standardise + PCA) is fitted inside each training fold only (nested), never on
the held-out rows. The table gives per location the mean over repeats and its standard
deviation over repeats (which is NOT the sampling error: with ~100 stacks one AUC is about
+-0.06 whatever the repeats say).

Candidates (the Lite0 backbone is the float Keras rebuild with the ImageNet weights):
- `gap224`: today's default, Lite0 224 px red/green/blue, global average pool (1280);
- `gap224-green`: the same with the green channel in all three slots (a green-only view);
- `hand45`: the 45 hand features of `export.training.baseline` (4 channels, 256 px);
- `hand-rgb`: the agent's recipe `hand-rgb` v1 (`agent.model.features`, 44, from the 224 px
  image the device already has);
- `rp-last-224` / `rp-last-512`: the last feature map (1280 channels) averaged inside the
  nucleus mask (Otsu on blurred blue), outside it, and the difference (3840);
- `rp-b10-512`: the same for block 10's output (112 channels, stride 16; 336);
- `rp3-last-512`: last map averaged in nucleus, cytoplasm and outside the cells (cell mask:
  Otsu on blurred red + yellow + blue) (3840);
- combinations: `A+pca16(B)` concatenates A with 16 principal components of B fitted in-fold.
- `hand-rgb2`: the agent's recipe `hand-rgb2` v1 (81: `hand-rgb` v1 and five more parts);
  `hand-rgb+radial`, `+texture`, `+nucleolar+nuclei`, `+ratios`: `hand-rgb` with one or two of
  them (`x-*`, sliced out of `hand-rgb2`); `hand-rgb2-extra-only`: the five parts alone (37);
  `hand-rgb2+gap224`: the columns of `lite0-gap+hand-rgb2` v1, hand part first (1361).

Feature matrices are cached in `--cache` (an npz) so a rerun only refits the forests.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from agent.model.features import (
    HAND2_PARAMS,
    hand2_features,
    hand2_layout,
    hand_features,
    nucleus_mask,
    otsu,
    region_pool,
)
from agent.stacks.errors import StackError
from agent.stacks.labels import LOCATIONS
from agent.stacks.preprocess import BitDepth, Preprocessing, parse_slots, preprocess, to_uint8
from export.data.dataset import Dataset, DatasetError
from export.training.auc import roc_auc, stratified_binary_folds
from export.training.baseline import features as baseline_features
from export.training.folds import out_of_fold
from export.training.forests import ForestSettings, fit_forests, predict_scores

BLOCK10 = "blocks.10.add"  # stage 5's last block: 112 channels at stride 16
LAST = "bn1.relu6"  # the head: 1280 channels at stride 32, before the global pool

# The parts `hand-rgb2` v1 adds to `hand-rgb` v1 (`agent.model.features.hand2_layout`)
EXTRA_PARTS = ("x-radial", "x-texture", "x-nucleolar", "x-nuclei", "x-ratios")
# Candidate sets: name -> (kept parts, parts reduced by PCA inside the folds)
CANDIDATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "gap224": (("gap224",), ()),
    "gap224-green": (("gap224-green",), ()),
    "hand45": (("hand45",), ()),
    "hand-rgb": (("hand-rgb",), ()),
    "rp-last-224": (("rp-last-224",), ()),
    "rp-last-512": (("rp-last-512",), ()),
    "rp-b10-512": (("rp-b10-512",), ()),
    "rp3-last-512": (("rp3-last-512",), ()),
    "hand-rgb+gap224": (("hand-rgb", "gap224"), ()),
    "hand-rgb+pca16(gap224)": (("hand-rgb",), ("gap224",)),
    "hand-rgb+pca16(rp-last-224)": (("hand-rgb",), ("rp-last-224",)),
    "hand45+pca16(rp-b10-512)": (("hand45",), ("rp-b10-512",)),
    "hand45+pca16(rp-last-512)": (("hand45",), ("rp-last-512",)),
    # issue 15: richer hand features from the device's 224 px image (`extra_features`)
    "hand-rgb+radial": (("hand-rgb", "x-radial"), ()),
    "hand-rgb+texture": (("hand-rgb", "x-texture"), ()),
    "hand-rgb+nucleolar+nuclei": (("hand-rgb", "x-nucleolar", "x-nuclei"), ()),
    "hand-rgb+ratios": (("hand-rgb", "x-ratios"), ()),
    "hand-rgb2": (("hand-rgb2",), ()),  # hand-rgb and all five parts above: the recipe `hand-rgb2` v1
    "hand-rgb2-extra-only": (EXTRA_PARTS, ()),
    "hand-rgb2+gap224": (("hand-rgb2", "gap224"), ()),  # `lite0-gap+hand-rgb2` v1, hand part first
}
COMPONENTS = 16
HELD_OUT_DEFAULT = ["gap224", "hand45", "hand-rgb", "hand-rgb+gap224", "hand-rgb+pca16(gap224)"]


PARTS_512 = ("rp-last-512", "rp-b10-512", "rp3-last-512")
BACKBONE_PARTS = ("gap224", "gap224-green", "rp-last-224", *PARTS_512)


def needed_parts(names: list[str]) -> set[str]:
    return {part for name in names for group in CANDIDATES[name] for part in group}


def feature_parts(
    dataset: Dataset, needed: set[str] | None = None, batch: int = 8
) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    """The parts named in CANDIDATES (those in `needed`, or all) for every readable stack:
    ids, labels, part -> N x F."""
    from export.features.backbones import LITE0_NORMALISATION, lite0_model, lite0_state, lite0_weights_path

    needed = needed_parts(list(CANDIDATES)) if needed is None else needed
    backbone = bool(needed & set(BACKBONE_PARTS))  # the hand parts need no Keras
    sizes = (224, 512) if needed & set(PARTS_512) else (224,)
    models = {}
    for size in sizes if backbone else ():
        import keras

        full = lite0_model(lite0_state(lite0_weights_path()), size, False, LITE0_NORMALISATION)
        models[size] = keras.Model(full.input, [full.get_layer(BLOCK10).output, full.get_layer(LAST).output])
    rgb = {size: Preprocessing(size=size) for size in (224, 512)}
    green = Preprocessing(size=224, slots=parse_slots("green,green,green"))
    ids: list[str] = []
    keep: list[int] = []
    parts: dict[str, list[np.ndarray]] = {}
    pending: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = []

    def add(name: str, row: np.ndarray) -> None:
        parts.setdefault(name, []).append(np.asarray(row, dtype=np.float32))

    def flush() -> None:
        if not backbone:
            pending.clear()
            return
        for size in sizes:
            images = np.stack([p[1][f"rgb{size}"] for p in pending]).astype(np.float32)
            block10, last = (np.asarray(m) for m in models[size].predict_on_batch(images))
            for i, (masks, _) in enumerate(pending):
                if size == 224:
                    add("gap224", last[i].mean(axis=(0, 1)))
                    add("rp-last-224", region_pool(last[i], masks["nucleus"]))
                else:
                    add("rp-last-512", region_pool(last[i], masks["nucleus"]))
                    add("rp-b10-512", region_pool(block10[i], masks["nucleus"]))
                    add("rp3-last-512", _pool3(last[i], masks))
        if "gap224-green" in needed:
            images = np.stack([p[1]["green224"] for p in pending]).astype(np.float32)
            _, last = (np.asarray(m) for m in models[224].predict_on_batch(images))
            for i in range(len(pending)):
                add("gap224-green", last[i].mean(axis=(0, 1)))
        pending.clear()

    for i, (sample, stack) in enumerate(dataset.stacks()):
        if isinstance(stack, StackError):
            print(f"features-compare: skipped {sample.stack_id}: {stack}", file=sys.stderr)
            continue
        ids.append(sample.stack_id)
        keep.append(i)
        channels = stack.channels
        if "hand45" in needed:
            add("hand45", baseline_features(channels))
        images = {f"rgb{size}": preprocess(channels, rgb[size]) for size in sizes}
        if "gap224-green" in needed:
            images["green224"] = preprocess(channels, green)
        add("hand-rgb", hand_features(images["rgb224"]))
        if needed & {"hand-rgb2", *EXTRA_PARTS}:
            row = hand2_features(images["rgb224"])
            add("hand-rgb2", row)
            start = 0
            for name, length, _ in hand2_layout(HAND2_PARAMS):
                if f"x-{name}" in EXTRA_PARTS:
                    add(f"x-{name}", row[start : start + length])
                start += length
        pending.append((_masks(channels), images))
        if len(pending) == batch:
            flush()
    if pending:
        flush()
    y = dataset.label_matrix()[keep]
    return ids, y, {name: np.stack(rows) for name, rows in parts.items()}


def _masks(channels: Mapping[str, np.ndarray], size: int = 256) -> dict[str, np.ndarray]:
    """Nucleus (Otsu on blurred blue) and cell (Otsu on blurred red + yellow + blue) at 256 px."""
    import cv2

    small = {
        c: cv2.resize(p, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255
        for c, p in to_uint8(channels, BitDepth()).items()
    }
    nucleus = nucleus_mask(small["blue"])
    cell = otsu(cv2.GaussianBlur(small["red"] + small["yellow"] + small["blue"], (0, 0), 3)) | nucleus
    return {"nucleus": nucleus, "cell": cell}


def _pool3(maps: np.ndarray, masks: dict[str, np.ndarray]) -> np.ndarray:
    """Means of a map in nucleus, cytoplasm and outside the cells (3C)."""
    import cv2

    h, w = maps.shape[:2]
    flat = maps.reshape(h * w, -1).astype(np.float64)
    out = []
    for mask in (masks["nucleus"], masks["cell"] & ~masks["nucleus"], ~masks["cell"]):
        share = cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA).ravel()
        out.append(share @ flat / share.sum() if share.sum() > 1e-6 else np.zeros(flat.shape[1]))
    return np.concatenate(out).astype(np.float32)


def pca_reducer(components: int) -> Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Standardise + PCA fitted on the fit rows only; returns (fit rows, held rows) reduced."""

    def reduce(fit: np.ndarray, held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mean, std = fit.mean(axis=0), fit.std(axis=0) + 1e-6
        a, b = (fit - mean) / std, (held - mean) / std
        _, _, vt = np.linalg.svd(a, full_matrices=False)
        basis = vt[:components].T
        return a @ basis, b @ basis

    return reduce


def candidate_auc(
    parts: dict[str, np.ndarray],
    kept: tuple[str, ...],
    reduced: tuple[str, ...],
    y: np.ndarray,
    locations: list[int],
    folds: int,
    repeats: int,
    settings: ForestSettings,
) -> np.ndarray:
    """repeats x locations out-of-fold ROC AUC of one candidate (reduction fitted in-fold)."""
    x_kept = np.concatenate([parts[p] for p in kept], axis=1)
    width = x_kept.shape[1]
    x = np.concatenate([x_kept, *[parts[p] for p in reduced]], axis=1) if reduced else x_kept
    reduce = pca_reducer(COMPONENTS)

    def fit_predict(x_fit: np.ndarray, y_fit: np.ndarray, x_held: np.ndarray) -> np.ndarray:
        if reduced:
            r_fit, r_held = reduce(x_fit[:, width:], x_held[:, width:])
            x_fit = np.concatenate([x_fit[:, :width], r_fit], axis=1)
            x_held = np.concatenate([x_held[:, :width], r_held], axis=1)
        return predict_scores(fit_forests(x_fit, y_fit, settings), x_held)

    out = np.zeros((repeats, len(locations)))
    for li, j in enumerate(locations):
        rng = np.random.default_rng(settings.seed + j)  # the same folds for every candidate
        column = y[:, j].astype(bool)
        for r in range(repeats):
            fold = stratified_binary_folds(column, folds, rng)
            scores = out_of_fold(fit_predict, x, column[:, None], fold)[:, 0]
            out[r, li] = roc_auc(column, scores)
    return out


def _design(
    parts: dict[str, np.ndarray], test: dict[str, np.ndarray], kept: tuple[str, ...], reduced: tuple[str, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """Training and test matrices of one candidate; a reduction is fitted on the training rows."""
    fit = np.concatenate([parts[p] for p in kept], axis=1)
    held = np.concatenate([test[p] for p in kept], axis=1)
    if reduced:
        r_fit, r_held = pca_reducer(COMPONENTS)(
            np.concatenate([parts[p] for p in reduced], axis=1),
            np.concatenate([test[p] for p in reduced], axis=1),
        )
        fit, held = np.concatenate([fit, r_fit], axis=1), np.concatenate([held, r_held], axis=1)
    return fit, held


def held_out(
    parts: dict[str, np.ndarray],
    y: np.ndarray,
    test: dict[str, np.ndarray],
    y_test: np.ndarray,
    names: list[str],
    seed: int,
) -> dict[str, Any]:
    """Each candidate's `LocationForests` (as `hpa-edge train` fits them) fitted on one set and
    scored once on another: macro F1 with its 95% bootstrap interval, and the paired difference
    against the first candidate on the same resamples."""
    from export.training.forests import LocationForests
    from export.training.metrics import bootstrap_f1, bootstrap_weights, interval, macro_f1, nanmean_rows

    weights = bootstrap_weights(len(y_test), 1000, seed)
    first: np.ndarray | None = None
    out: dict[str, Any] = {}
    for name in names:
        fit, held = _design(parts, test, *CANDIDATES[name])
        model = LocationForests(seed=seed).fit(fit, y.astype(bool))
        predicted = model.predict(held)
        boot = nanmean_rows(bootstrap_f1(y_test.astype(bool), predicted, weights))
        first = boot if first is None else first
        out[name] = {
            "dim": fit.shape[1],
            "macro_f1": macro_f1(y_test.astype(bool), predicted),
            "ci95": interval(boot),
            "difference_ci95": interval(boot - first),
            "labels_per_stack": float(predicted.sum(axis=1).mean()),
            "exact_sets": float((predicted == y_test.astype(bool)).all(axis=1).mean()),
            "trained": int(sum(s == "trained" for s in model.status_)),
        }
    return out


def _load_or_compute(
    data: Path, labels: Path | None, cache: Path | None, needed: set[str]
) -> tuple[list[str], np.ndarray, dict[str, np.ndarray]]:
    cached: dict[str, np.ndarray] = {}
    cached_ids: list[str] = []
    if cache and cache.is_file():
        with np.load(cache, allow_pickle=False) as stored:
            cached = {k.removeprefix("part:"): stored[k] for k in stored.files if k.startswith("part:")}
            cached_ids = stored["ids"].tolist()
            if needed <= set(cached):
                return cached_ids, stored["y"], cached
    if labels is None:
        labels = data / "labels.csv" if (data / "labels.csv").is_file() else data / "train.csv"
    ids, y, parts = feature_parts(Dataset(data, labels), needed - set(cached) if cached else needed)
    if cached and ids == cached_ids:  # only the missing parts were computed: keep the others
        parts = {**cached, **parts}
    if cache:
        arrays: dict[str, Any] = {f"part:{k}": v for k, v in parts.items()}
        np.savez(cache, ids=np.asarray(ids), y=y, **arrays)
    return ids, y, parts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="folder with the channel files")
    parser.add_argument(
        "--labels", type=Path, help="Id,Target label file (default: DATA/labels.csv, else DATA/train.csv)"
    )
    parser.add_argument(
        "--cache", type=Path, help="npz of the feature matrices (read if present, else written)"
    )
    parser.add_argument(
        "--candidates", nargs="+", choices=sorted(CANDIDATES), help="(default: all, in the table's order)"
    )
    parser.add_argument("--min-positives", type=int, default=8, help="locations scored (default 8)")
    parser.add_argument("--folds", type=int, default=5, help="(default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats with new folds (default 3)")
    parser.add_argument("--trees", type=int, default=200, help="trees per forest (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--test",
        type=Path,
        help="instead of cross-validation: fit on DATA, score once on this set (macro F1)",
    )
    parser.add_argument("--test-labels", type=Path, help="its label file (default as --labels)")
    parser.add_argument("--test-cache", type=Path, help="npz of the test set's feature matrices")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")


def run(args: argparse.Namespace) -> int:
    import warnings

    warnings.filterwarnings("ignore", message=".*sklearn.utils.parallel.delayed.*")
    started = time.perf_counter()
    names = args.candidates or (HELD_OUT_DEFAULT if args.test else list(CANDIDATES))
    needed = needed_parts(names)
    try:
        ids, y, parts = _load_or_compute(args.data, args.labels, args.cache, needed)
        if args.test:
            test_ids, y_test, test = _load_or_compute(args.test, args.test_labels, args.test_cache, needed)
    except DatasetError as exc:
        print(f"hpa-edge features-compare: {exc}", file=sys.stderr)
        return 2
    featured = time.perf_counter()
    if args.test:
        results = held_out(parts, y, test, y_test, names, args.seed)
        print(
            f"trained on {len(ids)} stacks ({args.data}), scored once on {len(test_ids)} ({args.test}); "
            "macro F1 with 95% bootstrap interval (1000 resamples), paired difference to the first row"
        )
        print(
            "| features | dim | macro F1 | difference | labels per stack | exact label sets "
            "| locations trained |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- |")
        truth = float(y_test.sum(axis=1).mean())
        for name, r in results.items():
            low, high = r["ci95"]
            d_low, d_high = r["difference_ci95"]
            print(
                f"| {name} | {r['dim']} | {r['macro_f1']:.3f} ({low:.3f}-{high:.3f}) | "
                f"{r['macro_f1'] - results[names[0]]['macro_f1']:+.3f} ({d_low:+.3f} to {d_high:+.3f}) | "
                f"{r['labels_per_stack']:.2f} (true {truth:.2f}) | {r['exact_sets']:.1%} | {r['trained']} |"
            )
    else:
        results = cross_validated(parts, y, names, args)
    print(f"features {featured - started:.0f} s, forests {time.perf_counter() - featured:.0f} s")
    if args.json:
        payload = {"stacks": len(ids), "repeats": args.repeats, "folds": args.folds, "results": results}
        args.json.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    return 0


def cross_validated(
    parts: dict[str, np.ndarray], y: np.ndarray, names: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """The table of repeated k-fold ROC AUC per frequent location, one row per candidate."""
    locations = [j for j in range(y.shape[1]) if y[:, j].sum() >= args.min_positives]
    settings = ForestSettings(trees=args.trees, seed=args.seed)
    header = " | ".join(f"{LOCATIONS[j]} ({int(y[:, j].sum())})" for j in locations)
    print(
        f"{len(y)} stacks; ROC AUC, mean ± std over {args.repeats} repeats of stratified "
        f"{args.folds}-fold CV; Extra-Trees {args.trees} trees x {settings.max_leaf_nodes} leaves"
    )
    print(f"| features | dim | {header} | mean of {len(locations)} |")
    print("|" + " --- |" * (3 + len(locations)))
    results: dict[str, Any] = {}
    for name in names:
        kept, reduced = CANDIDATES[name]
        auc = candidate_auc(parts, kept, reduced, y, locations, args.folds, args.repeats, settings)
        dim = sum(parts[p].shape[1] for p in kept) + (COMPONENTS if reduced else 0)
        mean, std = auc.mean(axis=0), auc.std(axis=0)
        overall = auc.mean(axis=1)
        cells = [f"{m:.2f} ± {s:.2f}" for m, s in zip(mean, std, strict=True)]
        print(
            f"| {name} | {dim} | {' | '.join(cells)} | {overall.mean():.3f} ± {overall.std():.3f} |",
            flush=True,
        )
        results[name] = {
            "dim": dim,
            "per_location": {LOCATIONS[j]: auc[:, i].tolist() for i, j in enumerate(locations)},
            "mean": overall.tolist(),
        }
    return results
