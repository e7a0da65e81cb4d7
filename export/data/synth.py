"""Write synthetic HPA stacks in the Kaggle layout (`<id>_<channel>.png` + `train.csv`).

Label sets follow the real data set: by default the per-location frequencies and the
number of labels per stack of the 31,072-stack Kaggle training set (agent.stacks.labels); with
`--prior CSV`, label sets are drawn from a real label file, which also keeps which
locations occur together. Every stack's pixels depend only on (seed, index), so a run is
repeatable whatever the number of worker processes.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from agent.stacks.labels import (
    CHANNELS,
    KAGGLE_LABELS_PER_STACK,
    KAGGLE_LOCATION_COUNTS,
    KAGGLE_N_STACKS,
    N_LOCATIONS,
)
from export.data.cells import paint_stack
from export.data.dataset import DatasetError, read_labels
from export.reports.progress import Progress

GENERATOR_VERSION = 1
LabelSets = list[tuple[int, ...]]


def calibrated_weights(
    marginals: Sequence[float] | np.ndarray,
    k_probs: Sequence[float] | np.ndarray,
    iterations: int = 40,
    samples: int = 20_000,
) -> np.ndarray:
    """Sampling weights such that "draw k labels without replacement, proportional to the
    weights" reproduces the wanted per-location marginal frequencies.

    Plain count-proportional weights under-sample rare locations once frequent ones are
    taken, so the weights are corrected against `inclusion_probabilities` a few times.
    """
    target = np.asarray(marginals, dtype=np.float64)
    rng = np.random.default_rng(12345)
    ks = rng.choice(np.arange(1, len(k_probs) + 1), size=samples, p=np.asarray(k_probs) / sum(k_probs))
    gumbel = rng.gumbel(size=(samples, len(target)))
    weights = target / target.sum()
    for _ in range(iterations):
        achieved = inclusion_probabilities(weights, gumbel, ks)
        weights *= target / np.maximum(achieved, 1e-12)
        weights /= weights.sum()
    return weights


def inclusion_probabilities(weights: np.ndarray, gumbel: np.ndarray, ks: np.ndarray) -> np.ndarray:
    """P(location i is among the k drawn), estimated with each location's own key integrated out.

    Drawing k without replacement proportional to w equals taking the k largest keys
    log(w) + Gumbel noise (the Gumbel top-k trick). Location i is drawn when its key beats the
    k-th largest of the others' keys t, which happens with probability 1 - exp(-w_i e^-t).
    Averaging that instead of 0/1 outcomes keeps the estimate smooth for locations as rare
    as Rods & rings (11 in 31,072), where counting hits would mostly see zeros.
    """
    keys = np.log(weights)[None, :] + gumbel
    descending = -np.sort(-keys, axis=1)
    rank = np.argsort(np.argsort(-keys, axis=1), axis=1)
    rows = np.arange(len(keys))
    kth = descending[rows, ks - 1][:, None]
    next_one = descending[rows, np.minimum(ks, keys.shape[1] - 1)][:, None]
    others_kth = np.where(rank < ks[:, None], next_one, kth)
    return (1.0 - np.exp(-weights[None, :] * np.exp(-others_kth))).mean(axis=0)


@functools.cache
def _kaggle_weights() -> np.ndarray:
    """The calibration depends only on constants and takes seconds: do it once per process."""
    marginals = np.asarray(KAGGLE_LOCATION_COUNTS) / KAGGLE_N_STACKS
    weights = calibrated_weights(marginals, np.asarray(KAGGLE_LABELS_PER_STACK, dtype=np.float64))
    weights.flags.writeable = False  # shared by every caller
    return weights


def sample_label_sets(n: int, seed: int, prior: LabelSets | None = None) -> LabelSets:
    """n label sets, from the Kaggle frequencies or drawn with replacement from `prior`."""
    rng = np.random.default_rng([seed, 0])
    if prior:
        picks = rng.integers(0, len(prior), size=n)
        return [prior[int(i)] for i in picks]
    k_probs = np.asarray(KAGGLE_LABELS_PER_STACK, dtype=np.float64)
    weights = _kaggle_weights()
    ks = rng.choice(np.arange(1, len(k_probs) + 1), size=n, p=k_probs / k_probs.sum())
    keys = np.log(weights) + rng.gumbel(size=(n, N_LOCATIONS))
    order = np.argsort(-keys, axis=1)
    return [tuple(sorted(int(x) for x in order[i, : ks[i]])) for i in range(n)]


def stack_id(seed: int, index: int) -> str:
    return f"synth{seed}-{index:06d}"


def write_stack(out: Path, seed: int, index: int, labels: tuple[int, ...], size: int, depth: int) -> str:
    """Paint and write one stack; files appear under their final names only when complete."""
    rng = np.random.default_rng([seed, index + 1])
    channels = paint_stack(rng, labels, size=size, depth=depth)
    sid = stack_id(seed, index)
    for channel in CHANNELS:
        final = out / f"{sid}_{channel}.png"
        partial = out / f".{sid}_{channel}.png.tmp"
        ok, encoded = cv2.imencode(".png", channels[channel], [cv2.IMWRITE_PNG_COMPRESSION, 1])
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {final}")
        partial.write_bytes(encoded.tobytes())
        os.replace(partial, final)
    return sid


Job = tuple[Path, int, int, tuple[int, ...], int, int]


def _write_one(job: Job) -> str:
    return write_stack(*job)


def _run_jobs(jobs: list[Job], workers: int) -> Iterator[str]:
    """Stack ids as their stacks are written, in job order, in this process or a pool."""
    if workers == 1:
        yield from map(_write_one, jobs)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_write_one, jobs, chunksize=8)


def generate(
    out: Path,
    n: int,
    seed: int,
    size: int = 512,
    depth: int = 8,
    workers: int | None = None,
    prior: LabelSets | None = None,
    progress: bool = False,
) -> Path:
    """Write n stacks and `train.csv` into `out`; return the label file's path."""
    out.mkdir(parents=True, exist_ok=True)
    label_sets = sample_label_sets(n, seed, prior)
    jobs = [(out, seed, i, labels, size, depth) for i, labels in enumerate(label_sets)]
    bar = Progress("synth", n) if progress else None
    for _ in _run_jobs(jobs, workers or os.cpu_count() or 1):
        if bar is not None:
            bar.advance()
    if bar is not None:
        bar.close()
    labels_csv = out / "train.csv"
    partial = out / ".train.csv.tmp"
    lines = ["Id,Target"] + [f"{stack_id(seed, i)},{' '.join(map(str, s))}" for i, s in enumerate(label_sets)]
    partial.write_text("\n".join(lines) + "\n", encoding="utf-8")
    os.replace(partial, labels_csv)
    meta = {
        "generator": "hpa-edge synth",
        "version": GENERATOR_VERSION,
        "n": n,
        "seed": seed,
        "size": size,
        "bit_depth": depth,
        "prior": "file" if prior else "kaggle-2018-frequencies",
    }
    (out / "synth.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return labels_csv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", type=Path, required=True, help="folder to write the stacks and train.csv into"
    )
    parser.add_argument("--n", type=int, default=100, help="number of stacks (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same files (default 0)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (default 512, as HPA)")
    parser.add_argument(
        "--bit-depth",
        type=int,
        default=8,
        choices=(8, 12, 16),
        help="8 writes 8-bit PNGs; 12 or 16 write 16-bit PNGs holding that many bits",
    )
    parser.add_argument(
        "--prior", type=Path, help="draw label sets from this Id,Target file (e.g. the real train.csv)"
    )
    parser.add_argument("--workers", type=int, default=0, help="processes (default: one per core)")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into a folder that already has a train.csv"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    if args.n < 1:
        print("hpa-edge synth: --n must be at least 1")
        return 2
    if not 32 <= args.size <= 4096:
        print("hpa-edge synth: --size must be 32..4096")
        return 2
    if (args.out / "train.csv").exists() and not args.overwrite:
        print(f"hpa-edge synth: {args.out / 'train.csv'} exists; pass --overwrite to replace that data set")
        return 2
    try:
        prior = [row.labels for row in read_labels(args.prior)] if args.prior else None
    except DatasetError as exc:
        print(f"hpa-edge synth: --prior: {exc}")
        return 2
    started = time.monotonic()
    labels_csv = generate(
        args.out,
        args.n,
        args.seed,
        args.size,
        args.bit_depth,
        args.workers or None,
        prior,
        progress=not args.quiet,
    )
    print(f"synth: wrote {args.n} stacks and {labels_csv} in {time.monotonic() - started:.1f} s")
    return 0
