"""A broker that speaks just enough MQTT 5 to answer a publisher with the reason codes a test picks.

mosquitto never answers "quota exceeded" or "implementation specific error", so the sink's
handling of those codes cannot be shown against it. This server accepts any CONNECT (CONNACK,
success), answers each QoS 1 PUBLISH with a PUBACK whose reason code `answer(topic, payload)`
chooses, answers PINGREQ, and records every PUBLISH it got. Nothing else of MQTT is here: no
subscriptions, no sessions, no retained messages.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

CONNECT, PUBLISH, PINGREQ, DISCONNECT = 1, 3, 12, 14


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes
    qos: int
    code: int | None  # the PUBACK's reason code; None for QoS 0


class FakeBroker:
    def __init__(self, answer: Callable[[str, bytes], int] = lambda topic, payload: 0x00) -> None:
        self.answer = answer
        self.published: list[Publish] = []
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._server.getsockname()[1])
        self._links: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self._accepter = threading.Thread(target=self._accept, name="fake-mqtt5-accept", daemon=True)
        self._accepter.start()

    def payloads(self, topic_end: str) -> list[bytes]:
        with self._lock:
            return [p.payload for p in self.published if p.topic.endswith(topic_end)]

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._server.shutdown(socket.SHUT_RDWR)  # wakes accept(); close() alone does not
        self._server.close()
        with self._lock:
            links, threads = list(self._links), list(self._threads)
        for link in links:
            with contextlib.suppress(OSError):
                link.shutdown(socket.SHUT_RDWR)
        self._accepter.join(5)
        for thread in threads:
            thread.join(5)

    def __enter__(self) -> FakeBroker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # The server ---------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed:
            try:
                link, _ = self._server.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(link,), name="fake-mqtt5-link", daemon=True)
            with self._lock:
                self._links.append(link)
                self._threads.append(thread)
            thread.start()

    def _serve(self, link: socket.socket) -> None:
        with link:
            try:
                while True:
                    kind, flags, body = _read_packet(link)
                    if kind == CONNECT:
                        link.sendall(bytes([0x20, 3, 0, 0x00, 0]))  # no session, success, no properties
                    elif kind == PUBLISH:
                        self._publish(link, flags, body)
                    elif kind == PINGREQ:
                        link.sendall(bytes([0xD0, 0]))
                    elif kind == DISCONNECT:
                        return
            except (OSError, EOFError):
                return

    def _publish(self, link: socket.socket, flags: int, body: bytes) -> None:
        qos = (flags >> 1) & 3
        length = int.from_bytes(body[:2], "big")
        topic = body[2 : 2 + length].decode()
        at = 2 + length
        packet_id = body[at : at + 2] if qos else b""
        at += 2 if qos else 0
        properties, at = _varint(body, at)
        payload = body[at + properties :]
        code = self.answer(topic, payload) if qos else None
        with self._lock:
            self.published.append(Publish(topic, payload, qos, code))
        if qos == 1 and code is not None:
            link.sendall(bytes([0x40, 4]) + packet_id + bytes([code, 0]))  # reason code, no properties


def _read_packet(link: socket.socket) -> tuple[int, int, bytes]:
    first = _read_exactly(link, 1)[0]
    length, shift = 0, 0
    while True:
        byte = _read_exactly(link, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first >> 4, first & 0x0F, _read_exactly(link, length)


def _read_exactly(link: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = link.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at
