"""`hpa-edge bench --bundle DIR`: how fast the device pipeline is on this machine, per stage.

Modelled on TFLite's benchmark_model and ONNX Runtime's perf_test: initialisation (bundle
load with its golden check) and the first inference reported apart, warm-up runs excluded,
then per stage (decode, preprocess, embed, classify, commit to the outbox, end to end) min,
max, mean, std, p50, p90, p95, p99; throughput; peak RSS; threads; runtime versions; the
bundle's hash; the machine (CPU, cores, architecture; on a Raspberry Pi the board, governor
and throttling). A JSON summary (`--json`), one CSV row per iteration (`--csv`), a table here.

Extra measurements: `--broker HOST:PORT` adds the publish round trip (publish to receipt by
a subscriber);
`--burst N` drops N stacks at once into a folder watched by the real agent and reports how
fast it drains; `--startup` times `hpa-edge run` from process start to systemd's READY=1.
Runs with the device install only (no TensorFlow). The comparison with the float reference
(Keras + scikit-learn) is the workstation's `hpa-edge compare`, which reuses this loop.
"""

from __future__ import annotations

import argparse
import csv
import importlib.metadata
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.model.bundle import Bundle, load_bundle
from agent.model.pipeline import Pipeline
from agent.service import log
from agent.service.config import ThumbnailsConfig
from agent.service.mqtt_client import Broker, add_broker_arguments, broker_from_args, make_client
from agent.service.recorder import record_of
from agent.service.state import Ledger
from agent.stacks.naming import NamingScheme
from agent.stacks.stack import find_stacks
from agent.tools.bench_agent import LANDING_CASES, burst, cycle, landing, read_text, startup

STAGES = ("decode", "preprocess", "embed", "classify", "thumbnail", "commit", "end_to_end")
PERCENTILES = (50, 90, 95, 99)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, required=True, help="model bundle folder")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--stacks", type=Path, help="folder of stacks (Kaggle naming unless --pattern)")
    source.add_argument("--synthetic", type=int, metavar="N", help="make N synthetic stacks (default 20)")
    parser.add_argument("--size", type=int, default=512, help="synthetic image side (default 512)")
    parser.add_argument("--pattern", help="file-name regular expression for --stacks")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--runs", type=int, help="timed iterations (default 200)")
    length.add_argument("--seconds", type=float, help="time the loop for this long instead")
    parser.add_argument("--warmup", type=int, default=10, help="untimed iterations first (default 10)")
    parser.add_argument("--threads", type=int, default=2, help="embedder threads (default 2)")
    parser.add_argument("--json", type=Path, help="write the summary here")
    parser.add_argument("--csv", type=Path, help="write one row per iteration here")
    add_broker_arguments(parser, default=None)  # --broker: also time publish -> receipt by a subscriber
    parser.add_argument(
        "--burst", type=int, metavar="N", help="also drop N stacks at once into the real agent"
    )
    parser.add_argument("--startup", action="store_true", help="also time hpa-edge run to READY=1")
    parser.add_argument(
        "--landing",
        type=int,
        metavar="N",
        help="also drop N stacks one at a time into a real hpa-edge run (in place, then renamed in) "
        "and time last file complete -> result at an MQTT subscriber (a mosquitto is started "
        "unless --broker)",
    )
    parser.add_argument(
        "--landing-cases",
        nargs="+",
        choices=LANDING_CASES,
        help="as_given (the stacks as they are), tif16_raw, tif16_deflate (the stacks as a "
        "12-bit camera's 16-bit TIFFs at --landing-side); default all three",
    )
    parser.add_argument(
        "--landing-side", type=int, default=2048, help="side of the TIFF cases (default 2048)"
    )
    parser.add_argument("--landing-agent", type=Path, help=argparse.SUPPRESS)  # another checkout's agent


# Pure summaries -------------------------------------------------------------------------
def summarise(values: Sequence[float]) -> dict[str, float]:
    """min, max, mean, std and percentiles of one stage's timings (ms)."""
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        return {}
    out = {
        "n": float(data.size),
        "min": float(data.min()),
        "max": float(data.max()),
        "mean": float(data.mean()),
        "std": float(data.std()),
    }
    for q in PERCENTILES:
        out[f"p{q}"] = float(np.percentile(data, q))
    return {key: round(value, 4) for key, value in out.items()}


def table(stages: Mapping[str, Mapping[str, float]]) -> str:
    header = f"{'stage (ms)':<14}" + "".join(
        f"{h:>9}" for h in ("min", "p50", "p90", "p95", "p99", "max", "mean", "std")
    )
    lines = [header, "-" * len(header)]
    for name, s in stages.items():
        if s:
            cells = "".join(
                f"{s[k]:>9.3f}" for k in ("min", "p50", "p90", "p95", "p99", "max", "mean", "std")
            )
            lines.append(f"{name:<14}{cells}")
    return "\n".join(lines)


# Facts about the machine and the software -----------------------------------------------
def machine_facts() -> dict[str, Any]:
    cpuinfo = read_text("/proc/cpuinfo") or ""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in cpuinfo.splitlines()
            if line.startswith(("model name", "Model"))
        ),
        platform.processor() or "unknown",
    )
    facts: dict[str, Any] = {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "architecture": platform.machine(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "board": read_text("/proc/device-tree/model"),
        "governor": read_text("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor"),
    }
    if shutil.which("vcgencmd"):
        done = subprocess.run(["vcgencmd", "get_throttled"], capture_output=True, text=True)
        facts["throttled"] = done.stdout.strip() or done.stderr.strip()
    return facts


def versions(bundle: Bundle) -> dict[str, str]:
    out = {"embedder_runtime": bundle.embedder.runtime}
    for name in ("ai-edge-litert", "tflite-runtime", "onnxruntime", "numpy", "opencv-python-headless"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def thread_count() -> int:
    status = read_text("/proc/self/status") or ""
    found = [line.split()[1] for line in status.splitlines() if line.startswith("Threads:")]
    return int(found[0]) if found else threading.active_count()


# Stacks ---------------------------------------------------------------------------------
def collect(args: argparse.Namespace, work: Path) -> list[tuple[str, dict[str, Path]]]:
    if args.stacks is not None:
        naming = NamingScheme(pattern=args.pattern) if args.pattern else NamingScheme()
        found = find_stacks(args.stacks, naming)
    else:
        n = args.synthetic or 20
        out = work / "synthetic"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "synth",
                "--out",
                str(out),
                "--n",
                str(n),
                "--seed",
                "2026",
                "--size",
                str(args.size),
                "--quiet",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        found = find_stacks(out)
    complete = [(sid, paths) for sid, paths in sorted(found.items()) if len(paths) == 4]
    if not complete:
        raise SystemExit("bench: no complete stacks found")
    return complete


# The measurements -----------------------------------------------------------------------
class RoundTrip:
    """A publisher and a subscriber on one broker: publish -> receipt, per message."""

    def __init__(self, broker: Broker) -> None:
        self.topic = f"hpa-edge/bench-{os.getpid()}/results"
        self.arrived = threading.Event()
        self.subscribed = threading.Event()
        self.sub = make_client(broker)
        self.sub.on_connect = lambda c, u, f, r, p: c.subscribe(self.topic, qos=1)
        self.sub.on_subscribe = lambda *a: self.subscribed.set()
        self.sub.on_message = lambda c, u, m: self.arrived.set()
        self.pub = make_client(broker)
        for client in (self.sub, self.pub):
            client.connect(broker.host, broker.port, keepalive=broker.keepalive)
            client.loop_start()
        if not self.subscribed.wait(10):
            raise SystemExit(f"bench: no subscription confirmed by {broker.address}")

    def time(self, payload: bytes) -> float:
        self.arrived.clear()
        start = time.perf_counter()
        self.pub.publish(self.topic, payload, qos=1)
        if not self.arrived.wait(10):
            raise SystemExit("bench: a message did not come back within 10 s")
        return (time.perf_counter() - start) * 1e3

    def close(self) -> None:
        for client in (self.pub, self.sub):
            client.disconnect()
            client.loop_stop()


def pipeline_loop(
    args: argparse.Namespace, pipeline: Pipeline, stacks: Sequence[tuple[str, dict[str, Path]]], work: Path
) -> tuple[list[dict[str, Any]], float]:
    """Timed iterations of decode -> ... -> commit; returns per-iteration rows and wall seconds."""
    ledger = Ledger(work / "state.db")
    trip = RoundTrip(broker_from_args(args)) if args.broker else None
    source = cycle(stacks)
    for _ in range(args.warmup):
        stack_id, paths = next(source)
        ledger.record([record_of(pipeline.analyse(stack_id, paths))])
    rows: list[dict[str, Any]] = []
    runs = args.runs or (None if args.seconds else 200)
    deadline = time.perf_counter() + args.seconds if args.seconds else float("inf")
    wall = time.perf_counter()
    while (runs is None or len(rows) < runs) and time.perf_counter() < deadline:
        stack_id, paths = next(source)
        start = time.perf_counter()
        analysis = pipeline.analyse(stack_id, paths)
        committed = time.perf_counter()
        record = record_of(analysis)
        ledger.record([record])
        end = time.perf_counter()
        doc = analysis.document
        if analysis.kind != "result":
            raise SystemExit(f"bench: {stack_id} failed: {doc.get('message')}")
        row = {"iteration": len(rows), "stack": stack_id}
        for stage in ("decode", "preprocess", "embed", "classify"):
            row[stage] = doc[f"{stage}_ms"]
        # 0 for a pipeline that makes no thumbnails (`hpa-edge compare`)
        row["thumbnail"] = doc["thumbnail"]["ms"] if "thumbnail" in doc else 0.0
        row["commit"] = round((end - committed) * 1e3, 4)
        row["end_to_end"] = round((end - start) * 1e3, 4)
        if trip is not None:
            row["publish_rtt"] = round(trip.time(record.messages[0].payload), 4)
        rows.append(row)
    wall = time.perf_counter() - wall
    ledger.close()
    if trip is not None:
        trip.close()
    return rows, wall


def run(args: argparse.Namespace) -> int:
    log.setup("error", stream=sys.stderr)  # the agent inside --burst: only its errors
    with tempfile.TemporaryDirectory(prefix="hpa-edge-bench-") as folder:
        work = Path(folder)
        stacks = collect(args, work)
        start = time.perf_counter()
        bundle = load_bundle(args.bundle, threads=args.threads, release_unread_embedder=True)
        init_s = time.perf_counter() - start
        pipeline = Pipeline(bundle, "bench", thumbnail_size=ThumbnailsConfig.size)  # as the agent
        first_id, first_paths = stacks[0]
        start = time.perf_counter()
        pipeline.analyse(first_id, first_paths)
        first_ms = (time.perf_counter() - start) * 1e3
        rows, wall = pipeline_loop(args, pipeline, stacks, work)
        stage_names = [*STAGES, *(["publish_rtt"] if args.broker else [])]
        summary: dict[str, Any] = {
            "bundle": {
                "path": str(args.bundle),
                "id": bundle.id,
                "sha256": bundle.sha256,
                "purpose": bundle.purpose,
                "input_px": bundle.preprocessing.size,
                "quantization": bundle.manifest["quantization"],
            },
            "machine": machine_facts(),
            "versions": versions(bundle),
            "threads_setting": args.threads,
            "stacks_source": str(args.stacks)
            if args.stacks
            else f"synthetic {len(stacks)} at {args.size} px",
            "distinct_stacks": len(stacks),
            "init_s": round(init_s, 3),
            "first_inference_ms": round(first_ms, 3),
            "warmup": args.warmup,
            "runs": len(rows),
            "stages_ms": {s: summarise([r[s] for r in rows]) for s in stage_names},
            "throughput_stacks_per_s": round(len(rows) / wall, 1),
        }
        if args.burst:
            result = burst(args, bundle, stacks, work)
            result["latency_ms"] = summarise(result.pop("latencies_ms"))
            summary["burst"] = result
        if args.startup:
            summary["startup"] = startup(args, stacks, work)
        if args.landing:
            found = landing(args, stacks, work)
            for result in found["cases"].values():
                result["latency_ms"] = summarise(result.pop("latencies_ms"))
                result["analysis_ms"] = summarise(result.pop("analysis_ms"))
            summary["landing"] = found
        summary["peak_rss_mb"] = peak_rss_mb()
        summary["threads"] = thread_count()
    report(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if args.csv:
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


def report(summary: Mapping[str, Any]) -> None:
    machine, bundle = summary["machine"], summary["bundle"]
    print(
        f"bench: {machine['cpu']} ({machine['cores']} cores, {machine['architecture']})"
        + (f", {machine['board']}" if machine.get("board") else "")
    )
    print(
        f"bundle {bundle['id']} ({bundle['quantization']}, {bundle['input_px']} px, {bundle['purpose']}); "
        f"runtime {summary['versions']['embedder_runtime']}; {summary['threads_setting']} threads"
    )
    print(
        f"init {summary['init_s']:.3f} s; first inference {summary['first_inference_ms']:.1f} ms; "
        f"{summary['runs']} runs after {summary['warmup']} warm-up on {summary['stacks_source']}"
    )
    print(table(summary["stages_ms"]))
    print(
        f"throughput {summary['throughput_stacks_per_s']} stacks/s (one at a time); "
        f"peak RSS {summary['peak_rss_mb']} MB; threads {summary['threads']}"
    )
    if "burst" in summary:
        b = summary["burst"]
        print(
            f"burst: {b['stacks']} stacks dropped in {b['drop_s']} s, drained in {b['drain_s']} s: "
            f"{b['stacks_per_s']} stacks/s, {b['cpu_ms_per_stack']} ms CPU each ({b['failed']} failed)"
        )
    if "startup" in summary:
        s = summary["startup"]
        print(
            f"startup: hpa-edge run to READY=1 in {s['start_to_ready_s']} s, RSS {s['rss_at_ready_mb']} MB; "
            f"RSS after 200 stacks {s['rss_after_200_stacks_mb']} MB "
            f"(peak {s['peak_rss_after_200_stacks_mb']} MB; its own {s['anonymous_after_200_stacks_mb']} MB, "
            f"mapped files {s['files_after_200_stacks_mb']} MB); "
            f"unit environment {s['environment'] or 'none'}"
        )
    if "landing" in summary:
        found = summary["landing"]
        print(
            f"landing: last channel file complete -> result at the subscriber (ms), "
            f"{found['stacks']} stacks one at a time, TIFF cases at {found['side']} px"
        )
        print(f"{'case/mode':<28}{'p50':>9}{'p95':>9}{'min':>9}{'max':>9}{'missed':>8}{'analysis p50':>14}")
        for name, result in found["cases"].items():
            s, analysis = result["latency_ms"], result["analysis_ms"]
            cells = "".join(f"{s[k]:>9.1f}" for k in ("p50", "p95", "min", "max")) if s else " " * 36
            inside = f"{analysis['p50']:>14.1f}" if analysis else ""
            print(f"{name:<28}{cells}{result['missed']:>8}{inside}")
        print(
            "(analysis: the agent's own decode-to-thresholds time, the result's total_ms; "
            "the rest is noticing the files, the commit and the publish)"
        )
