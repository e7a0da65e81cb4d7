"""A real mosquitto on a free loopback port, and a subscriber that records what arrives."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.service.mqtt_client import Broker as MqttBroker
from agent.service.mqtt_client import make_client
from agent.tools.demo import find_mosquitto, free_port


def mosquitto_binary() -> str:
    found = find_mosquitto()
    if found is None:
        pytest.skip("mosquitto is not installed (sudo apt-get install -y mosquitto)")
    return found


class Broker:
    """mosquitto with its own config; stop() and start() again on the same port."""

    def __init__(self, folder: Path, extra: str = "", port: int | None = None, persist: bool = False) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.extra = extra
        self.persist = persist  # keep sessions and queued messages across a restart
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.conf = folder / "mosquitto.conf"
        self.log = folder / "mosquitto.log"

    def start(self) -> Broker:
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            + (
                f"persistence true\npersistence_location {self.folder}/\nautosave_interval 1\n"
                if self.persist
                else "persistence false\n"
            )
            + f"log_dest file {self.log}\n"
            + "log_type all\n"
            # as root, mosquitto drops to its own user, who cannot read the test's files
            + ("user root\n" if os.geteuid() == 0 else "")
            + (self.extra or "allow_anonymous true\n")
        )
        self.process = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(
                    f"mosquitto exited: {err} {self.log.read_text() if self.log.exists() else ''}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool


class Subscriber:
    """Records every message on `topic`; `wait_for` polls until a condition holds."""

    def __init__(self, port: int, topic: str = "#") -> None:
        self.messages: list[Received] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self.client = make_client(MqttBroker("127.0.0.1", port))
        self.client.on_connect = lambda c, u, f, r, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise RuntimeError("subscription not confirmed")

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            self.messages.append(Received(message.topic, bytes(message.payload), bool(message.retain)))

    def on(self, suffix: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic.endswith("/" + suffix)]

    def wait_for(self, condition: Callable[[], bool], timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return True
            time.sleep(0.05)
        return condition()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Proxy:
    """A loopback TCP proxy in front of a broker: the agent's "broker" can come and go
    (start/stop) while the test's subscriber stays connected to the real one, and
    `freeze()` makes the link go silent without closing it (what keepalive must detect)."""

    def __init__(self, target_port: int, port: int | None = None) -> None:
        self.target_port = target_port
        self.port = port or free_port()
        self._links: list[threading.Event] = []  # one "frozen" flag per forwarded connection
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()

    def start(self) -> Proxy:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(8)
        self._listener = listener
        self._spawn(self._accept, listener)
        return self

    def _spawn(self, target: Callable[..., None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            frozen = threading.Event()
            with self._lock:
                self._sockets += [client, upstream]
                self._links.append(frozen)
            self._spawn(self._pipe, client, upstream, frozen)
            self._spawn(self._pipe, upstream, client, frozen)

    def _pipe(self, source: socket.socket, sink: socket.socket, frozen: threading.Event) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                break
            while frozen.is_set():
                if self._listener is None:
                    return
                time.sleep(0.05)  # hold the bytes: the link is open but silent
            try:
                sink.sendall(data)
            except OSError:
                return
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def freeze(self) -> None:
        """The connections open now go silent (no bytes either way) but stay open; new ones work."""
        with self._lock:
            for frozen in self._links:
                frozen.set()

    def stop(self) -> None:
        """Close the listener and every forwarded connection (the broker "goes away")."""
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() in the other thread
            self._listener.close()
            self._listener = None
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()
        for thread in self._threads:
            thread.join(5)
        self._threads.clear()


def retained(port: int, topic: str) -> Received:
    """The one retained message on `topic`, as a subscriber that joins now receives it."""
    late = Subscriber(port, topic)
    try:
        assert late.wait_for(lambda: len(late.messages) == 1)
        return late.messages[0]
    finally:
        late.close()


def make_certificates(folder: Path) -> dict[str, Path]:
    """A throwaway CA, a server certificate for localhost and a client certificate."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-days", "2", "-subj", "/CN=hpa-edge test CA")  # fmt: skip
    (folder / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={'localhost' if name == 'server' else 'hpa-edge-scope'}")  # fmt: skip
        extra = ["-extfile", "server.ext"] if name == "server" else []
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", *extra)  # fmt: skip
    return {
        name: folder / name for name in ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
    }


def tls_broker(tmp_path: Path) -> tuple[Broker, int, dict[str, Path]]:
    """mosquitto with a plain listener and a TLS one that requires a client certificate.

    Returns the broker, the TLS port and the certificates (made by openssl for this test).
    """
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    certs = make_certificates(tmp_path / "certs")
    tls_port = free_port()
    extra = (
        "allow_anonymous true\n"
        f"listener {tls_port} 127.0.0.1\n"
        f"cafile {certs['ca.pem']}\ncertfile {certs['server.pem']}\nkeyfile {certs['server.key']}\n"
        "require_certificate true\n"
    )
    return Broker(tmp_path / "broker", extra=extra).start(), tls_port, certs
