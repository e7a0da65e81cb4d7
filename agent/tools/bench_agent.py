"""The agent under load, for `hpa-edge bench`: a burst through the watched folder, and a real
`hpa-edge run` process from start to READY=1 and its memory after 200 stacks.

Stacks are hard-linked (copied across file systems) under new ids, then renamed into the
folder all at once, as an acquisition burst arrives.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
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
        start, cpu = time.perf_counter(), time.process_time()
        for staged, target in names:
            os.rename(staged, target)
        dropped = time.perf_counter()
        while agent.stats.counts["processed"] + agent.stats.counts["failed"] < args.burst:
            time.sleep(0.01)
            if time.perf_counter() - start > 600:
                raise SystemExit("bench: the burst did not drain within 10 minutes")
        drained, cpu = time.perf_counter(), time.process_time() - cpu
    finally:
        agent.request_stop()
        loop.join(60)
        agent.close(flush_seconds=0)
    return {
        "stacks": args.burst,
        "drop_s": round(dropped - start, 3),
        "drain_s": round(drained - start, 3),
        "stacks_per_s": round(args.burst / (drained - start), 1),
        # CPU time of every thread of this process per stack: what bounds the burst on 2 cores
        "cpu_ms_per_stack": round(cpu / args.burst * 1000, 2),
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


# The systemd unit beside the package (a checkout's; an install has /etc/systemd/system's).
UNIT = Path(__file__).resolve().parents[2] / "systemd" / "hpa-edge.service"


def unit_environment(unit: Path = UNIT) -> dict[str, str]:
    """The unit's Environment= settings, so the agent the bench starts runs as the service does
    (glibc reads MALLOC_* only when a process starts); {} where the unit is not found."""
    found: dict[str, str] = {}
    for line in (read_text(str(unit)) or "").splitlines():
        if line.startswith("Environment="):
            for item in shlex.split(line.removeprefix("Environment=")):
                name, _, value = item.partition("=")
                found[name] = value
    return found


def status_kb(pid: int | str, field: str) -> int | None:
    """A /proc/PID/status figure in kB (VmRSS, VmHWM), or None; `pid` may be "self"."""
    status = read_text(f"/proc/{pid}/status") or ""
    found = [int(line.split()[1]) for line in status.splitlines() if line.startswith(f"{field}:")]
    return found[0] if found else None


def startup(
    args: argparse.Namespace, stacks: Sequence[tuple[str, dict[str, Path]]], work: Path
) -> dict[str, Any]:
    """`hpa-edge run` as systemd starts it: time to READY=1, then its memory after 200 stacks."""
    folder = work / "startup"
    config = agent_config(folder, args.bundle, f"threads = {args.threads}\n")
    incoming = folder / "incoming"
    moves = stage_stacks(stacks, 200, folder / "staging", incoming)
    start = time.perf_counter()
    process = start_agent(config, folder, ready_within=30)
    ready = time.perf_counter() - start
    try:
        at_ready = status_kb(process.pid, "VmRSS")
        for staged, target in moves:
            os.rename(staged, target)
        deadline = time.perf_counter() + 300
        while len(list((incoming / "done").glob("*"))) < len(moves) and time.perf_counter() < deadline:
            time.sleep(0.1)
        peak = status_kb(process.pid, "VmHWM")
        now = status_kb(process.pid, "VmRSS")
        # RSS = the process's own memory (anonymous) + the pages of mapped files it touched:
        # mostly library code, shared and reclaimable, and varying with the page cache's state
        # (69-109 MB on the test machine for the same code, docs/benchmark.md)
        anonymous, files = status_kb(process.pid, "RssAnon"), status_kb(process.pid, "RssFile")
    finally:
        process.terminate()
        process.wait(30)
    return {
        "start_to_ready_s": round(ready, 3),
        "rss_at_ready_mb": round(at_ready / 1024, 1) if at_ready else None,
        "rss_after_200_stacks_mb": round(now / 1024, 1) if now else None,
        "peak_rss_after_200_stacks_mb": round(peak / 1024, 1) if peak else None,
        "anonymous_after_200_stacks_mb": round(anonymous / 1024, 1) if anonymous else None,
        "files_after_200_stacks_mb": round(files / 1024, 1) if files else None,
        "environment": unit_environment(),
    }


# Landing latency: what the user feels ----------------------------------------------------
LANDING_MODES = ("in_place", "renamed_in")
LANDING_CASES = ("as_given", "tif16_raw", "tif16_deflate")
_TIFF_COMPRESSION = {"tif16_raw": 1, "tif16_deflate": 8}  # libtiff: none, Adobe deflate


def camera_stacks(
    stacks: Sequence[tuple[str, dict[str, Path]]], case: str, side: int, out: Path, n: int
) -> list[tuple[str, dict[str, Path]]]:
    """The first `n` stacks as a 12-bit camera in 16-bit TIFF would give them: real 8-bit
    pixels resized to `side` x `side`, times 16 plus random low bits (`case` says the
    compression); `as_given` leaves them as they are."""
    import cv2
    import numpy as np

    if case == "as_given":
        return list(stacks[:n])
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(17)
    made: list[tuple[str, dict[str, Path]]] = []
    for stack_id, paths in stacks[:n]:
        written: dict[str, Path] = {}
        for channel, path in paths.items():
            read: Any = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if read is None:
                raise SystemExit(f"bench: cannot read {path}")
            pixels = np.asarray(read)
            if pixels.ndim == 3:
                pixels = pixels[..., 0]
            if pixels.dtype != np.uint8:
                pixels = (pixels.astype(np.uint16) >> 8).astype(np.uint8)
            pixels = cv2.resize(pixels, (side, side), interpolation=cv2.INTER_LINEAR)
            camera = pixels.astype(np.uint16) * 16 + rng.integers(0, 16, pixels.shape, dtype=np.uint16)
            target = out / f"{stack_id}_{channel}.tif"
            if not cv2.imwrite(str(target), camera, [cv2.IMWRITE_TIFF_COMPRESSION, _TIFF_COMPRESSION[case]]):
                raise SystemExit(f"bench: cannot write {target}")
            written[channel] = target
        made.append((stack_id, written))
    return made


class Subscriber:
    """An MQTT subscriber to the agent's results and errors: when each stack's answer arrived."""

    def __init__(self, broker: Any, prefix: str) -> None:
        import json

        from agent.service.mqtt_client import make_client

        self.arrived: dict[str, float] = {}
        self.analysed_ms: dict[str, float] = {}  # the result's total_ms: decode to thresholds
        self.cond = threading.Condition()
        subscribed = threading.Event()
        topics = [(f"{prefix}/results", 1), (f"{prefix}/errors", 1)]

        def on_message(client: Any, userdata: Any, message: Any) -> None:
            at = time.perf_counter()
            try:
                document = json.loads(message.payload)
                stack_id = str(document.get("stack_id"))
                total = document.get("total_ms")
            except (ValueError, AttributeError):
                return
            with self.cond:
                self.arrived.setdefault(stack_id, at)
                if isinstance(total, (int, float)):
                    self.analysed_ms.setdefault(stack_id, float(total))
                self.cond.notify_all()

        self.client = make_client(broker)
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(topics)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = on_message
        self.client.connect(broker.host, broker.port, keepalive=broker.keepalive)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise SystemExit(f"bench: no subscription confirmed by {broker.address}")

    def wait(self, stack_id: str, seconds: float) -> float | None:
        deadline = time.perf_counter() + seconds
        with self.cond:
            while stack_id not in self.arrived:
                left = deadline - time.perf_counter()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return self.arrived[stack_id]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _write_in_place(source: Path, target: Path) -> None:
    """open, write, close: as a microscope writing straight into the folder."""
    with source.open("rb") as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)


def _agent_process(
    args: argparse.Namespace, broker: Any, folder: Path, prefix: str, source: Path | None
) -> subprocess.Popen[bytes]:
    """`hpa-edge run` with the default watch settings, publishing to `broker`; READY=1 awaited."""
    config = agent_config(
        folder,
        args.bundle,
        f"threads = {args.threads}\n",
        mqtt=f'host = "{broker.host}"\nport = {broker.port}\nprotocol = "{broker.protocol}"\n'
        f'topic_prefix = "{prefix}"\n',
        instrument="landing",
    )
    return start_agent(config, folder, ready_within=60, source=source)


def agent_config(
    folder: Path,
    bundle: Path,
    bundle_extra: str = "",
    *,
    watch_extra: str = "",
    mqtt: str = "port = 9\n",
    instrument: str | None = None,
) -> Path:
    """folder/agent.toml for a measured `hpa-edge run`: watching folder/incoming (made here),
    its state in folder; `mqtt` lines (by default port 9, where no broker listens: results
    wait in the outbox) and extra lines for [watch] and [bundle]."""
    incoming = folder / "incoming"
    incoming.mkdir(parents=True)
    config = folder / "agent.toml"
    head = f'instrument = "{instrument}"\n' if instrument else ""
    config.write_text(
        f'{head}[watch]\nfolder = "{incoming}"\n{watch_extra}'
        f'[bundle]\npath = "{Path(bundle).resolve()}"\n{bundle_extra}'
        f'[state]\ndatabase = "{folder / "state.db"}"\n[mqtt]\n{mqtt}'
    )
    return config


def start_agent(
    config: Path, folder: Path, ready_within: float, source: Path | None = None
) -> subprocess.Popen[bytes]:
    """`hpa-edge run --config CONFIG` as systemd starts it (the unit's Environment=, a notify
    socket in `folder`, output to folder/agent.log), returned once it said READY=1; `source`
    runs another checkout's agent (before/after comparisons)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(folder / "notify"))
    sock.settimeout(ready_within)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPA_EDGE_")}
    env.update(unit_environment())
    env["NOTIFY_SOCKET"] = str(folder / "notify")
    if source is not None:
        env["PYTHONPATH"] = str(source.resolve())
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        env=env,
        cwd=str(source) if source is not None else None,
        stdout=open(folder / "agent.log", "wb"),  # noqa: SIM115 - the child owns it
        stderr=subprocess.STDOUT,
    )
    try:
        while b"READY=1" not in sock.recv(4096):
            pass
    except TimeoutError:
        process.kill()
        raise SystemExit(f"bench: the agent did not become ready; see {folder / 'agent.log'}") from None
    finally:
        sock.close()
    return process


def landing(
    args: argparse.Namespace, stacks: Sequence[tuple[str, dict[str, Path]]], work: Path
) -> dict[str, Any]:
    """From "last channel file complete" to "result received by a subscriber", with the real
    `hpa-edge run`, a real broker and a subscriber, one stack at a time: written in place
    (open, write, close) and written beside the folder then renamed in, for each case."""
    from agent.service.mqtt_client import Broker
    from agent.tools.demo import broker as start_broker

    n = args.landing
    cases = args.landing_cases or list(LANDING_CASES)
    results: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        if args.broker:
            host, port = args.broker.rsplit(":", 1) if ":" in args.broker else (args.broker, "1883")
            address = (host, int(port), args.protocol)
        else:
            address = stack.enter_context(start_broker("mosquitto", work))
        broker = Broker(host=address[0], port=address[1], protocol=address[2])
        for case in cases:
            distinct = camera_stacks(stacks, case, args.landing_side, work / "landing" / case, min(n, 5))
            for mode in LANDING_MODES:
                folder = work / "landing" / f"{case}-{mode}"
                prefix = f"hpa-edge/landing-{os.getpid()}-{case}-{mode}"
                subscriber = Subscriber(broker, prefix)
                process = _agent_process(args, broker, folder, prefix, args.landing_agent)
                try:
                    results[f"{case}/{mode}"] = _drops(distinct, n, mode, folder, subscriber)
                finally:
                    process.terminate()
                    process.wait(30)
                    subscriber.close()
                    shutil.rmtree(folder / "incoming", ignore_errors=True)
    return {"stacks": n, "side": args.landing_side, "cases": results}


def _drops(
    distinct: Sequence[tuple[str, dict[str, Path]]], n: int, mode: str, folder: Path, subscriber: Subscriber
) -> dict[str, Any]:
    incoming = folder / "incoming"
    staging = folder / "staging"
    staging.mkdir()
    latencies: list[float] = []
    analysed: list[float] = []  # of those, the agent's own analysis (decode to thresholds)
    missed = 0
    source = cycle(distinct)
    warmup = 2
    for i in range(-warmup, n):
        _, paths = next(source)
        stack_id = f"landing{i + warmup:05d}"
        names = {c: f"{stack_id}_{c}{p.suffix}" for c, p in paths.items()}
        if mode == "renamed_in":
            for channel, path in paths.items():
                _write_in_place(path, staging / names[channel])
            for channel in paths:
                os.rename(staging / names[channel], incoming / names[channel])
        else:
            for channel, path in paths.items():
                _write_in_place(path, incoming / names[channel])
        complete = time.perf_counter()
        arrived = subscriber.wait(stack_id, 30)
        if arrived is None:
            missed += 1
        elif i >= 0:
            latencies.append((arrived - complete) * 1e3)
            if stack_id in subscriber.analysed_ms:
                analysed.append(subscriber.analysed_ms[stack_id])
        deadline = time.perf_counter() + 5  # the files gone to done/ before the next stack
        while any((incoming / name).exists() for name in names.values()) and time.perf_counter() < deadline:
            time.sleep(0.01)
        for done in (incoming / "done").glob("*"):
            done.unlink()
        time.sleep(0.3)  # one stack at a time: the agent idle again
    return {"latencies_ms": latencies, "analysis_ms": analysed, "missed": missed}
