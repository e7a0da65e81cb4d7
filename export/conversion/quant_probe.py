"""`hpa-edge quant-probe`: how well a backbone survives each TFLite quantization, on real stacks.

For a backbone (b0 or lite0, with its weights), converts it several ways and reports the
embedding cosine to the Keras float model (min and mean) on stacks held out from the
calibration stacks, and the LiteRT latency per stack. Variants:
- int8: full integer, uint8 input (the default export);
- int8-worst-K: int8 with the K ops TF's quantization debugger ranks worst (RMSE / scale)
  kept in float;
- int8-float-sigmoid: int8 with every LOGISTIC and MUL op (swish, squeeze-excite) in float;
- int16x8: int16 activations, int8 weights;
- float16, float32 (and int8-float-stem, an export option).
This is how the B0 table in models/README.md was measured. The conversions are those of
`export.conversion.convert` (the export's own), so what is measured here is what would ship.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from agent.model.runtimes import Embedder, load_embedder
from agent.model.similarity import cosine
from agent.stacks.preprocess import Preprocessing, preprocess
from agent.stacks.stack import find_stacks, read_stack
from export.conversion.convert import check_variant, saved_model, saved_model_to_tflite
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


def latency_ms(embedder: Embedder, image: np.ndarray, runs: int = 10) -> float:
    for _ in range(3):
        embedder(image[None])
    start = time.perf_counter()
    for _ in range(runs):
        embedder(image[None])
    return (time.perf_counter() - start) / runs * 1e3


def run(args: argparse.Namespace) -> int:
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    try:
        for variant in variants:
            check_variant(variant)
    except ValueError as exc:
        raise SystemExit(f"quant-probe: {exc}") from None
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
    with saved_model(model) as saved:
        for variant in variants:
            flat = saved_model_to_tflite(saved, variant, calibration)
            embedder = load_embedder(flat, 2)
            found = cosine(embedder(held), reference)
            print(
                f"  {variant:<20} cosine min {found.min():.4f} mean {found.mean():.4f}; "
                f"{latency_ms(embedder, held[0]):.2f} ms; {len(flat) / 1e6:.1f} MB"
            )
    return 0
