"""systemd's notify protocol against a real datagram socket: READY, watchdog pings, STOPPING."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.service.notify import Notifier, Watchdog


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket; records every message with its time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def with_line(self, line: str) -> list[float]:
        return [t for t, text in list(self.messages) if line in text.splitlines()]

    def wait_for(self, line: str, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.with_line(line):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listening = NotifySocket(tmp_path / "notify")
    yield listening
    listening.close()


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier(environ={})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog_interval is None


def test_ready_reaches_the_socket(notify_socket: NotifySocket) -> None:
    notifier = Notifier(environ={"NOTIFY_SOCKET": str(notify_socket.path)})
    assert notifier.ready("processed 0")
    assert notify_socket.wait_for("READY=1", 5)
    assert any("STATUS=processed 0" in text for _, text in notify_socket.messages)


def test_an_abstract_socket_address_is_understood() -> None:
    name = f"hpa-edge-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert Notifier(environ={"NOTIFY_SOCKET": "@" + name}).send("READY=1")
        assert sock.recv(100) == b"READY=1"


def test_the_watchdog_interval_comes_from_watchdog_usec_for_this_process_only() -> None:
    assert Notifier(environ={"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000"}).watchdog_interval == 2.0
    other = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid() + 1)}
    assert Notifier(environ=other).watchdog_interval is None


def test_the_watchdog_pings_only_while_alive(notify_socket: NotifySocket) -> None:
    alive = threading.Event()
    alive.set()
    notifier = Notifier(environ={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "400000"})
    dog = Watchdog(notifier, alive.is_set, lambda: "ok")
    dog.start()
    try:
        assert notify_socket.wait_for("WATCHDOG=1", 5)
        alive.clear()
        time.sleep(0.15)  # a ping may be on its way
        count = len(notify_socket.with_line("WATCHDOG=1"))
        time.sleep(0.6)
        assert len(notify_socket.with_line("WATCHDOG=1")) == count
        alive.set()
        assert notify_socket.wait_for("WATCHDOG=1", 5)
        time.sleep(0.3)
        assert len(notify_socket.with_line("WATCHDOG=1")) > count
    finally:
        dog.stop()
    assert not dog.is_alive()


@pytest.mark.integration
def test_the_agent_process_reports_ready_after_start_pings_and_says_stopping(
    tmp_path: Path, notify_socket: NotifySocket, broker
) -> None:
    from tests.agent_harness import write_config

    config = write_config(tmp_path, broker.port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPA_EDGE_")}
    env.update({"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "1000000"})
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        cwd=Path(__file__).resolve().parent.parent, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert notify_socket.wait_for("READY=1"), process.stdout
        ready_at = notify_socket.with_line("READY=1")[0]
        assert notify_socket.wait_for("WATCHDOG=1", 5)
        time.sleep(1.2)
        pings = notify_socket.with_line("WATCHDOG=1")
        assert len(pings) >= 3  # every 0.25 s while idle and healthy
        assert all(t > ready_at for t in pings)
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        output = process.communicate()[0]
    assert notify_socket.with_line("STOPPING=1")
    # READY came only after the bundle check, database and watcher: after the agent_ready log line
    assert "event=agent_ready" in output
    print(f"start to READY=1: {ready_at - started:.2f} s")


@pytest.mark.integration
def test_a_hung_worker_stops_the_watchdog_pings(
    tmp_path: Path, notify_socket: NotifySocket, broker, demo_bundle, stack_source
):
    """The embedder is made to hang on one stack (the one stand-in in this test); the pings must stop."""
    from agent.service.agent import Agent
    from tests.agent_harness import config_for, drop, stack_files

    release = threading.Event()
    entered = threading.Event()
    real_classifier = demo_bundle.classifier  # every stack's inference calls it

    class HangingClassifier:
        def __getattr__(self, name: str) -> object:
            return getattr(real_classifier, name)

        def __call__(self, vectors: np.ndarray) -> np.ndarray:
            entered.set()
            release.wait(30)
            return real_classifier(vectors)

    config = config_for(tmp_path, broker.port)
    notifier = Notifier(environ={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "800000"})
    agent = Agent(config, bundle=demo_bundle, notifier=notifier)
    agent.start()
    loop = threading.Thread(target=agent.run)
    loop.start()
    try:
        assert notify_socket.wait_for("WATCHDOG=1", 5)
        demo_bundle.classifier = HangingClassifier()
        drop(stack_files(stack_source, 50), config.watch.folder, "hang")
        assert entered.wait(20)
        time.sleep(0.6)  # the loop's last turn is now older than half the interval
        count = len(notify_socket.with_line("WATCHDOG=1"))
        time.sleep(1.0)
        assert len(notify_socket.with_line("WATCHDOG=1")) == count, "pings went on while the worker hung"
        release.set()
        assert notify_socket.wait_for("WATCHDOG=1", 5)
        time.sleep(0.5)
        assert len(notify_socket.with_line("WATCHDOG=1")) > count
    finally:
        release.set()
        demo_bundle.classifier = real_classifier
        agent.request_stop()
        loop.join(20)
        agent.close(flush_seconds=1)
