"""`hpa-edge collect-bench`: results per second into the collector's database from a simulated fleet.

Starts a mosquitto of its own on a free loopback port (unless `--broker` names one; it needs
`max_queued_messages 0` or a large value, or the broker drops what it cannot queue), starts
`--collectors N` real `hpa-edge collect` processes sharing one group, and has `--instruments`
simulated instruments publish `--per-instrument` results each at QoS 1 as fast as the broker
takes them (agent.collector.fleet). It reports the publishing rate and the storing rate:
results committed per second from the first publish to the last row (`live`), or, with
`--mode backlog`, from the collectors' start to the last row of a backlog queued while they
were down (the collectors' own speed, without the publishers competing for the CPU). The
database is `--db` (default: a new SQLite file in a temporary folder); its rows are left there.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from agent.collector import fleet
from agent.collector.database import open_database
from agent.collector.schema import migrate
from agent.service.mqtt_client import Broker, add_broker_arguments, broker_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_broker_arguments(parser, default=None)
    parser.add_argument("--db", help="sqlite:///PATH or postgresql://... (default: a new SQLite file)")
    parser.add_argument("--collectors", type=int, default=1, help="collector processes in the group (1)")
    parser.add_argument("--instruments", type=int, default=20, help="simulated instruments (20)")
    parser.add_argument("--per-instrument", type=int, default=500, help="results each publishes (500)")
    parser.add_argument("--mode", choices=("live", "backlog"), default="live", help="see above (live)")
    parser.add_argument("--batch", type=int, default=500, help="the collectors' --batch (500)")
    parser.add_argument("--timeout", type=float, default=600, help="give up after this many seconds (600)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


@dataclass
class Report:
    db: str
    collectors: int
    instruments: int
    results: int
    mode: str
    publish_seconds: float
    publish_rate: float
    store_seconds: float
    store_rate: float
    stored: int
    by_collector: dict[str, int] = field(default_factory=dict)


class _Process:
    """One `hpa-edge collect`; its stderr lines kept, `subscribed` set when it says so."""

    def __init__(self, args: list[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "collect", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self.subscribed = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line.rstrip())
            if "event=subscribed" in line:
                self.subscribed.set()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def _mosquitto(folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    import os
    import socket

    from agent.tools.demo import find_mosquitto, free_port

    binary = find_mosquitto()
    if binary is None:
        raise RuntimeError("mosquitto is not installed (sudo apt-get install -y mosquitto), or give --broker")
    port = free_port()
    conf = folder / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\n"
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    process = subprocess.Popen(
        [binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process, port
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("mosquitto did not start")


def measure(
    broker: Broker,
    db_url: str,
    collectors: int = 1,
    instruments: int = 20,
    per_instrument: int = 500,
    mode: str = "live",
    batch: int = 500,
    timeout: float = 600,
    broker_args: list[str] | None = None,
) -> Report:
    """Run the fleet against `collectors` collector processes; the rates seen."""
    db = open_database(db_url)
    migrate(db)
    seed = time.time_ns()  # new msg_ids on every run, so an old database still counts right
    group = f"bench{seed % 100000}"
    args = [
        "--broker", broker.address, "--db", db_url, "--group", group, "--batch", str(batch),
        "--stats-interval", "3600", *(broker_args or []),
    ]  # fmt: skip
    total = instruments * per_instrument

    def count() -> int:
        _, rows = db.rows("SELECT COUNT(*) FROM results WHERE bundle_id = ? AND received_by LIKE ?",
                          (fleet.BUNDLE["id"], f"{group}-%"))  # fmt: skip
        return int(rows[0][0])

    def start() -> list[_Process]:
        started = [_Process([*args, "--client-id", f"{group}-{i}"]) for i in range(collectors)]
        for p in started:
            if not p.subscribed.wait(30):
                for q in started:
                    q.stop()
                raise RuntimeError("a collector did not subscribe: " + " | ".join(p.lines[-5:]))
        return started

    running = start()
    try:
        if mode == "backlog":
            for p in running:
                p.stop()  # the sessions stay: the broker queues the fleet's results for them
        run = fleet.publish(broker, instruments, per_instrument, seed=seed % 1000003, name=f"s{seed % 1000}-")
        began = time.monotonic() - (run.seconds if mode == "live" else 0)
        if mode == "backlog":
            began = time.monotonic()
            running = start()
        deadline = time.monotonic() + timeout
        stored = count()
        while stored < total and time.monotonic() < deadline:
            time.sleep(0.05)
            stored = count()
        seconds = time.monotonic() - began
    finally:
        for p in running:
            p.stop()
    _, rows = db.rows(
        "SELECT received_by, COUNT(*) FROM results WHERE received_by LIKE ? GROUP BY received_by",
        (f"{group}-%",),
    )
    db.close()
    return Report(
        db=db_url.split("@")[-1],
        collectors=collectors,
        instruments=instruments,
        results=total,
        mode=mode,
        publish_seconds=round(run.seconds, 3),
        publish_rate=round(run.rate, 1),
        store_seconds=round(seconds, 3),
        store_rate=round(stored / seconds, 1) if seconds > 0 else 0.0,
        stored=stored,
        by_collector={str(k): int(v) for k, v in rows},
    )


def _passthrough(args: argparse.Namespace) -> list[str]:
    out = ["--protocol", args.protocol]
    for flag, value in (("--username", args.username), ("--password-file", args.password_file),
                        ("--ca-file", args.ca_file), ("--cert-file", args.cert_file),
                        ("--key-file", args.key_file)):  # fmt: skip
        if value:
            out += [flag, str(value)]
    return out + (["--tls"] if args.tls else [])


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="hpa-edge-collect-bench-") as tmp:
        folder = Path(tmp)
        db_url = args.db or f"sqlite:///{folder / 'bench.db'}"
        own: subprocess.Popen[bytes] | None = None
        try:
            if args.broker:
                broker = broker_from_args(args)
            else:
                own, port = _mosquitto(folder)
                broker = Broker("127.0.0.1", port)
            report = measure(
                broker, db_url, args.collectors, args.instruments, args.per_instrument, args.mode,
                args.batch, args.timeout, _passthrough(args) if args.broker else [],
            )  # fmt: skip
        except (RuntimeError, ValueError) as exc:
            print(f"collect-bench: {exc}", file=sys.stderr)
            return 1
        finally:
            if own is not None:
                own.terminate()
                own.wait(10)
    if args.json:
        print(json.dumps(asdict(report)))
    else:
        print(_text(report))
    return 0 if report.stored == report.results else 1


def _text(r: Report) -> str:
    split = ", ".join(f"{k} {v}" for k, v in sorted(r.by_collector.items()))
    return (
        f"{r.results} results from {r.instruments} instruments, {r.collectors} collector(s), "
        f"{r.mode}, {r.db}\n"
        f"published in {r.publish_seconds:.2f} s ({r.publish_rate:.0f} results/s)\n"
        f"stored {r.stored} in {r.store_seconds:.2f} s ({r.store_rate:.0f} results/s); by collector: {split}"
    )
