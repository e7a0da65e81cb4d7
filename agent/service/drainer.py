"""The thread that drains the outbox into a sink: the core of the output side.

It owns what must not depend on the sink: the outbox connection (rows in the order they were
written), at most `max_inflight` rows unanswered at once, what an answer does to a row
(ACCEPTED: deleted; REJECTED: marked and kept for the operator, never re-sent, so an ACL
mistake cannot become a retry storm; RETRY: left pending), backing off while the sink is
unavailable (doubling from `reconnect_min` to `reconnect_max` s, with jitter), the periodic
stats message, and on shutdown delivering what it can within `flush_seconds`. The sink
(`agent.service.sinks`) only connects, sends and reports answers; everything the sink does
runs on this thread too, which is what paho's client needs (it is not reliably thread-safe).

Other threads only `kick()` it (new rows are in the outbox) and read its counters. It tells
the outside world two things through callbacks given at construction: `on_delivered(msg_id,
at)` when a row was accepted, and `stats(pending, rejected, inflight, connected)`, which
returns the stats document to send.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.model import messages
from agent.service import log
from agent.service.outbox import Outbox, Row
from agent.service.sinks import Answer, Sink, SinkUnavailableError, Verdict
from agent.service.state import StateError

POLL_SECONDS = 0.05


@dataclass(frozen=True)
class DrainSettings:
    max_inflight: int = 20
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    stats_interval: float = 60.0  # 0 = no stats messages
    flush_seconds: float = 5.0
    retry_seconds: float = 5.0  # a row answered RETRY waits this long before it is sent again


StatsSource = Callable[[dict[str, int], int, bool], dict[str, Any]]


class Drainer(threading.Thread):
    def __init__(
        self,
        database: Path,
        sink: Sink,
        settings: DrainSettings,
        kind: str = "mqtt",
        stats: StatsSource | None = None,
        on_delivered: Callable[[str, float], None] | None = None,
    ) -> None:
        super().__init__(name=f"{kind}-drainer", daemon=True)
        self.database = database
        self.sink = sink
        self.settings = settings
        self.kind = kind  # prefixes the log events: mqtt_connected, mqtt_connection_lost, ...
        self.stats_source = stats
        self.on_delivered = on_delivered
        self.sent = 0
        self.rejected = 0
        self.inflight: dict[int, Row] = {}
        self.failure: BaseException | None = None
        self.beat = time.monotonic()  # last turn of this thread's loop, for the systemd watchdog
        self._kick = threading.Event()
        self._stop_request = threading.Event()
        self._flush_until = 0.0
        self._outbox: Outbox | None = None
        self._backoff = settings.reconnect_min
        self._next_attempt = 0.0
        self._connected_once = False
        self._more = True
        self._resting: dict[int, float] = {}  # seq -> when a row answered RETRY may go again
        self._next_stats = time.monotonic() + settings.stats_interval

    @property
    def connected(self) -> bool:
        return self.sink.ready

    # Called from other threads ------------------------------------------------------------
    def kick(self) -> None:
        """New rows are in the outbox."""
        self._kick.set()

    def shutdown(self, flush_seconds: float | None = None) -> None:
        """Deliver what the sink takes within `flush_seconds`, say goodbye, disconnect."""
        flush = self.settings.flush_seconds if flush_seconds is None else flush_seconds
        self._flush_until = time.monotonic() + flush
        self._stop_request.set()
        self._kick.set()
        if self.is_alive():
            self.join(timeout=flush + 10)

    # The thread ---------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._outbox = Outbox(self.database)
            while True:
                self.beat = time.monotonic()
                if self._stop_request.is_set() and self._drained_or_late():
                    break
                if not self._linked:
                    self._try_connect()
                    continue
                self._step()
            self._close(goodbye=True)
        except BaseException as exc:  # surfaced to the service, which exits non-zero
            self.failure = exc
            log.event("publisher_failed", "error", error=repr(exc))
        finally:
            self._close(goodbye=False)
            if self._outbox is not None:
                self._outbox.close()

    _linked = False  # a connection was started and not lost since

    def _drained_or_late(self) -> bool:
        if time.monotonic() >= self._flush_until or not self.sink.ready:
            return True
        assert self._outbox is not None
        return not self.inflight and self._outbox.depth()["pending"] == 0

    def _try_connect(self) -> None:
        now = time.monotonic()
        if now < self._next_attempt:
            self._kick.wait(min(self._next_attempt - now, 0.25))
            self._kick.clear()
            return
        try:
            self.sink.connect()
        except SinkUnavailableError as exc:
            self._retry_later("connect_failed", exc)
            return
        self._linked = True

    def _step(self) -> None:
        was_ready = self.sink.ready
        try:
            answers = self.sink.poll(POLL_SECONDS)
        except SinkUnavailableError as exc:
            self._retry_later("connection_lost", exc)
            return
        if self.sink.ready and not was_ready:  # (re)connected: start from the oldest pending row
            self._backoff = self.settings.reconnect_min
            self._more = True
        for answer in answers:
            self._settle(answer)
        if not self.sink.ready:
            return
        if self._kick.is_set():
            self._kick.clear()
            self._more = True
        if self._more and len(self.inflight) < self.settings.max_inflight:
            self._fill()
        if self.settings.stats_interval and time.monotonic() >= self._next_stats:
            self._next_stats = time.monotonic() + self.settings.stats_interval
            self._send_stats()

    def _fill(self) -> None:
        assert self._outbox is not None
        now = time.monotonic()
        self._resting = {seq: until for seq, until in self._resting.items() if until > now}
        room = self.settings.max_inflight - len(self.inflight)
        busy = {row.seq for row in self.inflight.values()} | set(self._resting)
        try:
            rows = self._outbox.next_rows(room, skip=busy)
        except StateError as exc:
            log.event("outbox_unreadable", "error", error=exc)
            return
        self._more = len(rows) == room or bool(self._resting)
        for row in rows:
            token = self.sink.send(row)
            if token is None:
                self._more = True
                return
            self.inflight[token] = row

    def _settle(self, answer: Answer) -> None:
        """What the sink's answer does to the row: the drainer's whole retry policy."""
        row = self.inflight.pop(answer.token, None)
        if row is None:
            return  # not an outbox row (status, latest) or from a connection since dropped
        assert self._outbox is not None
        self._more = True
        if answer.verdict == Verdict.ACCEPTED:
            self._outbox.acknowledged(row.seq)
            self.sent += 1
            if self.on_delivered is not None:
                self.on_delivered(row.msg_id, time.monotonic())
        elif answer.verdict == Verdict.REJECTED:
            self._outbox.rejected(row.seq, answer.reason)
            self.rejected += 1
            log.event(
                f"{self.kind}_rejected", "error", kind=row.kind, msg_id=row.msg_id, reason=answer.reason
            )
        else:
            self._resting[row.seq] = time.monotonic() + self.settings.retry_seconds
            log.event(
                f"{self.kind}_deferred",
                "warning",
                kind=row.kind,
                msg_id=row.msg_id,
                reason=answer.reason,
                retry_s=self.settings.retry_seconds,
            )

    def outbox_depth(self) -> dict[str, int]:
        assert self._outbox is not None
        return self._outbox.depth()

    def _send_stats(self) -> None:
        if self.stats_source is None:
            return
        document = self.stats_source(self.outbox_depth(), len(self.inflight), self.sink.ready)
        self.sink.send_stats(messages.encode(document))

    def _retry_later(self, why: str, error: object) -> None:
        self._close(goodbye=False)
        delay = self._backoff * random.uniform(0.8, 1.2)
        self._next_attempt = time.monotonic() + delay
        log.event(f"{self.kind}_{why}", "warning", sink=self.sink.name, error=error, retry_s=round(delay, 1))
        self._backoff = min(self._backoff * 2, self.settings.reconnect_max)

    def _close(self, goodbye: bool) -> None:
        if goodbye and self.sink.ready:
            self.sink.close(goodbye=True)
            log.event(f"{self.kind}_offline", sink=self.sink.name, pending=len(self.inflight))
        else:
            self.sink.close(goodbye=False)
        self._linked = False
        self.inflight.clear()  # unanswered rows are still pending in the outbox
