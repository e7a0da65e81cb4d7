"""`hpa-edge demo`: the whole device side in one command, on synthetic stacks.

Starts a broker if none answers on localhost:1883 (mosquitto if installed, else the pure
Python amqtt, MQTT 3.1.1 only, installed on the spot), starts the agent (`hpa-edge run`) on
a fresh acquisition folder with the demo bundle, writes synthetic stacks (`hpa-edge synth`)
and drops them in one by one, and prints each result as an MQTT subscriber receives it, with
the labels the generator painted beside those the model found. Then it stops everything it
started. Exit 0 when every stack gave a result. The workspace (folder, database, agent log)
is kept for a look afterwards.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.service.mqtt_client import Broker, make_client
from agent.stacks.labels import CHANNELS, LOCATIONS
from agent.tools.listen import format_row

REPO_BUNDLE = Path(__file__).resolve().parents[2] / "models" / "demo"
INSTRUMENT = "demo-scope"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=REPO_BUNDLE, help="model bundle (default models/demo)")
    parser.add_argument("--stacks", type=int, default=12, help="synthetic stacks to drop (default 12)")
    parser.add_argument("--size", type=int, default=512, help="synthetic image side in pixels (default 512)")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between stacks (default 0.5)")
    parser.add_argument("--workdir", type=Path, help="workspace folder (default: a new one under /tmp)")
    parser.add_argument(
        "--broker",
        default="auto",
        help="'auto' (localhost:1883 if it answers, else start one), 'mosquitto', 'amqtt', or HOST:PORT",
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds")


def say(text: str) -> None:
    print(f"demo: {text}", flush=True)


def reachable(host: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


def find_mosquitto() -> str | None:
    """Debian puts mosquitto in /usr/sbin, which is not on every user's PATH."""
    for path in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if Path(path).is_file():
            return path
    return shutil.which("mosquitto")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop(process: subprocess.Popen[bytes], seconds: float) -> None:
    """SIGTERM (the agent flushes and says offline), then SIGKILL if it does not end in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


def wait_port(port: int, process: subprocess.Popen[bytes], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the broker exited with code {process.returncode}")
        if reachable("127.0.0.1", port):
            return
        time.sleep(0.1)
    raise RuntimeError("the broker did not start listening")


@contextlib.contextmanager
def broker(choice: str, work: Path) -> Iterator[tuple[str, int, str]]:
    """(host, port, MQTT protocol) of a broker to use; one started here is stopped afterwards."""
    if choice not in ("auto", "mosquitto", "amqtt"):
        host, _, given = choice.rpartition(":")
        say(f"broker: using {host}:{given}")
        yield host, int(given), "5"
        return
    if choice == "auto" and reachable("localhost", 1883):
        say("broker: using the one answering on localhost:1883")
        yield "localhost", 1883, "5"
        return
    port = free_port()
    mosquitto = find_mosquitto()
    log = open(work / "broker.log", "wb")  # noqa: SIM115 - closed below, after the broker stops
    if mosquitto and choice != "amqtt":
        conf = work / "mosquitto.conf"
        user = "user root\n" if os.geteuid() == 0 else ""
        conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{user}")
        process = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        protocol, name = "5", "mosquitto"
    else:
        if shutil.which("amqtt", path=str(Path(sys.executable).parent)) is None:
            say("broker: no mosquitto here; installing amqtt (a Python MQTT 3.1.1 broker)")
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "amqtt"], check=True)
        conf = work / "amqtt.yaml"
        conf.write_text(
            f"listeners:\n  default:\n    type: tcp\n    bind: 127.0.0.1:{port}\n"
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    allow_anonymous: true\n"
        )
        amqtt = str(Path(sys.executable).parent / "amqtt")
        process = subprocess.Popen([amqtt, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        protocol, name = "3.1.1", "amqtt"
    try:
        wait_port(port, process)
        say(f"broker: {name} started on 127.0.0.1:{port} (MQTT {protocol})")
        yield "127.0.0.1", port, protocol
    finally:
        stop(process, 10)
        log.close()
        say(f"broker: {name} stopped")


class Results:
    """An MQTT subscriber that prints each result as it arrives and counts them."""

    def __init__(self, broker: Broker, truth: dict[str, list[str]], total: int) -> None:
        self.truth = truth
        self.total = total
        self.count = 0
        self.compared: list[Comparison] = []
        self.online = threading.Event()
        self.lock = threading.Lock()
        self.client = make_client(broker)
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(f"hpa-edge/{INSTRUMENT}/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=broker.keepalive)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        kind = message.topic.rsplit("/", 1)[-1]
        if kind == "status" and message.payload == b"online":
            self.online.set()
        if kind not in ("results", "errors"):
            return
        with self.lock:
            self.count += 1
            row = format_row(message.topic, message.payload) or ""
            document = json.loads(message.payload)
            painted = self.truth.get(document.get("stack_id", ""), [])
            self.compared.append(compare(document, painted))
            print(
                f"[{self.count:>2}/{self.total}] {row}\n        painted: {', '.join(painted) or '?'}",
                flush=True,
            )

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass(frozen=True)
class Comparison:
    exact: bool  # the label set is the painted one
    main: bool  # the top-scoring location is one of the painted ones
    flagged: bool  # the agent asked for a person to look


def compare(document: dict[str, Any], painted: list[str]) -> Comparison:
    if document.get("kind") != "result":
        return Comparison(False, False, False)
    scores = document.get("scores", {})
    top = max(scores, key=scores.get) if scores else None
    return Comparison(set(document["labels"]) == set(painted), top in painted, bool(document.get("review")))


def summary(compared: list[Comparison]) -> str:
    n = len(compared)
    exact, main, flagged = (sum(getattr(c, key) for c in compared) for key in ("exact", "main", "flagged"))
    return (
        f"against the painted labels: {exact} of {n} label sets exact, {main} of {n} share the main "
        f"(top-scoring) label; {flagged} of {n} flagged for review"
    )


def read_truth(labels_csv: Path) -> dict[str, list[str]]:
    with open(labels_csv, newline="") as handle:
        return {
            row["Id"]: [LOCATIONS[int(i)] for i in row["Target"].split()] for row in csv.DictReader(handle)
        }


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    if not (args.bundle / "manifest.json").is_file():
        say(f"{args.bundle} is not a model bundle (expected models/demo of the repository; use --bundle)")
        return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="hpa-edge-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    incoming, staging = work / "incoming", work / "synthetic"
    incoming.mkdir(exist_ok=True)
    say(f"workspace {work}")
    cli = [sys.executable, "-m", "agent.cli"]
    say(f"writing {args.stacks} synthetic stacks ({args.size} px) with hpa-edge synth")
    subprocess.run(
        [*cli, "synth", "--out", str(staging), "--n", str(args.stacks), "--seed", "2026",
         "--size", str(args.size), "--quiet"],
        check=True,
    )  # fmt: skip
    truth = read_truth(staging / "train.csv")
    with broker(args.broker, work) as (host, port, protocol):
        config = work / "agent.toml"
        config.write_text(
            f'instrument = "{INSTRUMENT}"\n'
            f'[watch]\nfolder = "{incoming}"\n'
            "settle_seconds = 0.5\npoll_interval = 0.2\nrescan_interval = 5.0\n"
            f'[bundle]\npath = "{args.bundle.resolve()}"\n'
            f'[state]\ndatabase = "{work / "state.db"}"\n'
            f'[mqtt]\nhost = "{host}"\nport = {port}\nprotocol = "{protocol}"\n'
            "stats_interval = 5.0\n"  # retained: a dashboard plugged into the demo broker shows counters
            "reconnect_min = 0.5\nreconnect_max = 2.0\n"
        )
        results = Results(Broker(host, port, protocol), truth, len(truth))
        agent_log = open(work / "agent.log", "wb")  # noqa: SIM115 - closed after the agent stops
        env = {k: v for k, v in os.environ.items() if not k.startswith("HPA_EDGE_")}
        agent = subprocess.Popen([*cli, "run", "--config", str(config)], stdout=agent_log,
                                 stderr=subprocess.STDOUT,
                                 env=env)  # fmt: skip
        try:
            if not results.online.wait(60):
                say(f"the agent did not come online; its log: {work / 'agent.log'}:")
                print((work / "agent.log").read_text()[-2000:])
                return 1
            say(f"agent online (bundle {args.bundle}, a demonstration bundle: labels are illustrative)")
            say(f"dropping {len(truth)} stacks into {incoming} (written, then renamed in)")
            for stack_id in truth:
                for channel in CHANNELS:
                    source = staging / f"{stack_id}_{channel}.png"
                    part = incoming / f".{source.name}.part"
                    shutil.copyfile(source, part)
                    os.replace(part, incoming / source.name)
                time.sleep(args.interval)
            deadline = time.monotonic() + args.timeout
            while results.count < len(truth) and time.monotonic() < deadline and agent.poll() is None:
                time.sleep(0.1)
        finally:
            stop(agent, 30)
            agent_log.close()
            results.close()
            say(f"agent stopped (exit {agent.returncode})")
    got, seconds = results.count, time.monotonic() - started
    say(f"{got} of {len(truth)} stacks reported in {seconds:.1f} s; files: {incoming}/done")
    if results.compared:
        say(summary(results.compared))
    return 0 if got == len(truth) and agent.returncode == 0 else 1
