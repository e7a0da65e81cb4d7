"""Read every stack in a folder and report each as OK or with the reason it would be rejected.

Exit status: 0 when every stack reads, 1 when any is rejected, 2 on bad arguments.
Use it on a sample of a new instrument's files before pointing the agent at the folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.stacks.errors import StackError
from agent.stacks.image import DEFAULT_MAX_PIXELS, Limits
from agent.stacks.naming import KAGGLE_PATTERN, NamingScheme
from agent.stacks.preprocess import auto_bits
from agent.stacks.stack import find_stacks, read_stack


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=Path, help="folder holding the channel files")
    parser.add_argument(
        "--pattern",
        default=KAGGLE_PATTERN,
        help="regular expression with named groups channel and id (or plate/well/site); "
        "default: the Kaggle naming <id>_<red|green|blue|yellow>.<png|tif|tiff>",
    )
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="per channel image")
    parser.add_argument("--json", action="store_true", help="one JSON object per stack instead of text")


def run(args: argparse.Namespace) -> int:
    try:
        naming = NamingScheme(pattern=args.pattern)
    except ValueError as exc:
        print(f"hpa-edge check-stack: --pattern: {exc}")
        return 2
    try:
        stacks = find_stacks(args.folder, naming)
    except StackError as exc:
        print(f"hpa-edge check-stack: {exc}")
        return 2
    limits = Limits(max_pixels=args.max_pixels)
    failures = 0
    for stack_id in sorted(stacks):
        report: dict[str, object] = {"stack_id": stack_id}
        try:
            stack = read_stack(stack_id, stacks[stack_id], limits)
        except StackError as exc:
            failures += 1
            report.update(ok=False, **exc.to_dict())
            text = f"FAIL {stack_id}: {exc}"
        except OSError as exc:  # the machine's, not the stack's (image.PASSING_ERRNOS)
            failures += 1
            report.update(ok=False, code="os_error", message=str(exc), path=str(exc.filename or ""))
            text = f"FAIL {stack_id}: {exc} (not about the stack: check it again) [os_error]"
        else:
            height, width = stack.shape
            bits = 8 if stack.dtype.name == "uint8" else auto_bits(stack.channels.values())
            report.update(ok=True, width=width, height=height, dtype=stack.dtype.name, auto_bits=bits)
            text = f"OK   {stack_id}: {width} x {height} {stack.dtype.name}"
            if bits != 8:
                text += f", brightest pixel fits {bits} bits"
        print(json.dumps(report) if args.json else text)
    if not args.json:
        print(f"{len(stacks) - failures} of {len(stacks)} stacks OK")
    return 1 if failures else 0
