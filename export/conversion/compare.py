"""`hpa-edge compare`: the device pipeline and the float reference, timed on the same stacks in one run.

The device side is `hpa-edge bench`'s own loop (the bundle's TFLite embedder and ONNX
classifiers, decode to outbox commit), so its figures are the bench's. The float reference
is Keras + scikit-learn from the model folder the bundle was exported from
(`FloatReference`), one stack at a time as the original study's code ran. Both tables are
printed, then the ratio reference / device at p50 for embed, classify and end to end: what
the export bought on this machine. Workstation only (export extra): the device never has
TensorFlow, which is why this is not a `bench` option.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent.model.bundle import Bundle, load_bundle
from agent.model.pipeline import Pipeline
from agent.stacks.preprocess import preprocess
from agent.stacks.stack import read_stack
from agent.tools.bench import STAGES, collect, machine_facts, pipeline_loop, summarise, table, versions
from agent.tools.bench_agent import cycle
from export.conversion.reference_pipeline import FloatReference

REFERENCE_STAGES = ("decode", "preprocess", "embed", "classify", "end_to_end")
RATIO_STAGES = ("embed", "classify", "end_to_end")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    parser.add_argument(
        "--model", type=Path, required=True, help="the model folder 'hpa-edge train' wrote (the float side)"
    )
    parser.add_argument("--weights", help="the backbone weights file, if the model was embedded with one")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--stacks", type=Path, help="folder of stacks (Kaggle naming unless --pattern)")
    source.add_argument("--synthetic", type=int, metavar="N", help="make N synthetic stacks")
    parser.add_argument("--size", type=int, default=512, help="synthetic image side (default 512)")
    parser.add_argument("--pattern", help="file-name regular expression for --stacks")
    parser.add_argument("--runs", type=int, default=200, help="timed device iterations (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed device iterations first (default 10)")
    parser.add_argument(
        "--compare-runs", type=int, default=30, help="float reference iterations (default 30)"
    )
    parser.add_argument("--threads", type=int, default=2, help="device embedder threads (default 2)")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.set_defaults(broker=None, seconds=None)  # the bench loop's options that compare does not offer


def reference_loop(
    reference: FloatReference, stacks: Sequence[tuple[str, dict[str, Path]]], runs: int
) -> list[dict[str, float]]:
    """Per-iteration stage timings (ms) of the float reference, cycling through the stacks."""
    rows = []
    source = cycle(stacks)
    for _ in range(runs):
        stack_id, paths = next(source)
        t0 = time.perf_counter()
        stack = read_stack(stack_id, paths)
        t1 = time.perf_counter()
        image = preprocess(stack.channels, reference.preprocessing)
        t2 = time.perf_counter()
        embedding = reference.embed(image)
        t3 = time.perf_counter()
        reference.classify(embedding)
        t4 = time.perf_counter()
        rows.append(
            {
                "decode": (t1 - t0) * 1e3,
                "preprocess": (t2 - t1) * 1e3,
                "embed": (t3 - t2) * 1e3,
                "classify": (t4 - t3) * 1e3,
                "end_to_end": (t4 - t0) * 1e3,
            }
        )
    return rows


Stages = Mapping[str, Mapping[str, float]]  # stage -> its summary (min, p50, ...)


def ratios(device: Stages, reference: Stages) -> dict[str, float]:
    """reference / device at p50 for embed, classify and end to end: how many times slower floats are."""
    return {s: round(reference[s]["p50"] / device[s]["p50"], 1) for s in RATIO_STAGES}


def mismatch(bundle: Bundle, reference: FloatReference) -> list[str]:
    """What differs between the bundle and the model folder (empty when one was exported from the other)."""
    found = []
    if bundle.manifest["backbone"]["name"] != reference.spec.name:
        found.append(f"backbone {bundle.manifest['backbone']['name']} vs {reference.spec.name}")
    if bundle.preprocessing != reference.preprocessing:
        found.append("preprocessing")
    if bundle.features is not reference.features:
        found.append(f"features {bundle.features.name} vs {reference.features.name}")
    return found


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="hpa-edge-compare-") as folder:
        work = Path(folder)
        stacks = collect(args, work)
        start = time.perf_counter()
        bundle = load_bundle(args.bundle, threads=args.threads)
        device_init_s = time.perf_counter() - start
        rows, _wall = pipeline_loop(args, Pipeline(bundle, "compare"), stacks, work)
        start = time.perf_counter()
        reference = FloatReference(args.model, args.weights)
        reference_init_s = time.perf_counter() - start
        reference_rows = reference_loop(reference, stacks, args.compare_runs)
    device_stages = {s: summarise([r[s] for r in rows]) for s in STAGES}
    reference_stages = {s: summarise([r[s] for r in reference_rows]) for s in REFERENCE_STAGES}
    summary: dict[str, Any] = {
        "bundle": {
            "path": str(args.bundle),
            "id": bundle.id,
            "sha256": bundle.sha256,
            "quantization": bundle.manifest["quantization"],
            "input_px": bundle.preprocessing.size,
        },
        "model": str(args.model),
        "mismatch": mismatch(bundle, reference),
        "machine": machine_facts(),
        "versions": versions(bundle),
        "threads_setting": args.threads,
        "stacks_source": str(args.stacks) if args.stacks else f"synthetic {len(stacks)} at {args.size} px",
        "distinct_stacks": len(stacks),
        "device": {"init_s": round(device_init_s, 3), "runs": len(rows), "stages_ms": device_stages},
        "float_reference": {
            "init_s": round(reference_init_s, 3),
            "runs": len(reference_rows),
            "stages_ms": reference_stages,
        },
        "ratio_p50": ratios(device_stages, reference_stages),
    }
    report(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def report(summary: Mapping[str, Any]) -> None:
    machine, bundle = summary["machine"], summary["bundle"]
    device, reference = summary["device"], summary["float_reference"]
    print(f"compare: {machine['cpu']} ({machine['cores']} cores, {machine['architecture']})")
    if summary["mismatch"]:
        print(
            f"compare: the bundle was not exported from {summary['model']} "
            f"({', '.join(summary['mismatch'])} differ): the two sides run unlike models"
        )
    print(
        f"device: bundle {bundle['id']} ({bundle['quantization']}, {bundle['input_px']} px); runtime "
        f"{summary['versions']['embedder_runtime']}; {summary['threads_setting']} threads; init "
        f"{device['init_s']} s; {device['runs']} runs on {summary['stacks_source']}"
    )
    print(table(device["stages_ms"]))
    print(
        f"float reference (Keras + scikit-learn, one stack at a time; init {reference['init_s']} s; "
        f"{reference['runs']} runs):"
    )
    print(table(reference["stages_ms"]))
    print(
        "ratio reference / device at p50: " + ", ".join(f"{k} {v}x" for k, v in summary["ratio_p50"].items())
    )
