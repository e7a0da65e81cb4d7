"""`hpa-edge convert`: the backbone as the device will run it, made before the forests are trained.

The forests are fitted and thresholded on this file's features as LiteRT computes them on the
workstation (`hpa-edge embed --embedder FILE`), and `hpa-edge export` ships this very file,
so the evaluation report describes the bundle that ships rather than a float model the
device never runs (int8 Lite0 kept the exact label set of only 25-30% of held-out stacks
when forests were trained on float Keras embeddings). The float network stays available to
`export` as a fidelity comparison.

int8 (the default) is calibrated on `--calibration` stacks of the data set drawn with
`--seed`. Calibration sees their pixels only, never their labels, so it may include stacks
that training later holds out; nothing about the test split's labels reaches the model.

Writes FILE (the flatbuffer) and FILE.json beside it (`describe`): the backbone identity,
the preprocessing, the quantization, the calibration stacks, the versions and the file's
sha256. The embedding cache key, the model folder and the bundle manifest carry that entry,
so every later step can tell which file its vectors came from.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from agent.stacks.digest import file_sha256
from agent.stacks.errors import StackError
from agent.stacks.preprocess import Preprocessing, preprocess
from export.conversion.convert import QUANTIZATIONS, to_tflite
from export.data.dataset import Dataset, DatasetError
from export.features.backbones import BackboneError, BackboneSpec, build
from export.features.embed import (
    EMBEDDER_FORMAT,
    add_backbone_arguments,
    add_preprocessing_arguments,
    embedder_sidecar,
    preprocessing_from_args,
)

DEFAULT_CALIBRATION = 100


class ConvertError(ValueError):
    """The embedder cannot be made as asked; the message says why."""


def calibration_images(
    dataset: Dataset, n: int, prep: Preprocessing, seed: int
) -> tuple[list[str], list[np.ndarray]]:
    """`n` readable stacks of the data set drawn with `seed`, preprocessed as the device does."""
    order = [dataset.ids[i] for i in np.random.default_rng(seed).permutation(len(dataset.ids))]
    wanted = set(order[: n + max(10, n // 5)])  # a few spares for unreadable stacks
    found: dict[str, np.ndarray] = {}
    for sample, stack in dataset.stacks_for(wanted):
        if isinstance(stack, StackError):
            print(f"convert: skipped {sample.stack_id}: {stack}", file=sys.stderr)
            continue
        found[sample.stack_id] = preprocess(stack.channels, prep)
    ids = [sid for sid in order if sid in found][:n]
    if not ids:
        raise ConvertError("none of the calibration stacks could be read")
    return ids, [found[sid] for sid in ids]


def describe(
    spec: BackboneSpec, prep: Preprocessing, quantization: str, calibration_ids: list[str], seed: int
) -> dict[str, Any]:
    """The sidecar entry of an embedder file, without its hash (added once the file is written)."""
    import tensorflow as tf

    return {
        "format": EMBEDDER_FORMAT,
        "backbone": spec.identity(),
        "preprocessing": prep.to_dict(),
        "quantization": quantization,
        "calibration": {"stacks": len(calibration_ids), "seed": seed, "ids": calibration_ids},
        "versions": {"python": platform.python_version(), "tensorflow": tf.__version__},
    }


def make_embedder(
    dataset: Dataset,
    spec: BackboneSpec,
    prep: Preprocessing,
    quantization: str,
    out: Path,
    calibration: int = DEFAULT_CALIBRATION,
    seed: int = 0,
) -> dict[str, Any]:
    """Convert the backbone, write OUT and OUT.json; return the sidecar entry."""
    ids, images = (
        calibration_images(dataset, calibration, prep, seed) if quantization.startswith("int8") else ([], [])
    )
    model = build(spec, prep.size)
    flatbuffer = to_tflite(model, quantization, images or None)
    entry = describe(spec, prep, quantization, ids, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(flatbuffer)
    entry.update(sha256=file_sha256(out), bytes=len(flatbuffer))
    embedder_sidecar(out).write_text(json.dumps(entry, indent=2) + "\n", encoding="utf-8")
    return entry


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, required=True, help="folder with the channel files")
    parser.add_argument("--labels", type=Path, help="its Id,Target file (default: DATA/train.csv); ids only")
    parser.add_argument(
        "--out", type=Path, required=True, help="the .tflite file to write (its description goes to OUT.json)"
    )
    parser.add_argument("--quantization", choices=QUANTIZATIONS, default="int8", help="(default int8)")
    parser.add_argument(
        "--calibration",
        type=int,
        default=DEFAULT_CALIBRATION,
        help=f"stacks for int8 calibration, pixels only (default {DEFAULT_CALIBRATION})",
    )
    parser.add_argument(
        "--missing",
        choices=("error", "skip"),
        default="skip",
        help="label rows without images (default skip)",
    )
    add_backbone_arguments(parser)  # its --seed also draws the calibration stacks
    add_preprocessing_arguments(parser)


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    try:
        if args.calibration < 1:
            raise ConvertError(f"--calibration must be at least 1, not {args.calibration}")
        prep = preprocessing_from_args(args)
        spec = BackboneSpec(args.backbone, args.weights, args.seed)
        dataset = Dataset(args.data, args.labels or args.data / "train.csv", missing=args.missing)
        entry = make_embedder(dataset, spec, prep, args.quantization, args.out, args.calibration, args.seed)
    except (ConvertError, ValueError, DatasetError, BackboneError) as exc:
        print(f"hpa-edge convert: {exc}", file=sys.stderr)
        return 2
    print(
        f"convert: {args.out} ({entry['quantization']}, {entry['bytes'] / 1e6:.1f} MB, "
        f"calibrated on {entry['calibration']['stacks']} stacks) from {spec.name} weights {spec.weights}, "
        f"input {prep.size} px; {time.monotonic() - started:.0f} s"
    )
    return 0
