"""`python -m agent.tools.memory`: how much memory reading one stack of a given size takes.

Writes a stack of four channels (`--side`, `--bits`, `--format`, `--compression`; or reads
`--stacks DIR`) and measures, each in a fresh process so that nothing else counts:

- `reduced`: the device's reader (`read_reduced`: a channel at a time, as `Pipeline.prepare`
  reads) with the preprocessing of `--bundle` (or `--size`), in `--threads` threads at once
  (2, as the agent's decoders) sharing a decode budget (`--budget`, the agent's; 0 = none);
  its peak RSS above the process's RSS before the stacks, the time of each stack (waits for
  the budget included) and the wall time per stack (the throughput);
- `whole` (`--whole`): the four channels held at once (`read_stack`, then `quality.measure`
  and `preprocess`), as the agent read before, for comparison;
- `agent` (`--agent`, needs `--bundle`): the real agent, `hpa-edge run` as systemd starts it
  (offline: no broker), its RSS at READY=1, idle after `--warmup` small stacks, and its peak
  while `--count` copies of the stack arrive at once (both decode threads busy).

Peaks are the kernel's VmHWM (reset through /proc/PID/clear_refs where allowed). Figures
only: nothing here passes or fails. Linux only. Examples (docs/benchmark.md#memory):

    python -m agent.tools.memory --side 6000 --bits 16 --format tif --bundle models/demo --whole
    python -m agent.tools.memory --side 6000 --bits 16 --bundle models/demo --agent --count 2

It imports nothing above `agent.stacks`: the agent is started as a command, as systemd would.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.stacks.budget import DEFAULT_BUDGET, Budget
from agent.stacks.image import open_channel
from agent.stacks.labels import CHANNELS
from agent.stacks.stack import find_stacks
from agent.tools.bench_agent import agent_config, start_agent, status_kb

MB = 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--side", type=int, default=6000, help="channel width and height (default 6000)")
    parser.add_argument("--bits", type=int, choices=(8, 16), default=16, help="bits per sample (default 16)")
    parser.add_argument("--format", choices=("tif", "png"), default="tif", help="file format (default tif)")
    parser.add_argument(
        "--compression",
        choices=("none", "lzw"),
        default="none",
        help="TIFF compression (default none: the largest files)",
    )
    parser.add_argument("--stacks", type=Path, help="measure the first stack of this folder instead")
    parser.add_argument("--bundle", type=Path, help="take the preprocessing from this bundle")
    parser.add_argument("--size", type=int, default=224, help="model input size without --bundle")
    parser.add_argument("--repeat", type=int, default=3, help="stacks read per measurement (default 3)")
    parser.add_argument(
        "--threads", type=int, default=2, help="reader threads at once, as the agent's decoders (default 2)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=DEFAULT_BUDGET / MB,
        help=f"decode budget of the threads, MB; 0 = none (default {DEFAULT_BUDGET // MB}, the agent's)",
    )
    parser.add_argument("--whole", action="store_true", help="also measure the whole-stack path")
    parser.add_argument("--agent", action="store_true", help="also measure the real agent (needs --bundle)")
    parser.add_argument("--count", type=int, default=2, help="--agent: copies of the stack at once (2)")
    parser.add_argument("--warmup", type=int, default=20, help="--agent: small stacks first (20)")
    parser.add_argument("--json", type=Path, help="write the figures here too")


# Stacks -------------------------------------------------------------------------------
def write_stack(
    folder: Path,
    stack_id: str,
    side: int,
    bits: int = 16,
    fmt: str = "tif",
    compression: str = "none",
    seed: int = 0,
) -> dict[str, Path]:
    """Four channels of a smooth field with noise (a 12-bit camera's range when 16-bit)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    params = [cv2.IMWRITE_TIFF_COMPRESSION, 1 if compression == "none" else 5] if fmt == "tif" else []
    top, floor = (4095.0, 100.0) if bits == 16 else (255.0, 0.0)
    paths = {}
    for channel in CHANNELS:
        coarse = rng.random((max(2, side // 64), max(2, side // 64)), dtype=np.float32)
        field = np.asarray(cv2.resize(coarse, (side, side), interpolation=cv2.INTER_CUBIC), np.float32)
        field = field + rng.normal(0.0, 0.02, (side, side)).astype(np.float32)
        light = np.clip(np.rint(field * np.float32(top - floor) + np.float32(floor)), 0, top)
        del field
        pixels = light.astype(np.uint16 if bits == 16 else np.uint8)
        del light
        path = folder / f"{stack_id}_{channel}.{fmt}"
        if not cv2.imwrite(str(path), pixels, params):
            raise OSError(f"could not write {path}")
        paths[channel] = path
    return paths


def first_stack(folder: Path) -> tuple[str, dict[str, Path]]:
    stacks = {sid: paths for sid, paths in find_stacks(folder).items() if len(paths) == len(CHANNELS)}
    if not stacks:
        raise SystemExit(f"no complete stack in {folder}")
    stack_id = sorted(stacks)[0]
    return stack_id, stacks[stack_id]


# Process memory ---------------------------------------------------------------------
def reset_peak(pid: int | str) -> bool:
    """Set VmHWM back to VmRSS (Linux >= 4.0, own processes); False where not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _child(args: argparse.Namespace) -> int:
    """The measured process: read the stack `--repeat` times one way, print JSON figures."""
    from agent.stacks import quality
    from agent.stacks.preprocess import preprocess
    from agent.stacks.stack import read_reduced, read_stack

    prep = _preprocessing(args)
    stack_id, paths = first_stack(args.stacks)

    budget = Budget(int(args.budget * MB)) if args.budget > 0 and args.child == "reduced" else None

    def once(stack_id: str, paths: dict[str, Path]) -> None:
        if args.child == "reduced":
            read_reduced(stack_id, paths, prep, budget=budget)
        else:
            whole = read_stack(stack_id, paths)
            quality.measure(whole.channels)
            preprocess(whole.channels, prep)

    small = Path(tempfile.mkdtemp(prefix="hpa-edge-memory-"))
    try:  # load the codecs and numpy's machinery on a small stack of the same kind first
        once("warm", write_stack(small, "warm", 64, args.bits, args.format, args.compression))
    finally:
        shutil.rmtree(small)
    reset = reset_peak("self")
    before = status_kb("self", "VmRSS") or 0
    seconds = []

    def timed(_: int) -> None:
        start = time.perf_counter()
        once(stack_id, paths)
        seconds.append(time.perf_counter() - start)

    wall = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.threads) as pool:
        list(pool.map(timed, range(args.repeat * args.threads)))
    wall = (time.perf_counter() - wall) / len(seconds)
    peak = status_kb("self", "VmHWM") or 0
    print(
        json.dumps(
            {
                "path": args.child,
                "threads": args.threads,
                "budget_mb": args.budget if budget else None,
                "most_held_mb": round(budget.most_held / MB, 1)
                if budget and args.child == "reduced"
                else None,
                "rss_before_mb": round(before / 1024, 1),
                "peak_mb": round(peak / 1024, 1),
                "peak_above_before_mb": round((peak - before) / 1024, 1),
                "peak_reset": reset,
                "seconds_min": round(min(seconds), 4),
                "seconds_median": round(statistics.median(seconds), 4),
                "wall_seconds_per_stack": round(wall, 4),
            }
        )
    )
    return 0


def _preprocessing(args: argparse.Namespace) -> Any:
    from agent.stacks.preprocess import Preprocessing

    if args.bundle:
        manifest = json.loads((Path(args.bundle) / "manifest.json").read_text())
        return Preprocessing.from_dict(manifest["preprocessing"])
    return Preprocessing(size=args.size)


def measure_reader(args: argparse.Namespace, folder: Path, path: str) -> dict[str, Any]:
    """Run one reader (`reduced` or `whole`) in a fresh process on the stack in `folder`."""
    command = [sys.executable, "-m", "agent.tools.memory", "--child", path, "--stacks", str(folder)]
    command += ["--repeat", str(args.repeat), "--bits", str(args.bits), "--format", args.format]
    command += ["--threads", str(args.threads), "--budget", str(args.budget)]
    command += ["--bundle", str(args.bundle)] if args.bundle else ["--size", str(args.size)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{path} reader failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# The real agent -----------------------------------------------------------------------
def measure_agent(args: argparse.Namespace, stack: dict[str, Path], work: Path) -> dict[str, Any]:
    """`hpa-edge run` on a watched folder: RSS at READY, idle after small stacks, peak with
    `--count` copies of the stack arriving at once."""
    config = agent_config(work, args.bundle, watch_extra="settle_seconds = 0.5\n")
    incoming = work / "incoming"
    staging = work / "staging"
    staging.mkdir()
    # As systemd starts it, with the unit's environment (MALLOC_ARENA_MAX among it).
    process = start_agent(config, work, ready_within=60)
    try:
        at_ready = status_kb(process.pid, "VmRSS")
        small = [write_stack(staging / "small", f"small{i:03d}", 512, 8, "png", seed=i) for i in range(8)]
        names = []
        for i in range(args.warmup):
            names += _drop(small[i % len(small)], f"warm{i:04d}", staging, incoming)
        _wait_processed(incoming, names, 120)
        time.sleep(2.0)  # settle: the outbox and the ledger have written, the folder is quiet
        idle = status_kb(process.pid, "VmRSS")
        peak_small = status_kb(process.pid, "VmHWM")
        reset = reset_peak(process.pid)
        highest = idle or 0
        names = []
        for i in range(args.count):
            names += _drop(stack, f"big{i:02d}", staging, incoming)
        started = time.perf_counter()
        deadline = started + 600
        while not _processed(incoming, names) and time.perf_counter() < deadline:
            highest = max(highest, status_kb(process.pid, "VmRSS") or 0)
            time.sleep(0.02)
        drained = time.perf_counter() - started
        peak = status_kb(process.pid, "VmHWM") if reset else highest
        outcome = {
            name: ("done" if (incoming / "done" / name).exists() else "failed")
            for name in names
            if name.endswith(("_red.tif", "_red.png"))
        }
    finally:
        process.terminate()
        process.wait(30)
    return {
        "rss_at_ready_mb": _mb(at_ready),
        "idle_rss_mb": _mb(idle),
        "peak_with_small_stacks_mb": _mb(peak_small),
        "peak_mb": _mb(peak),
        "peak_above_idle_mb": _mb((peak or 0) - (idle or 0)),
        "peak_from": "VmHWM" if reset else "VmRSS polled every 20 ms",
        "stacks": args.count,
        "drained_s": round(drained, 2),
        "outcome": outcome,
    }


def _mb(kb: int | None) -> float | None:
    return round(kb / 1024, 1) if kb else None


def _drop(paths: dict[str, Path], stack_id: str, staging: Path, incoming: Path) -> list[str]:
    """Copy a stack under a new id next to the folder, then rename it in (as a complete file)."""
    names = []
    for channel, path in paths.items():
        name = f"{stack_id}_{channel}{path.suffix}"
        staged = staging / name
        try:
            os.link(path, staged)
        except OSError:
            shutil.copyfile(path, staged)
        os.rename(staged, incoming / name)
        names.append(name)
    return names


def _processed(incoming: Path, names: Sequence[str]) -> bool:
    return not any((incoming / name).exists() for name in names)


def _wait_processed(incoming: Path, names: Sequence[str], seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while not _processed(incoming, names) and time.perf_counter() < deadline:
        time.sleep(0.05)


# The command ------------------------------------------------------------------------
def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="hpa-edge-memory-"))
    try:
        if args.stacks:
            stack_id, stack = first_stack(args.stacks)
        else:
            stack_id = "mem"
            stack = write_stack(work / "stack", stack_id, args.side, args.bits, args.format, args.compression)
        folder = stack["red"].parent
        if args.stacks:  # measure just that one stack
            folder = work / "stack"
            folder.mkdir()
            for path in stack.values():
                os.symlink(path.resolve(), folder / path.name)
        with open_channel(stack["red"]) as red:
            header = red.header
        args.bits = header.bits if header.bits == 16 else 8
        args.format = header.format.replace("tiff", "tif")
        report: dict[str, Any] = {
            "stack": {
                "channel": f"{header.width} x {header.height}",
                "dtype": f"uint{args.bits}",
                "files_mb": round(sum(p.stat().st_size for p in stack.values()) / MB, 1),
                "source": str(args.stacks) if args.stacks else f"{args.format} ({args.compression})",
            },
            "reduced": measure_reader(args, folder, "reduced"),
        }
        if args.whole:
            report["whole"] = measure_reader(args, folder, "whole")
        if args.agent:
            if not args.bundle:
                raise SystemExit("--agent needs --bundle")
            report["agent"] = measure_agent(args, {c: p.resolve() for c, p in stack.items()}, work / "agent")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m agent.tools.memory", description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--child", choices=("reduced", "whole"), help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return _child(args)
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
