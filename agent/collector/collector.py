"""The collector's MQTT loop: subscribe, batch, commit, then acknowledge.

MQTT 5, QoS 1, a fixed client id and a persistent session (`clean_start` false, a session
expiry): while the collector is down or restarting, the broker keeps its subscriptions and
queues what arrives for it. With a group name the subscriptions are shared
(`$share/<group>/<prefix>/+/results`...), so the broker hands each message to one collector
of the group.

paho's manual acknowledgement (`manual_ack=True`): a message's PUBACK goes to the broker only
after the transaction holding its row has committed. A collector killed before the commit
has acknowledged nothing, and the broker delivers the messages again when its session
resumes; one killed between the commit and the PUBACK gets them again too, and the primary
key turns them into counted duplicates. Messages are written in batches (at most `batch`
messages, or what arrived within `batch_seconds`), one transaction each, so a commit's fsync
is shared by hundreds of results.

One thread owns the client and the database (paho is not reliably thread-safe): it runs
paho's `loop()`, then writes and acknowledges a batch when one is due. An acknowledgement is
only sent on the connection the message arrived on (a message id means nothing on the next
one). When the database refuses a batch for a passing reason (locked, connection lost) the
batch is kept and tried again with back-off, unacknowledged; when it refuses it for the data's
sake, each message is written alone and the one refused goes to `invalid` with the reason.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agent.collector import ingest, store
from agent.collector.database import Database
from agent.model.messages import utc_now
from agent.service.mqtt_client import Broker, make_client

KINDS = ("results", "errors", "status")


@dataclass(frozen=True)
class Settings:
    prefix: str = "hpa-edge"
    group: str | None = None
    client_id: str = ""
    session_expiry: int = 7 * 24 * 3600  # seconds the broker keeps the session while the collector is away
    batch: int = 500
    batch_seconds: float = 0.05
    receive_maximum: int = 1000  # unacknowledged messages the broker may have in flight to us
    known_bundles: frozenset[str] = frozenset()
    stats_seconds: float = 60.0

    def subscriptions(self) -> list[str]:
        share = f"$share/{self.group}/" if self.group else ""
        return [f"{share}{self.prefix}/+/{kind}" for kind in KINDS]


def default_client_id(group: str | None) -> str:
    """hpa-edge-collect[-GROUP]-HOST: fixed across restarts, so the session and its queue are found again."""
    host = socket.gethostname().split(".")[0] or "host"
    return "-".join(["hpa-edge-collect", *([group] if group else []), host])[:64]


@dataclass
class _Arrival:
    generation: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    record: ingest.Record
    at: str


@dataclass
class Collector:
    db: Database
    broker: Broker
    settings: Settings
    log: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))

    def __post_init__(self) -> None:
        self.client_id = self.settings.client_id or default_client_id(self.settings.group)
        self.counts = store.Counts()
        self.pending: list[_Arrival] = []
        self.generation = 0  # one per connection
        self.connected = False
        self.subscribed = threading.Event()
        self._first_pending = 0.0
        self._retry_at = 0.0
        self._db_failures = 0
        self._configured = False
        self.client = self._make_client()

    # MQTT ------------------------------------------------------------------------------
    def _make_client(self) -> Any:
        if self.broker.protocol != "5":
            raise ValueError("the collector needs MQTT 5 (shared subscriptions, session expiry)")
        client = make_client(self.broker, client_id=self.client_id, manual_ack=True)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _connect_properties(self) -> Any:
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = self.settings.session_expiry
        properties.ReceiveMaximum = max(1, min(self.settings.receive_maximum, 65535))
        return properties

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            self.log(f"event=refused broker={self.broker.address} reason={str(reason)!r}")
            return
        self.generation += 1
        self.connected = True
        self.log(
            f"event=connected broker={self.broker.address} client_id={self.client_id} "
            f"session_present={int(bool(flags.session_present))}"
        )
        client.subscribe([(topic, 1) for topic in self.settings.subscriptions()])

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, properties: Any) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            self.log(f"event=subscribe_refused reasons={failed!r} topics={self.settings.subscriptions()!r}")
            return
        self.log(f"event=subscribed topics={','.join(self.settings.subscriptions())}")
        self.subscribed.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if self.connected:
            self.log(f"event=disconnected broker={self.broker.address} reason={str(reason)!r}")
        self.connected = False
        self.subscribed.clear()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        record = ingest.parse(
            message.topic, message.payload, bool(message.retain), self.settings.known_bundles
        )
        if not self.pending:
            self._first_pending = time.monotonic()
        payload = bytes(message.payload)
        self.pending.append(
            _Arrival(self.generation, message.mid, message.qos, message.topic, payload, record, utc_now())
        )

    # The loop --------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> int:
        """Collect until `stop` is set; then write what is held, acknowledge it and leave the session."""
        backoff = 0.5
        last_stats = time.monotonic()
        counted = store.Counts()
        while not stop.is_set():
            if not self.connected and not self._connect():
                stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
                continue
            backoff = 0.5
            if self.client.loop(timeout=0.01 if self.pending else 0.2) != 0:
                self._on_disconnect(self.client, None, None, "connection lost", None)
            if self._due():
                self.flush()
            if time.monotonic() - last_stats >= self.settings.stats_seconds:
                self._stats(counted, time.monotonic() - last_stats)
                last_stats = time.monotonic()
        deadline = time.monotonic() + 10
        while self.pending and time.monotonic() < deadline:
            if not self.flush(final=True):
                time.sleep(0.5)
        if self.connected:
            for _ in range(20):  # let the last PUBACKs leave before the DISCONNECT
                if not self.client.want_write():
                    break
                self.client.loop(timeout=0.05)
            self.client.disconnect()
            self.client.loop(timeout=0.2)
        self._stats(counted, time.monotonic() - last_stats)
        self.log(f"event=stopped unwritten={len(self.pending)}")
        return 0

    def _connect(self) -> bool:
        if not self._configured:
            self.client.connect_async(
                self.broker.host,
                self.broker.port,
                keepalive=self.broker.keepalive,
                clean_start=False,
                properties=self._connect_properties(),
            )
            self._configured = True
        try:
            self.client.reconnect()
        except OSError as exc:
            self.log(f"event=unreachable broker={self.broker.address} error={str(exc)!r}")
            return False
        # CONNACK arrives through loop(); wait for it briefly
        deadline = time.monotonic() + 10
        while not self.connected and time.monotonic() < deadline:
            if self.client.loop(timeout=0.1) != 0:
                return False
        return self.connected

    def _due(self) -> bool:
        if not self.pending or time.monotonic() < self._retry_at:
            return False
        return (
            len(self.pending) >= self.settings.batch
            or time.monotonic() - self._first_pending >= self.settings.batch_seconds
        )

    def flush(self, final: bool = False) -> bool:
        """Write the held messages in one transaction, then acknowledge them. False: kept for later."""
        batch = self.pending[: self.settings.batch]
        arrivals = [(a.record, a.at) for a in batch]
        try:
            try:
                with self.db.transaction() as tx:
                    counts = store.write(tx, arrivals, self.client_id)
            except Exception as exc:
                if self.db.is_transient(exc):
                    raise
                counts = self._one_by_one(batch, exc)
        except Exception as exc:
            # the database is away, or refuses even an `invalid` row: hold the batch, unacknowledged
            self.db.is_transient(exc)  # drops a broken PostgreSQL connection
            self._db_failures += 1
            pause = min(0.5 * 2 ** min(self._db_failures - 1, 6), 30.0)
            if self._db_failures == 1 or self._db_failures % 20 == 0:
                self.log(
                    f"event=database_unavailable held={len(self.pending)} retry_in_s={pause:.1f} "
                    f"error={str(exc).strip()[:200]!r}"
                )
            self._retry_at = time.monotonic() + pause
            return False
        if self._db_failures:
            self.log(f"event=database_recovered after_failures={self._db_failures}")
            self._db_failures = 0
        self.counts.add(counts)
        for arrival in batch:
            if arrival.generation == self.generation and self.connected and arrival.qos > 0:
                self.client.ack(arrival.mid, arrival.qos)
        del self.pending[: len(batch)]
        if self.pending:
            self._first_pending = time.monotonic()
        return True

    def _one_by_one(self, batch: list[_Arrival], error: BaseException) -> store.Counts:
        """The database refused the batch for its data: each message alone; the refused ones to invalid."""
        self.log(f"event=batch_refused size={len(batch)} error={str(error).strip()[:200]!r}")
        counts = store.Counts()
        for arrival in batch:
            try:
                with self.db.transaction() as tx:
                    counts.add(store.write(tx, [(arrival.record, arrival.at)], self.client_id))
                continue
            except Exception as exc:
                if self.db.is_transient(exc):
                    raise
                reason = f"refused by the database: {str(exc).strip()[:300]}".replace("\0", "")
            invalid = ingest.Invalid(arrival.topic, arrival.payload, reason)
            with self.db.transaction() as tx:
                counts.add(store.write(tx, [(invalid, arrival.at)], self.client_id))
        return counts

    def _stats(self, counted: store.Counts, seconds: float) -> None:
        c = self.counts
        new = c.results - counted.results
        self.log(
            f"event=stats results={c.results} errors={c.errors} status={c.status} invalid={c.invalid} "
            f"duplicates={c.duplicates} held={len(self.pending)} "
            f"results_per_s={new / seconds if seconds > 0 else 0:.1f}"
        )
        counted.results, counted.errors = c.results, c.errors
