"""The fault suite's parts: the real agent as a process, a de-duplicating consumer, and the
invariants every scenario must end with."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.service.log import parse_line
from agent.stacks.labels import CHANNELS

REPO = Path(__file__).resolve().parent.parent


def wait_until(condition: Any, timeout: float = 60.0, step: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(step)
    return bool(condition())


class AgentProcess:
    """`hpa-edge run` as systemd would run it; its log appended to one file across restarts."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, wait: bool = True) -> AgentProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HPA_EDGE_")}
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.starts += 1
        if wait:
            assert wait_until(lambda: self.events().count("agent_ready") >= self.starts, 60), self.tail()
        return self

    def events(self) -> list[str]:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return [parse_line(line)["event"] for line in text.splitlines() if line.startswith("level=")]

    def lines(self, event: str) -> list[str]:
        return [
            line for line in self.log.read_text(errors="replace").splitlines() if f"event={event} " in line
        ]

    def tail(self, n: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(20)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
                return -9
        return int(self.process.returncode)

    def peak_rss_mb(self) -> float | None:
        assert self.process is not None
        try:
            status = Path(f"/proc/{self.process.pid}/status").read_text()
        except OSError:
            return None
        kb = [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")]
        return kb[0] / 1024 if kb else None


class Consumer:
    """What a dashboard should be: a persistent MQTT 5 session, de-duplicating on msg_id."""

    def __init__(self, port: int, client_id: str = "fault-consumer") -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        self.lock = threading.Lock()
        self.results: dict[str, dict[str, Any]] = {}  # msg_id -> document
        self.errors: dict[str, dict[str, Any]] = {}
        self.deliveries = 0
        self.statuses: list[tuple[bytes, bool]] = []
        self.connected = threading.Event()
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 3600
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.reconnect_delay_set(1, 2)  # the broker keeps the session meanwhile
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10, clean_start=False, properties=properties)
        self.client.loop_start()
        assert self.connected.wait(10)
        time.sleep(0.2)  # the subscription

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        client.subscribe("hpa-edge/+/#", qos=1)
        self.connected.set()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        kind = message.topic.rsplit("/", 1)[-1]
        with self.lock:
            if kind == "status":
                self.statuses.append((bytes(message.payload), bool(message.retain)))
            elif kind in ("results", "errors"):
                self.deliveries += 1
                document = json.loads(message.payload)
                (self.results if kind == "results" else self.errors)[document["msg_id"]] = document

    def result_ids(self) -> dict[str, set[str]]:
        """stack id -> the distinct msg_ids of its results."""
        with self.lock:
            found: dict[str, set[str]] = defaultdict(set)
            for msg_id, document in self.results.items():
                found[document["stack_id"]].add(msg_id)
            return found

    def error_ids(self) -> dict[str, set[str]]:
        with self.lock:
            found: dict[str, set[str]] = defaultdict(set)
            for msg_id, document in self.errors.items():
                found[str(document["stack_id"])].add(msg_id)
            return found

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def stack_files_in(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.is_file() or p.is_symlink()] if folder.is_dir() else []


def check_invariants(
    consumer: Consumer,
    incoming: Path,
    valid: Iterable[str],
    bad: Iterable[str],
    inputs: int,
    agent: AgentProcess | None,
    timeout: float = 90.0,
) -> None:
    """Every valid stack: exactly one result (after de-duplication). Every bad stack: exactly one
    error. Every input file in done/, failed/ or quarantine/. The agent alive and online."""
    valid, bad = sorted(valid), sorted(bad)

    def settled() -> bool:
        results, errors = consumer.result_ids(), consumer.error_ids()
        return all(s in results for s in valid) and all(s in errors for s in bad)

    wait_until(settled, timeout)
    results, errors = consumer.result_ids(), consumer.error_ids()
    missing = [s for s in valid if s not in results]
    assert not missing, f"valid stacks without a result: {missing[:10]}"
    assert all(len(results[s]) == 1 for s in valid), "a stack got two different results"
    assert not set(results) - set(valid), f"unexpected results: {sorted(set(results) - set(valid))[:5]}"
    missing = [s for s in bad if s not in errors]
    assert not missing, f"bad stacks without an error message: {missing}"
    assert all(len(errors[s]) == 1 for s in bad), "a bad stack got two different error messages"
    assert not set(errors) - set(bad), f"unexpected errors: {sorted(set(errors) - set(bad))}"

    def accounted() -> int:
        kept = [p for d in ("done", "failed", "quarantine") for p in stack_files_in(incoming / d)]
        return len([p for p in kept if not p.name.endswith(".error.json")])

    wait_until(lambda: accounted() == inputs, 30)
    left = [p.name for p in stack_files_in(incoming) if any(p.name.endswith(f"_{c}.png") for c in CHANNELS)]
    assert not left, f"files left in the acquisition folder: {left[:10]}"
    assert accounted() == inputs, f"{accounted()} files in done/failed/quarantine for {inputs} dropped"
    if agent is not None:
        assert agent.alive(), agent.tail()
        assert wait_until(lambda: consumer.statuses and consumer.statuses[-1][0] == b"online", 20)
