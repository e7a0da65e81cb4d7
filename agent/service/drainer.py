"""The thread that drains the outbox into a sink: the core of the output side.

It owns what must not depend on the sink: the outbox connection (rows in the order they were
written), at most `max_inflight` rows unanswered at once, what an answer does to a row
(ACCEPTED: deleted; REJECTED: marked and kept for the operator, never re-sent, so an ACL
mistake cannot become a retry storm; RETRY: left pending and sent again after `retry_seconds`,
doubling each time, at most `retry_limit` times, then REJECTED with the last reason, so a
broker that never stops saying "not now" cannot keep a row, or the queue behind it, for
ever; the count lives in memory, a restart starts it again), backing off while the sink is
unavailable (doubling from `reconnect_min` to `reconnect_max` s, with jitter), the periodic
stats message, and on shutdown delivering what it can within `flush_seconds`. The sink
(`agent.service.sinks`) only connects, sends and reports answers; everything the sink does
runs on this thread too, which is what paho's client needs (it is not reliably thread-safe),
except `connect`.

`connect` runs on a short-lived thread of its own while this one waits for it in small steps,
because it can block for a minute (paho resolves the broker's name and opens the connection
before it returns; a DNS server that does not answer costs the resolver's whole timeout), and
`beat` must keep advancing meanwhile, or the systemd watchdog kills an agent that works. The
sink is still used by one thread at a time: the drainer does not touch it until the connect
returned, and if the drainer stops first (shutdown), the connect's thread closes the sink
itself when the connect returns. `<kind>_connect_slow` is logged once when a connect takes
longer than `connect_slow_seconds`. Sending and polling stay on this thread, so a sink stuck
there still stops the beat, which is what the watchdog is for.

The database is allowed to fail (a full disk, a locked or unreadable file): the thread never
dies of it. Opening and reading are retried after `outbox_retry` s. An answer whose outbox
write fails is kept in memory, in order, and written again after the same pause; its row is
not sent again meanwhile (it was answered), and no new rows are sent while answers wait, so
memory stays bounded by `max_inflight`. Each of these logs once when it starts failing
(`outbox_unreadable`, `outbox_write_failed`) and once when it works again (`outbox_recovered`),
not once per row or per turn. Should the agent stop before a write succeeds, the row is sent
again after the restart, which consumers de-duplicate by `msg_id`.

Other threads only `kick()` it (new rows are in the outbox) and read its counters; another
process (`hpa-edge outbox retry`) may put rejected rows back to pending, which the drainer
finds within `rescan_seconds`. It tells
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
from agent.service import crashpoint, log
from agent.service.outbox import Outbox, Row
from agent.service.sinks import Answer, Sink, SinkUnavailableError, Verdict
from agent.service.state import StateError

POLL_SECONDS = 0.05
CONNECT_STEP = 0.1  # while a connect runs: how often the loop turns (beat, shutdown)


@dataclass(frozen=True)
class DrainSettings:
    max_inflight: int = 20
    reconnect_min: float = 1.0
    reconnect_max: float = 60.0
    stats_interval: float = 60.0  # 0 = no stats messages
    flush_seconds: float = 5.0
    retry_seconds: float = 5.0  # a row answered RETRY waits this long before it is sent again, doubling
    retry_limit: int = 5  # re-sends of a row answered RETRY; still refused after them: REJECTED
    outbox_retry: float = 1.0  # pause before the database is tried again after an error
    connect_slow_seconds: float = 5.0  # a connect taking longer is logged (once)
    rescan_seconds: float = 5.0  # look for pending rows this often unkicked (`hpa-edge outbox retry`)


StatsSource = Callable[[dict[str, int], int, bool], dict[str, Any]]


class _Trouble:
    """Whether one use of the database (reading or writing) is failing now.

    It logs the changes of state only: one line when the use starts failing, one when it works
    again, however many turns or rows fail in between; and it says when to try again.
    """

    def __init__(self, event: str, side: str, pause: float) -> None:
        self.event = event  # outbox_unreadable | outbox_write_failed
        self.side = side
        self.pause = pause
        self.since: float | None = None  # when it started failing
        self.failures = 0
        self.next_try = 0.0

    def due(self, now: float) -> bool:
        return now >= self.next_try

    def failed(self, error: object, **fields: Any) -> None:
        now = time.monotonic()
        self.next_try = now + self.pause
        self.failures += 1
        if self.since is None:
            self.since = now
            log.event(self.event, "error", error=error, retry_s=self.pause, **fields)

    def worked(self) -> None:
        self.next_try = 0.0
        if self.since is not None:
            log.event(
                "outbox_recovered",
                side=self.side,
                down_s=round(time.monotonic() - self.since, 1),
                failures=self.failures,
            )
            self.since = None
            self.failures = 0


class _Connecting(threading.Thread):
    """One `sink.connect()` on a thread of its own, which owns the sink until it returns."""

    def __init__(self, sink: Sink, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.sink = sink
        self.started = time.monotonic()
        self.error: BaseException | None = None
        self.said_slow = False
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._abandoned = False

    def run(self) -> None:
        try:
            self.sink.connect()
        except BaseException as exc:  # handed to the drainer, which decides
            self.error = exc
        with self._lock:
            self._finished.set()
            abandoned = self._abandoned
        if abandoned:  # the drainer is gone: nobody will use this connection
            try:
                self.sink.close(goodbye=False)
            except Exception as exc:
                log.event("connect_close_failed", "warning", sink=self.sink.name, error=repr(exc))

    def wait(self, timeout: float) -> bool:
        """True once the connect returned (then `error` says how)."""
        return self._finished.wait(timeout)

    def abandon(self) -> bool:
        """The drainer stops waiting. True when the connect still runs: this thread then owns
        the sink for good and closes it when the connect returns."""
        with self._lock:
            if self._finished.is_set():
                return False
            self._abandoned = True
            return True


class Drainer(threading.Thread):
    def __init__(
        self,
        database: Path,
        sink: Sink,
        settings: DrainSettings,
        kind: str = "mqtt",
        stats: StatsSource | None = None,
        on_delivered: Callable[[str, float], None] | None = None,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(name=f"{kind}-drainer", daemon=True)
        self.database = database
        self.sink = sink
        self.settings = settings
        self.kind = kind  # prefixes the log events: mqtt_connected, mqtt_connection_lost, ...
        self.stats_source = stats
        self.on_delivered = on_delivered
        self.on_failure = on_failure  # the thread died of a bug: wake whoever watches it
        self.sent = 0  # rows accepted and deleted from the outbox
        self.rejected = 0  # rows refused and marked so in the outbox
        self.inflight: dict[int, Row] = {}
        self.failure: BaseException | None = None
        self.beat = time.monotonic()  # last turn of this thread's loop, for the systemd watchdog
        self._kick = threading.Event()
        self._stop_request = threading.Event()
        self._flush_until = 0.0
        self._outbox: Outbox | None = None
        self._connecting: _Connecting | None = None
        self._sink_given_up = False  # a connect outlived this thread: its thread owns the sink
        self._backoff = settings.reconnect_min
        self._next_attempt = 0.0
        self._connected_once = False
        self._more = True
        self._resting: dict[int, float] = {}  # seq -> when a row answered RETRY may go again
        self._retries: dict[int, int] = {}  # seq -> RETRY answers so far
        self._unwritten: dict[int, Answer] = {}  # seq -> an answer not yet in the outbox
        self._reading = _Trouble("outbox_unreadable", "read", settings.outbox_retry)
        self._writing = _Trouble("outbox_write_failed", "write", settings.outbox_retry)
        self._next_stats = time.monotonic() + settings.stats_interval
        self._next_rescan = 0.0
        self._reopen = threading.Event()
        self._status = messages.ONLINE  # what the status topic should say while connected
        self._status_sent: bytes | None = None

    @property
    def connected(self) -> bool:
        return self.sink.ready

    # Called from other threads ------------------------------------------------------------
    def kick(self) -> None:
        """New rows are in the outbox: cut the sink's current poll short, so a result goes out
        within a millisecond of its commit rather than at the end of a 50 ms poll."""
        self._kick.set()
        wake = getattr(self.sink, "wake", None)  # optional: a sink whose poll can be woken
        if wake is not None:
            wake()

    def reopen(self) -> None:
        """The database file was replaced (restored after a deletion): open it again."""
        self._reopen.set()
        self._kick.set()

    def set_status(self, payload: bytes) -> None:
        """`online` or `degraded`: published retained now, and after every (re)connect."""
        self._status = payload
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
            while True:
                self.beat = time.monotonic()
                if self._stop_request.is_set() and self._drained_or_late():
                    break
                if self._reopen.is_set() and self._outbox is not None:
                    self._reopen.clear()
                    self._write_answers(last=True)
                    self._outbox.close()
                    self._outbox = None
                if self._outbox is None:
                    self._open()
                    continue
                self._write_answers()
                if not self._linked:
                    self._try_connect()
                    continue
                self._step()
            self._close(goodbye=True)
        except BaseException as exc:  # a bug, not a fault of the database or the sink: surfaced
            self.failure = exc
            log.event("publisher_failed", "error", error=repr(exc))
            if self.on_failure is not None:
                self.on_failure()
        finally:
            self._close(goodbye=False)
            if self._outbox is not None:
                self._write_answers(last=True)  # not written: re-sent after a restart
                self._outbox.close()

    _linked = False  # a connection was started and not lost since

    def _drained_or_late(self) -> bool:
        if time.monotonic() >= self._flush_until or not self.sink.ready or self._outbox is None:
            return True
        if self.inflight or self._unwritten:
            return False
        try:
            return self._outbox.depth()["pending"] == 0
        except StateError:
            return False  # cannot tell: keep delivering until the flush time is up

    def _open(self) -> None:
        """Open the outbox; the database may be unavailable for a while (e.g. a full disk)."""
        if self._reading.due(time.monotonic()):
            try:
                self._outbox = Outbox(self.database)
            except StateError as exc:
                self._reading.failed(exc)
            else:
                self._reading.worked()
                return
        self._kick.wait(min(self.settings.outbox_retry, 0.25))
        self._kick.clear()
        self._more = True

    def _try_connect(self) -> None:
        attempt = self._connecting
        if attempt is None:
            now = time.monotonic()
            if now < self._next_attempt:
                self._kick.wait(min(self._next_attempt - now, 0.25))
                self._kick.clear()
                return
            attempt = self._connecting = _Connecting(self.sink, f"{self.kind}-connect")
            attempt.start()
        if not attempt.wait(CONNECT_STEP):
            waited = time.monotonic() - attempt.started
            if not attempt.said_slow and waited >= self.settings.connect_slow_seconds:
                attempt.said_slow = True
                log.event(
                    f"{self.kind}_connect_slow", "warning", sink=self.sink.name, waited_s=round(waited, 1)
                )
            return
        self._connecting = None
        if isinstance(attempt.error, SinkUnavailableError):
            self._retry_later("connect_failed", attempt.error)
            return
        if attempt.error is not None:
            raise attempt.error
        self._linked = True
        self._status_sent = messages.ONLINE  # what a sink says by itself on every connect

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
        if self.sink.ready and self._status_sent != self._status:
            self.sink.send_status(self._status)
            self._status_sent = self._status
        for answer in answers:
            self._settle(answer)
        self._write_answers()
        if not self.sink.ready:
            return
        if self._kick.is_set():
            self._kick.clear()
            self._more = True
        if time.monotonic() >= self._next_rescan:  # another process may have put rows back
            self._next_rescan = time.monotonic() + self.settings.rescan_seconds
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
        # Answers waiting to be written count as in flight: nothing new goes while writes fail.
        room = self.settings.max_inflight - len(self.inflight) - len(self._unwritten)
        if room <= 0 or not self._reading.due(now):
            return
        busy = {row.seq for row in self.inflight.values()} | set(self._resting) | set(self._unwritten)
        try:
            rows = self._outbox.next_rows(room, skip=busy)
        except StateError as exc:
            self._reading.failed(exc)
            return
        self._reading.worked()
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
        crashpoint.reach("after_publish")  # the broker has it; the outbox does not know yet
        self._more = True
        verdict, reason = answer.verdict, answer.reason
        if verdict == Verdict.RETRY:
            attempts = self._retries.get(row.seq, 0) + 1
            if attempts <= self.settings.retry_limit:
                self._retries[row.seq] = attempts
                pause = min(self.settings.retry_seconds * 2 ** (attempts - 1), self._longest_rest)
                self._resting[row.seq] = time.monotonic() + pause
                log.event(
                    f"{self.kind}_deferred",
                    "warning",
                    kind=row.kind,
                    msg_id=row.msg_id,
                    reason=reason,
                    retry_s=round(pause, 2),
                    attempt=attempts,
                )
                return
            verdict, reason = Verdict.REJECTED, f"{reason}, still after {attempts} attempts"
        self._retries.pop(row.seq, None)
        self._unwritten[row.seq] = Answer(answer.token, verdict, reason)
        if verdict == Verdict.ACCEPTED:
            if self.on_delivered is not None:  # delivered now, whenever the delete gets written
                self.on_delivered(row.msg_id, time.monotonic())
        else:
            log.event(f"{self.kind}_rejected", "error", kind=row.kind, msg_id=row.msg_id, reason=reason)

    @property
    def _longest_rest(self) -> float:
        return max(self.settings.retry_seconds, self.settings.reconnect_max)

    def _write_answers(self, last: bool = False) -> None:
        """Put the answers in the outbox, oldest first; on an error keep them for the next try."""
        if not self._unwritten or not (last or self._writing.due(time.monotonic())):
            return
        assert self._outbox is not None
        while self._unwritten:
            seq, answer = next(iter(self._unwritten.items()))
            try:
                if answer.verdict == Verdict.ACCEPTED:
                    self._outbox.acknowledged(seq)
                else:
                    self._outbox.rejected(seq, answer.reason)
            except StateError as exc:
                self._writing.failed(exc, waiting=len(self._unwritten))
                return
            del self._unwritten[seq]
            if answer.verdict == Verdict.ACCEPTED:
                self.sent += 1
            else:
                self.rejected += 1
        self._writing.worked()

    def _send_stats(self) -> None:
        if self.stats_source is None:
            return
        assert self._outbox is not None
        try:
            depth = self._outbox.depth()
        except StateError as exc:
            self._reading.failed(exc)
            return  # best effort: the next one follows
        document = self.stats_source(depth, len(self.inflight), self.sink.ready)
        self.sink.send_stats(messages.encode(document))

    def _retry_later(self, why: str, error: object) -> None:
        self._close(goodbye=False)
        delay = self._backoff * random.uniform(0.8, 1.2)
        self._next_attempt = time.monotonic() + delay
        log.event(f"{self.kind}_{why}", "warning", sink=self.sink.name, error=error, retry_s=round(delay, 1))
        self._backoff = min(self._backoff * 2, self.settings.reconnect_max)

    def _close(self, goodbye: bool) -> None:
        if self._connecting is not None:  # only on the way out: the loop waits for a running connect
            self._sink_given_up = self._connecting.abandon()
            self._connecting = None
        if self._sink_given_up:
            pass  # the connect's thread closes the sink when its connect returns
        elif goodbye and self.sink.ready:
            self.sink.close(goodbye=True)
            log.event(f"{self.kind}_offline", sink=self.sink.name, pending=len(self.inflight))
        else:
            self.sink.close(goodbye=False)
        self._linked = False
        self.inflight.clear()  # unanswered rows are still pending in the outbox
