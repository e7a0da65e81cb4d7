"""The agent under load, for `hpa-edge bench`: a burst through the watched folder, and a real
`hpa-edge run` process from start to READY=1 and its memory after 200 stacks.

Stacks are hard-linked (copied across file systems) under new ids, then renamed into the
folder all at once, as an acquisition burst arrives.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from agent.model.bundle import Bundle


def cycle(stacks: Sequence[tuple[str, dict[str, Path]]]) -> Iterator[tuple[str, dict[str, Path]]]:
    while True:
        yield from stacks


def read_text(path: str) -> str | None:
    """A small /proc or /sys file, or None where it does not exist (another OS, a container)."""
    try:
        return Path(path).read_text(errors="replace").strip("\0\n ")
    except OSError:
        return None


def burst(
    args: argparse.Namespace, bundle: Bundle, stacks: Sequence[tuple[str, dict[str, Path]]], work: Path
) -> dict[str, Any]:
    """N stacks renamed into a watched folder at once; time until the agent has committed them all."""
    from agent.service.agent import Agent
    from agent.service.config import Config, FilesConfig, MqttConfig, StateConfig, WatchConfig
    from agent.service.mqtt_client import broker_from_args

    incoming = work / "burst" / "incoming"
    incoming.mkdir(parents=True)
    names = stage_stacks(stacks, args.burst, work / "burst" / "staging", incoming)
    if args.broker:
        broker = broker_from_args(args)
        mqtt = MqttConfig(
            host=broker.host,
            port=broker.port,
            protocol=broker.protocol,
            username=broker.username,
            password_file=args.password_file or Path(""),
            tls=broker.tls,
            ca_file=broker.ca_file or Path(""),
            cert_file=broker.cert_file or Path(""),
            key_file=broker.key_file or Path(""),
            stats_interval=0.0,
        )
    else:  # nobody listens: results wait in the outbox, as during an outage
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            closed = probe.getsockname()[1]
        mqtt = MqttConfig(
            host="127.0.0.1", port=closed, stats_interval=0.0, reconnect_min=5.0, reconnect_max=30.0
        )
    config = Config(
        instrument="bench",
        watch=WatchConfig(folder=incoming, settle_seconds=0.5, poll_interval=0.1),
        files=FilesConfig(),
        state=StateConfig(database=work / "burst" / "state.db"),
        mqtt=mqtt,
    )
    agent = Agent(config, bundle=bundle)
    agent.start()
    loop = threading.Thread(target=agent.run, name="bench-agent")
    loop.start()
    try:
        start = time.perf_counter()
        for staged, target in names:
            os.rename(staged, target)
        dropped = time.perf_counter()
        while agent.stats.counts["processed"] + agent.stats.counts["failed"] < args.burst:
            time.sleep(0.01)
            if time.perf_counter() - start > 600:
                raise SystemExit("bench: the burst did not drain within 10 minutes")
        drained = time.perf_counter()
    finally:
        agent.request_stop()
        loop.join(60)
        agent.close(flush_seconds=0)
    return {
        "stacks": args.burst,
        "drop_s": round(dropped - start, 3),
        "drain_s": round(drained - start, 3),
        "stacks_per_s": round(args.burst / (drained - start), 1),
        "failed": agent.stats.counts["failed"],
        "latencies_ms": agent.stats.compute_latencies(),
    }


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows one (no bytes copied), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def stage_stacks(
    stacks: Sequence[tuple[str, dict[str, Path]]], n: int, staging: Path, target: Path
) -> list[tuple[Path, Path]]:
    """n stacks (cycling through `stacks`, new ids) linked into `staging`, with where each file goes."""
    staging.mkdir(parents=True, exist_ok=True)
    moves: list[tuple[Path, Path]] = []
    source = cycle(stacks)
    for i in range(n):
        _, paths = next(source)
        for channel, path in paths.items():
            staged = staging / f"burst{i:05d}_{channel}{path.suffix}"
            link_or_copy(path, staged)
            moves.append((staged, target / staged.name))
    return moves


def _status_kb(pid: int, field: str) -> int | None:
    status = read_text(f"/proc/{pid}/status") or ""
    found = [int(line.split()[1]) for line in status.splitlines() if line.startswith(f"{field}:")]
    return found[0] if found else None


def startup(
    args: argparse.Namespace, stacks: Sequence[tuple[str, dict[str, Path]]], work: Path
) -> dict[str, Any]:
    """`hpa-edge run` as systemd starts it: time to READY=1, then its memory after 200 stacks."""
    folder = work / "startup"
    incoming = folder / "incoming"
    incoming.mkdir(parents=True)
    config = folder / "agent.toml"
    config.write_text(
        f'[watch]\nfolder = "{incoming}"\n[bundle]\npath = "{args.bundle.resolve()}"\n'
        f'threads = {args.threads}\n[state]\ndatabase = "{folder / "state.db"}"\n[mqtt]\nport = 9\n'
    )
    moves = stage_stacks(stacks, 200, folder / "staging", incoming)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(folder / "notify"))
    sock.settimeout(30)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPA_EDGE_")}
    env["NOTIFY_SOCKET"] = str(folder / "notify")
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while b"READY=1" not in sock.recv(4096):
            pass
        ready = time.perf_counter() - start
        at_ready = _status_kb(process.pid, "VmRSS")
        for staged, target in moves:
            os.rename(staged, target)
        deadline = time.perf_counter() + 300
        while len(list((incoming / "done").glob("*"))) < len(moves) and time.perf_counter() < deadline:
            time.sleep(0.1)
        peak = _status_kb(process.pid, "VmHWM")
    finally:
        process.terminate()
        process.wait(30)
        sock.close()
    return {
        "start_to_ready_s": round(ready, 3),
        "rss_at_ready_mb": round(at_ready / 1024, 1) if at_ready else None,
        "peak_rss_after_200_stacks_mb": round(peak / 1024, 1) if peak else None,
    }
