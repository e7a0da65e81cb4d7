"""`hpa-edge predict --bundle DIR PATH...`: one-shot inference, no broker, no state.

PATHs are channel files or folders holding them; files are grouped into stacks by the
naming scheme (Kaggle's by default). Prints one JSON result per stack on stdout (the same
document the agent publishes), and one line per stack that cannot be analysed on stderr.
Exit 0 when every stack gave a result, 1 when any failed, 2 when the bundle is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from agent.model.bundle import BundleError, load_bundle
from agent.model.messages import encode
from agent.model.pipeline import Pipeline
from agent.stacks.naming import KAGGLE_PATTERN, NamingScheme


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", type=Path, nargs="+", metavar="PATH", help="channel files or folders")
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    parser.add_argument(
        "--pattern", default=KAGGLE_PATTERN, help="file-name regular expression (see docs/stacks.md)"
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for the embedder (default 2)")
    parser.add_argument("--instrument", default="predict", help="instrument name put in the results")


def collect(paths: list[Path], naming: NamingScheme) -> tuple[dict[str, dict[str, Path]], list[str]]:
    """{stack id: {channel: path}} from files and folders, plus the paths that name no channel."""
    files: list[Path] = []
    for path in paths:
        files.extend(sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path])
    stacks: dict[str, dict[str, Path]] = {}
    unmatched = []
    for file in files:
        parsed = naming.parse(file.name)
        if parsed is None:
            unmatched.append(str(file))
            continue
        stacks.setdefault(parsed.stack_id, {}).setdefault(parsed.channel, file)
    return stacks, unmatched


def run(args: argparse.Namespace) -> int:
    try:
        naming = NamingScheme(pattern=args.pattern)
    except ValueError as exc:
        print(f"predict: --pattern: {exc}", file=sys.stderr)
        return 2
    try:
        bundle = load_bundle(args.bundle, threads=args.threads, release_unread_embedder=True)
    except BundleError as exc:
        print(f"predict: bundle refused: {exc}", file=sys.stderr)
        return 2
    stacks, unmatched = collect(args.paths, naming)
    for path in unmatched:
        if not Path(path).name.startswith("."):
            print(f"predict: {path}: not a channel file of the naming scheme; skipped", file=sys.stderr)
    pipeline = Pipeline(bundle, args.instrument)
    failures = 0
    for stack_id, paths in sorted(stacks.items()):
        try:
            outcome = pipeline.analyse(stack_id, paths)  # a stack lacking a channel fails as missing_channel
        except OSError as exc:  # the machine's, not the stack's (image.PASSING_ERRNOS): said, and on
            failures += 1
            message = f"{exc}; not about the stack: run it again"
            print(json.dumps({"stack_id": stack_id, "code": "os_error", "message": message}), file=sys.stderr)
            continue
        if outcome.kind == "result":
            sys.stdout.write(encode(outcome.document).decode() + "\n")
        else:
            failures += 1
            document = outcome.document
            print(
                json.dumps({"stack_id": stack_id, "code": document["code"], "message": document["message"]}),
                file=sys.stderr,
            )
    sys.stdout.flush()
    return 1 if failures or not stacks else 0
