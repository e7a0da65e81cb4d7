"""`hpa-edge quant-probe`: how well a backbone survives each TFLite quantization, on real stacks.

For a backbone (b0 or lite0, with its weights), converts it several ways and reports the
embedding cosine to the Keras float model (min and mean) on stacks held out from the
calibration stacks, and the LiteRT latency per stack. Variants:
- int8: full integer, uint8 input (the default export);
- int8-worst-K: int8 with the K ops TF's quantization debugger ranks worst (RMSE / scale)
  kept in float;
- int8-float-sigmoid: int8 with every LOGISTIC and MUL op (swish, squeeze-excite) in float;
- int16x8: int16 activations, int8 weights;
- float16, float32.
This is how the B0 table in models/README.md was measured.
"""

from __future__ import annotations

import argparse
import csv
import io
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from agent.model.runtimes import Embedder, load_embedder
from agent.stacks.preprocess import Preprocessing, preprocess
from agent.stacks.stack import find_stacks, read_stack
from export.features.backbones import BackboneSpec, build

VARIANTS = ("int8", "int8-worst-10", "int8-float-sigmoid", "int16x8", "float16", "float32")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stacks", type=Path, required=True, help="folder of real stacks (Kaggle naming)")
    parser.add_argument("--backbone", choices=("b0", "lite0"), default="b0")
    parser.add_argument("--weights", default="random", help="imagenet, random or a file (default random)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--calibration", type=int, default=50, help="stacks to calibrate on (the rest are scored)"
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.asarray((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))


def convert(saved: str, variant: str, calibration: np.ndarray) -> bytes:
    import tensorflow as tf

    def representative() -> Iterable[list[np.ndarray]]:
        for image in calibration:
            yield [image.astype(np.float32)[None]]

    converter = tf.lite.TFLiteConverter.from_saved_model(saved)
    if variant == "float32":
        return bytes(converter.convert())
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        converter.target_spec.supported_types = [tf.float16]
        return bytes(converter.convert())
    converter.representative_dataset = representative
    if variant == "int16x8":
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        ]
        return bytes(converter.convert())
    if variant == "int8":
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.uint8
        return bytes(converter.convert())
    converter.target_spec.supported_ops = [
        tf.lite.OpsSet.TFLITE_BUILTINS_INT8,
        tf.lite.OpsSet.TFLITE_BUILTINS,
    ]
    options: Any
    if variant == "int8-float-sigmoid":
        options = tf.lite.experimental.QuantizationDebugOptions(denylisted_ops=["LOGISTIC", "MUL"])
    elif variant.startswith("int8-worst-"):
        debugger = tf.lite.experimental.QuantizationDebugger(
            converter=converter, debug_dataset=representative
        )
        debugger.run()
        dump = io.StringIO()
        debugger.layer_statistics_dump(dump)
        rows = list(csv.DictReader(io.StringIO(dump.getvalue())))
        worst = sorted(
            rows, key=lambda r: -(float(r["mean_squared_error"] or 0) ** 0.5 / float(r["scale"] or 1))
        )[: int(variant.rsplit("-", 1)[1])]
        options = tf.lite.experimental.QuantizationDebugOptions(
            denylisted_nodes=[r["tensor_name"] for r in worst]
        )
    else:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    selective = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=representative, debug_options=options
    )
    return bytes(selective.get_nondebug_quantized_model())


def latency_ms(embedder: Embedder, image: np.ndarray, runs: int = 10) -> float:
    for _ in range(3):
        embedder(image[None])
    start = time.perf_counter()
    for _ in range(runs):
        embedder(image[None])
    return (time.perf_counter() - start) / runs * 1e3


def run(args: argparse.Namespace) -> int:
    prep = Preprocessing(size=args.size)
    stacks = find_stacks(args.stacks)
    images = np.stack([preprocess(read_stack(s, p).channels, prep) for s, p in sorted(stacks.items())])
    if len(images) <= args.calibration:
        raise SystemExit(
            f"quant-probe: {len(images)} stacks; need more than --calibration {args.calibration}"
        )
    calibration, held = images[: args.calibration], images[args.calibration :]
    model = build(BackboneSpec(args.backbone, args.weights), args.size)
    reference = np.asarray(model(held.astype(np.float32), training=False))
    magnitude = np.abs(reference)
    print(
        f"quant-probe: {args.backbone} ({args.weights}) at {args.size} px; {len(calibration)} calibration, "
        f"{len(held)} scored stacks; float embedding max {magnitude.max():.1f}, "
        f"mean |x| {magnitude.mean():.2f}"
    )
    with tempfile.TemporaryDirectory(prefix="hpa-edge-probe-") as saved:
        model.export(saved, format="tf_saved_model", verbose=False)
        for variant in args.variants.split(","):
            flat = convert(saved, variant.strip(), calibration)
            embedder = load_embedder(flat, 2)
            found = cosines(embedder(held), reference)
            print(
                f"  {variant:<20} cosine min {found.min():.4f} mean {found.mean():.4f}; "
                f"{latency_ms(embedder, held[0]):.2f} ms; {len(flat) / 1e6:.1f} MB"
            )
    return 0
