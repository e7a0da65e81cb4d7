"""`hpa-edge verify BUNDLE`: check a model bundle exactly as the agent does before it starts.

Schema version and fields, the sha256 of every file, labels against the models' shapes, and
the golden vectors run with this machine's runtimes. Exit 0 when the bundle is usable, 1 when
it is refused (with the reason), so install scripts can gate on it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from agent.model.bundle import BundleError, load_bundle


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("bundle", type=Path, help="bundle folder (with manifest.json)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the embedder (default 2)")


def run(args: argparse.Namespace) -> int:
    try:
        bundle = load_bundle(args.bundle, threads=args.threads)
    except BundleError as exc:
        print(f"verify: REFUSED {exc}")
        return 1
    manifest, golden = bundle.manifest, bundle.golden
    assert golden is not None
    evaluation = manifest.get("evaluation", {})
    print(f"verify: OK {args.bundle}")
    backbone = manifest["backbone"]
    print(
        f"  purpose {bundle.purpose}; backbone {backbone['name']} ({backbone['weights']}), "
        f"{manifest['quantization']}, input {bundle.preprocessing.size} px; manifest {bundle.sha256[:16]}"
    )
    listed = manifest["files"].items()
    channel_files = [entry for role, entry in listed if role.startswith("golden-")]
    files = ", ".join(
        f"{role} {entry['path']} ({entry['bytes']} B)"
        for role, entry in listed
        if not role.startswith("golden-")
    )
    if channel_files:
        files += f", {len(channel_files)} golden channel files ({sum(e['bytes'] for e in channel_files)} B)"
    print(f"  files: {files}: hashes match")
    print(
        f"  golden: {golden.n} stacks, embedding cosine min {golden.min_cosine:.5f}, "
        f"probability difference max {golden.max_probability_difference:.2e}, "
        f"labels identical: {golden.labels_identical}; runtime {bundle.embedder.runtime}"
    )
    if evaluation:
        print(f"  evaluated macro F1 {evaluation.get('macro_f1')} (95% {evaluation.get('macro_f1_ci95')})")
    if bundle.purpose == "demo":
        print("  WARNING: demonstration bundle (synthetic training data): not for real analyses")
    return 0
