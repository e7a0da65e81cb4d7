"""`hpa-edge dashboard`: a live web page of every instrument, and Prometheus metrics.

A small web server (the standard library's http.server), on 127.0.0.1:8088 by default. It
subscribes to the broker with the agent's own MQTT client code (`--tls`, `--ca-file`,
`--cert-file`, `--key-file`, `--username`, `--password-file`, `--protocol`, as
`hpa-edge listen`) and pushes what arrives to the browser as Server-Sent Events (`/events`):
each instrument's status (online, degraded, offline), its latest result with the confident
and the near-threshold labels and the review flag, its latest picture when one arrives on
`<prefix>/thumbnail` (raw PNG or JPEG bytes), a table of recent results (each `msg_id` once)
and the errors. It reconnects to the broker by itself (1 s to 30 s apart), and the page to
it (the browser's EventSource), so both survive restarts.

`/metrics` serves the same in Prometheus' text format: counters of results and errors (by
code and where the files went), the agent's own counters and gauges from its stats messages
(outbox depth, inflight, waiting stacks), connected and degraded from the status topic, and
histograms of the stage latencies from the results' timings. `/state` is the page's data as
JSON. The page's HTML, CSS and JavaScript are in `dashboard_page/` beside this module: no
third-party script, nothing fetched from anywhere else.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import ipaddress
import json
import queue
import signal
import socket
import sys
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from agent.service.mqtt_client import Broker, add_broker_arguments, broker_from_args, make_client

DEFAULT_PORT = 8088
DEFAULT_TOPIC = "hpa-edge/+/#"
KINDS = ("results", "latest", "errors", "status", "stats", "thumbnail")  # review is a copy of results
STATUSES = ("online", "degraded", "offline")
STAGES = ("decode", "preprocess", "embed", "classify", "total")  # <stage>_ms in every result
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds
STATS_COUNTERS = ("processed", "failed", "quarantined", "duplicates")
STATS_GAUGES = {
    "outbox_pending": "messages waiting in the agent's outbox",
    "outbox_rejected": "messages the broker refused for good, kept in the outbox",
    "inflight": "messages sent and not yet acknowledged by the broker",
    "waiting_stacks": "stacks in the acquisition folder not yet answered",
}
MAX_THUMBNAIL = 2 * 1024 * 1024
REMEMBERED = 20_000  # msg_ids kept for de-duplication
KEEPALIVE = 15.0  # seconds between SSE comments on a quiet stream
PAGE = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_broker_arguments(parser)
    parser.add_argument(
        "--topic",
        action="append",
        help=f"subscription, repeatable (default {DEFAULT_TOPIC}; for a custom mqtt.topic_prefix "
        "subscribe to PREFIX/#)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free)"
    )
    parser.add_argument("--history", type=int, default=200, help="results and errors shown (default 200)")
    parser.add_argument("--verbose", action="store_true", help="log every web request to stderr")


# What arrived ---------------------------------------------------------------------------------
class Histogram:
    """Cumulative bucket counts, sum and count, as Prometheus keeps them."""

    def __init__(self) -> None:
        self.buckets = [0] * len(BUCKETS)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                self.buckets[i] += 1
        self.sum += value
        self.count += 1


@dataclass
class Instrument:
    """One topic prefix (`hpa-edge/<instrument>`): what the page and /metrics show of it."""

    key: str
    name: str
    status: str = "unknown"
    status_time: float | None = None
    stats: dict[str, Any] | None = None
    stats_time: float | None = None
    latest: dict[str, Any] | None = None
    thumbnail: bytes | None = None
    thumbnail_type: str = ""
    thumbnail_sha: str = ""
    thumbnail_time: float | None = None
    results: int = 0
    review: int = 0
    errors: Counter[tuple[str, str]] = field(default_factory=Counter)
    stages: dict[str, Histogram] = field(default_factory=dict)

    def view(self) -> dict[str, Any]:
        stats = self.stats or {}
        thumbnail = None
        if self.thumbnail is not None:
            thumbnail = {
                "url": f"thumbnail?i={quote(self.key, safe='')}&v={self.thumbnail_sha}",
                "type": self.thumbnail_type,
                "bytes": len(self.thumbnail),
                "received": self.thumbnail_time,
            }
        return {
            "key": self.key,
            "name": self.name,
            "status": self.status,
            "status_received": self.status_time,
            "degraded": stats.get("degraded") if self.status != "offline" else None,
            "stats": {k: v for k, v in stats.items() if k not in ("schema_version", "kind", "instrument")}
            if self.stats is not None
            else None,
            "stats_received": self.stats_time,
            "latest": self.latest,
            "thumbnail": thumbnail,
        }


def result_row(key: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
    """What the page shows of a result: labels split into confident and near-threshold ones."""
    labels = [str(label) for label in _list(doc.get("labels"))]
    near = [str(label) for label in _list(doc.get("near_threshold"))]
    raw = doc.get("scores")
    scores: dict[Any, Any] = raw if isinstance(raw, dict) else {}
    numeric = {str(k): float(v) for k, v in scores.items() if isinstance(v, int | float)}
    top = max(numeric.items(), key=lambda kv: kv[1]) if numeric else None
    shown = labels + [label for label in near if label not in labels]
    return {
        "msg_id": doc["msg_id"],
        "key": key,
        "instrument": name,
        "stack_id": str(doc.get("stack_id", "")),
        "time": str(doc.get("time", "")),
        "confident": [label for label in labels if label not in near],
        "uncertain": [label for label in labels if label in near],
        "near_miss": [label for label in near if label not in labels],
        "scores": {label: numeric[label] for label in shown if label in numeric},
        "top": list(top) if top else None,
        "review": bool(doc.get("review", False)),
        "review_reasons": [str(reason) for reason in _list(doc.get("review_reasons"))],
        "total_ms": doc.get("total_ms") if isinstance(doc.get("total_ms"), int | float) else None,
        "purpose": str(doc.get("purpose", "")),
        "bundle_id": str(doc.get("bundle_id", "")),
    }


def error_row(key: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "msg_id": doc["msg_id"],
        "key": key,
        "instrument": name,
        "stack_id": "" if doc.get("stack_id") is None else str(doc.get("stack_id")),
        "time": str(doc.get("time", "")),
        "code": str(doc.get("code", "")),
        "message": str(doc.get("message", "")),
        "moved_to": str(doc.get("moved_to", "")),
    }


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def image_type(payload: bytes) -> str | None:
    """image/png or image/jpeg from the bytes themselves; None for anything else."""
    if payload.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if payload.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    return None


class Client:
    """One browser's event stream: a bounded queue; a client that falls behind is dropped."""

    def __init__(self) -> None:
        self.queue: queue.Queue[bytes | None] = queue.Queue(maxsize=2000)
        self.dropped = False


class State:
    """Everything the dashboard received, under one lock; every change goes to the streams."""

    def __init__(self, history: int = 200, address: str = "") -> None:
        self.history = history
        self.address = address
        self.instruments: dict[str, Instrument] = {}
        self.results: deque[dict[str, Any]] = deque(maxlen=history)
        self.errors: deque[dict[str, Any]] = deque(maxlen=history)
        self._shown: OrderedDict[str, None] = OrderedDict()  # msg_ids in the tables
        self._counted: OrderedDict[str, None] = OrderedDict()  # msg_ids in the metrics
        self.invalid = 0
        self.connected = False
        self.broker_detail = "connecting"
        self.broker_since = time.time()
        self._clients: set[Client] = set()
        self._lock = threading.Lock()

    # The MQTT thread ---------------------------------------------------------------------------
    def handle(self, topic: str, payload: bytes, retain: bool = False) -> None:
        prefix, _, kind = topic.rpartition("/")
        if kind not in KINDS or not prefix:
            return
        with self._lock:
            if kind == "thumbnail":
                self._thumbnail(prefix, payload)
                return
            if kind == "status":
                self._status(prefix, payload)
                return
            try:
                doc = json.loads(payload)
            except ValueError:
                doc = None
            expected = {"results": "result", "latest": "result", "errors": "error", "stats": "stats"}[kind]
            if (
                not isinstance(doc, dict)
                or doc.get("kind") != expected
                or (expected != "stats" and not isinstance(doc.get("msg_id"), str))
            ):
                self.invalid += 1
                return
            instrument = self._instrument(prefix, doc.get("instrument"))
            if kind == "stats":
                instrument.stats, instrument.stats_time = doc, time.time()
                self._send("instrument", instrument.view())
            elif kind == "errors":
                self._error(instrument, doc)
            else:
                self._result(instrument, doc, counted=kind == "results")

    def _instrument(self, prefix: str, name: Any = None) -> Instrument:
        instrument = self.instruments.get(prefix)
        if instrument is None:
            instrument = Instrument(prefix, prefix.rsplit("/", 1)[-1])
            self.instruments[prefix] = instrument
        if isinstance(name, str) and name:
            instrument.name = name
        return instrument

    def _status(self, prefix: str, payload: bytes) -> None:
        text = payload.decode("utf-8", errors="replace").strip()
        if not text:  # a retained status cleared
            return
        if text not in STATUSES:
            self.invalid += 1
            return
        instrument = self._instrument(prefix)
        instrument.status, instrument.status_time = text, time.time()
        self._send("instrument", instrument.view())

    def _result(self, instrument: Instrument, doc: dict[str, Any], counted: bool) -> None:
        row = result_row(instrument.key, instrument.name, doc)
        latest = instrument.latest
        if latest is None or (row["time"] >= latest["time"] and row["msg_id"] != latest["msg_id"]):
            instrument.latest = row
            self._send("instrument", instrument.view())
        if _remember(self._shown, row["msg_id"]):
            self.results.appendleft(row)
            self._send("result", row)
        if counted and _remember(self._counted, row["msg_id"]):
            instrument.results += 1
            instrument.review += bool(doc.get("review"))
            for stage in STAGES:
                value = doc.get(f"{stage}_ms")
                if isinstance(value, int | float) and value >= 0:
                    instrument.stages.setdefault(stage, Histogram()).observe(value / 1e3)

    def _error(self, instrument: Instrument, doc: dict[str, Any]) -> None:
        row = error_row(instrument.key, instrument.name, doc)
        if _remember(self._counted, "error:" + row["msg_id"]):
            instrument.errors[(row["code"], row["moved_to"])] += 1
        if _remember(self._shown, "error:" + row["msg_id"]):
            self.errors.appendleft(row)
            self._send("stack_error", row)

    def _thumbnail(self, prefix: str, payload: bytes) -> None:
        instrument = self._instrument(prefix)
        if not payload:  # a retained picture cleared
            instrument.thumbnail = None
        else:
            kind = image_type(payload)
            if kind is None or len(payload) > MAX_THUMBNAIL:
                self.invalid += 1
                return
            instrument.thumbnail, instrument.thumbnail_type = bytes(payload), kind
            instrument.thumbnail_sha = hashlib.sha256(payload).hexdigest()[:16]
            instrument.thumbnail_time = time.time()
        self._send("instrument", instrument.view())

    def broker(self, connected: bool, detail: str) -> None:
        with self._lock:
            if connected != self.connected:
                self.broker_since = time.time()
            self.connected, self.broker_detail = connected, detail
            self._send("broker", self._broker_view())

    def _broker_view(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "connected": self.connected,
            "detail": self.broker_detail,
            "since": self.broker_since,
        }

    # The web server's threads ------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> dict[str, Any]:
        return {
            "broker": self._broker_view(),
            "history": self.history,
            "instruments": [i.view() for i in sorted(self.instruments.values(), key=lambda i: i.name)],
            "results": list(self.results),
            "errors": list(self.errors),
        }

    def subscribe(self) -> Client:
        """A new stream, starting with a snapshot: no change can fall between the two."""
        client = Client()
        with self._lock:
            client.queue.put_nowait(_event("snapshot", self._snapshot()))
            self._clients.add(client)
        return client

    def unsubscribe(self, client: Client) -> None:
        with self._lock:
            self._clients.discard(client)

    def close(self) -> None:
        with self._lock:
            for client in self._clients:
                client.dropped = True
                with contextlib.suppress(queue.Full):
                    client.queue.put_nowait(None)
            self._clients.clear()

    def _send(self, name: str, data: dict[str, Any]) -> None:
        if not self._clients:
            return
        message = _event(name, data)
        for client in list(self._clients):
            try:
                client.queue.put_nowait(message)
            except queue.Full:
                client.dropped = True  # it reconnects and starts again from a snapshot
                self._clients.discard(client)

    def thumbnail(self, key: str) -> tuple[bytes, str] | None:
        with self._lock:
            instrument = self.instruments.get(key)
            if instrument is None or instrument.thumbnail is None:
                return None
            return instrument.thumbnail, instrument.thumbnail_type

    def metrics(self) -> str:
        with self._lock:
            return render_metrics(self)


def _remember(seen: OrderedDict[str, None], msg_id: str) -> bool:
    """True the first time `msg_id` comes; the oldest ids are forgotten past REMEMBERED."""
    if msg_id in seen:
        return False
    seen[msg_id] = None
    while len(seen) > REMEMBERED:
        seen.popitem(last=False)
    return True


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


# Prometheus' text exposition format (0.0.4) ----------------------------------------------------
def _label_value(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _number(value: float) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    return "+Inf" if value == float("inf") else repr(float(value))


def render_metrics(state: State) -> str:
    lines: list[str] = []

    def family(name: str, kind: str, text: str, samples: Iterable[tuple[str, dict[str, str], float]]) -> None:
        rows = list(samples)
        lines.append(f"# HELP {name} {text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{suffix}{_labels(**labels)} {_number(value)}" for suffix, labels, value in rows)

    instruments = sorted(state.instruments.values(), key=lambda i: i.name)
    family(
        "hpa_edge_dashboard_broker_connected",
        "gauge",
        "1 while this dashboard is connected to the broker",
        [("", {}, int(state.connected))],
    )
    family(
        "hpa_edge_dashboard_invalid_messages_total",
        "counter",
        "messages under the subscribed topics that were not what their topic promises",
        [("", {}, state.invalid)],
    )
    family(
        "hpa_edge_connected",
        "gauge",
        "1 while the agent is connected to the broker (status online or degraded), 0 when offline",
        [
            ("", {"instrument": i.name}, int(i.status != "offline"))
            for i in instruments
            if i.status in STATUSES
        ],
    )
    family(
        "hpa_edge_degraded",
        "gauge",
        "1 while the agent is connected but takes no stacks (status degraded)",
        [
            ("", {"instrument": i.name}, int(i.status == "degraded"))
            for i in instruments
            if i.status in STATUSES
        ],
    )
    family(
        "hpa_edge_results_total",
        "counter",
        "results received by this dashboard since it started, each msg_id once",
        [("", {"instrument": i.name}, i.results) for i in instruments],
    )
    family(
        "hpa_edge_review_results_total",
        "counter",
        "results flagged for review received by this dashboard since it started",
        [("", {"instrument": i.name}, i.review) for i in instruments],
    )
    family(
        "hpa_edge_errors_total",
        "counter",
        "stacks that failed (moved_to=failed) or were quarantined (moved_to=quarantine), by error code, "
        "received since this dashboard started",
        [
            ("", {"instrument": i.name, "code": code, "moved_to": moved_to}, count)
            for i in instruments
            for (code, moved_to), count in sorted(i.errors.items())
        ],
    )
    with_stats = [i for i in instruments if i.stats is not None]
    for counter in STATS_COUNTERS:
        family(
            f"hpa_edge_agent_{counter}_total",
            "counter",
            f"stacks {counter} since the agent started (its stats message; resets when the agent restarts)",
            [("", {"instrument": i.name}, _stat(i, counter)) for i in with_stats],
        )
    for gauge, text in STATS_GAUGES.items():
        family(
            f"hpa_edge_{gauge}",
            "gauge",
            f"{text} (the agent's last stats message)",
            [("", {"instrument": i.name}, _stat(i, gauge)) for i in with_stats],
        )
    family(
        "hpa_edge_agent_uptime_seconds",
        "gauge",
        "seconds since the agent started (its last stats message)",
        [("", {"instrument": i.name}, _stat(i, "uptime_s")) for i in with_stats],
    )
    family(
        "hpa_edge_stats_received_timestamp_seconds",
        "gauge",
        "when this dashboard received the agent's last stats message (Unix time)",
        [("", {"instrument": i.name}, round(i.stats_time or 0.0, 3)) for i in with_stats],
    )
    samples: list[tuple[str, dict[str, str], float]] = []
    for i in instruments:
        for stage in STAGES:
            histogram = i.stages.get(stage)
            if histogram is None:
                continue
            labels = {"instrument": i.name, "stage": stage}
            for bound, count in zip(BUCKETS, histogram.buckets, strict=True):
                samples.append(("_bucket", {**labels, "le": _number(bound)}, count))
            samples.append(("_bucket", {**labels, "le": "+Inf"}, histogram.count))
            samples.append(("_sum", labels, round(histogram.sum, 6)))
            samples.append(("_count", labels, histogram.count))
    family(
        "hpa_edge_stage_duration_seconds",
        "histogram",
        "time per stack in each stage (decode, preprocess, embed, classify, total) from the results' timings",
        samples,
    )
    return "\n".join(lines) + "\n"


def _stat(instrument: Instrument, key: str) -> float:
    value = (instrument.stats or {}).get(key)
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


# The web server ---------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    server: Server
    server_version = "hpa-edge-dashboard"

    def do_GET(self) -> None:
        if not self.server.host_allowed(self.headers.get("Host", "")):
            self._send(403, b"this dashboard answers to localhost only\n", "text/plain; charset=utf-8")
            return
        url = urlsplit(self.path)
        state = self.server.state
        if url.path in PAGE:
            name, kind = PAGE[url.path]
            body = (resources.files("agent.tools") / "dashboard_page" / name).read_bytes()
            self._send(200, body, kind, cache="no-cache")
        elif url.path == "/events":
            self._stream()
        elif url.path == "/metrics":
            body = state.metrics().encode()
            self._send(200, body, "text/plain; version=0.0.4; charset=utf-8")
        elif url.path == "/state":
            self._send(200, json.dumps(state.snapshot()).encode(), "application/json")
        elif url.path == "/thumbnail":
            key = parse_qs(url.query).get("i", [""])[0]
            found = state.thumbnail(key)
            if found is None:
                self._send(404, b"no picture\n", "text/plain; charset=utf-8")
            else:
                self._send(200, found[0], found[1], cache="max-age=3600")  # the URL names the bytes' hash
        else:
            self._send(404, b"not found\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, kind: str, cache: str = "no-store") -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Accel-Buffering", "no")
        for name, value in SECURITY_HEADERS.items():
            self.send_header(name, value)
        self.end_headers()
        self.close_connection = True
        client = self.server.state.subscribe()
        quiet_since = time.monotonic()
        try:
            self.wfile.write(b"retry: 2000\n\n")
            while not client.dropped and not self.server.stopping.is_set():
                try:
                    message = client.queue.get(timeout=1.0)
                except queue.Empty:
                    if time.monotonic() - quiet_since >= KEEPALIVE:
                        self.wfile.write(b": keepalive\n\n")
                        quiet_since = time.monotonic()
                    continue
                if message is None:
                    break
                self.wfile.write(message)
                quiet_since = time.monotonic()
        except OSError:  # the browser went away
            pass
        finally:
            self.server.state.unsubscribe(client)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], state: State, verbose: bool = False) -> None:
        host = address[0]
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.state = state
        self.verbose = verbose
        self.stopping = threading.Event()
        self.loopback = _is_loopback(host)
        super().__init__(address, Handler)

    def host_allowed(self, header: str) -> bool:
        """Bound to loopback, only requests naming a loopback host: a page elsewhere cannot read
        the dashboard through a name it points at 127.0.0.1 (DNS rebinding)."""
        if not self.loopback:
            return True
        try:
            host = urlsplit("//" + header).hostname or ""
        except ValueError:
            return False
        return host in LOOPBACK_NAMES or _is_loopback(host)


def _is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Dashboard:
    """The web server and the MQTT subscription; start() and stop() from any thread."""

    def __init__(
        self,
        broker: Broker,
        topics: list[str] | None = None,
        host: str = "127.0.0.1",
        port: int = DEFAULT_PORT,
        history: int = 200,
        verbose: bool = False,
    ) -> None:
        self.broker = broker
        self.topics = topics or [DEFAULT_TOPIC]
        self.state = State(history, broker.address)
        self.server = Server((host, port), self.state, verbose)
        self._threads: list[threading.Thread] = []
        self.client: Any = None

    @property
    def url(self) -> str:
        host, port = str(self.server.server_address[0]), self.server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"

    def start(self) -> Dashboard:
        web = threading.Thread(
            target=self.server.serve_forever, args=(0.2,), name="dashboard-web", daemon=True
        )
        web.start()
        self._threads.append(web)
        client = make_client(self.broker)
        client.reconnect_delay_set(1, 30)

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
            if reason.is_failure:
                self.state.broker(False, f"refused: {reason}")
                return
            self.state.broker(True, "connected")
            for topic in self.topics:
                client.subscribe(topic, qos=1)

        def on_disconnect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
            self.state.broker(False, f"reconnecting ({reason})")

        def on_connect_fail(client: Any, userdata: Any) -> None:
            self.state.broker(False, "reconnecting (cannot reach the broker)")

        def on_message(client: Any, userdata: Any, message: Any) -> None:
            try:
                self.state.handle(message.topic, bytes(message.payload), bool(message.retain))
            except Exception as exc:  # one odd message never stops the subscription
                print(f"dashboard: message on {message.topic} not understood: {exc!r}", file=sys.stderr)

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_connect_fail = on_connect_fail
        client.on_message = on_message
        client.connect_async(self.broker.host, self.broker.port, keepalive=self.broker.keepalive)
        client.loop_start()  # retries the first connection too
        self.client = client
        return self

    def stop(self) -> None:
        if self.client is not None:
            self.client.disconnect()
            self.client.loop_stop()
            self.client = None
        self.server.stopping.set()
        self.state.close()
        self.server.shutdown()
        self.server.server_close()
        for thread in self._threads:
            thread.join(5)


def run(args: argparse.Namespace) -> int:
    try:
        broker = broker_from_args(args)
    except ValueError as exc:
        print(f"dashboard: {exc}", file=sys.stderr)
        return 2
    if args.history < 1:
        print("dashboard: --history must be at least 1", file=sys.stderr)
        return 2
    try:
        dashboard = Dashboard(broker, args.topic, args.host, args.port, args.history, args.verbose)
    except OSError as exc:
        print(f"dashboard: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    dashboard.start()
    print(f"dashboard: {dashboard.url} (metrics {dashboard.url}metrics, broker {broker.address})", flush=True)
    if not _is_loopback(args.host):
        print(
            f"dashboard: listening on {args.host}: anyone who reaches this address sees the results",
            file=sys.stderr,
        )
    try:
        while not stop.is_set():
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    dashboard.stop()
    return 0
