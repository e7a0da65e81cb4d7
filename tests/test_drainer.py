"""The outbox drainer's policy, with a sink written here in a few lines.

The drainer must work with any sink: these tests give it one that is not MQTT (it answers
as the test says), with the real SQLite outbox underneath. The MQTT sink itself is tested
against a real mosquitto in test_agent_mqtt.py and the fault suite.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.service.drainer import Drainer, DrainSettings
from agent.service.outbox import Row
from agent.service.sinks import Answer, SinkUnavailableError, Verdict
from agent.service.state import Ledger, Message, Record
from tests.agent_harness import outbox_depth

FAST = DrainSettings(
    max_inflight=4, reconnect_min=0.05, reconnect_max=0.2, stats_interval=0.0, flush_seconds=1.0
)


class ListSink:
    """Keeps what it is sent; answers each row as `verdict(row, attempt)` says, on the next poll."""

    name = "list://test"

    def __init__(self, verdict: Callable[[Row, int], Verdict] = lambda row, n: Verdict.ACCEPTED) -> None:
        self.verdict = verdict
        self.sent: list[Row] = []
        self.stats: list[bytes] = []
        self.refusals = 0  # connect attempts to refuse first
        self.connects = 0
        self.goodbyes = 0
        self.answer_now = True
        self._ready = False
        self._unanswered: dict[int, Row] = {}
        self._lock = threading.Lock()

    @property
    def ready(self) -> bool:
        return self._ready

    def connect(self) -> None:
        self.connects += 1
        if self.refusals:
            self.refusals -= 1
            raise SinkUnavailableError("refused by the test")
        self._ready = True

    def send(self, row: Row) -> int | None:
        with self._lock:
            self.sent.append(row)
            token = len(self.sent)
            self._unanswered[token] = row
        return token

    def poll(self, timeout: float) -> list[Answer]:
        time.sleep(timeout / 5)
        if not self.answer_now:
            return []
        with self._lock:
            tokens, self._unanswered = self._unanswered, {}
        attempts = {token: sum(r.seq == row.seq for r in self.sent[:token]) for token, row in tokens.items()}
        return [Answer(t, self.verdict(row, attempts[t]), "test") for t, row in tokens.items()]

    def send_stats(self, payload: bytes) -> None:
        self.stats.append(payload)

    def close(self, goodbye: bool) -> None:
        self.goodbyes += goodbye and self._ready
        self._ready = False

    def attempts(self, msg_id: str) -> int:
        return sum(row.msg_id == msg_id for row in self.sent)


def fill(database: Path, n: int) -> None:
    ledger = Ledger(database)
    records = [
        Record(f"s{i}", f"f{i}", "result", f"m{i}", (Message("results", f"m{i}", f"payload {i}".encode()),))
        for i in range(n)
    ]
    ledger.record(records)
    ledger.close()


def wait_for(condition: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@contextmanager
def draining(
    database: Path, sink: ListSink, settings: DrainSettings = FAST, **options: Any
) -> Iterator[Drainer]:
    drainer = Drainer(database, sink, settings, kind="test", **options)
    drainer.start()
    try:
        yield drainer
    finally:
        drainer.shutdown(flush_seconds=0.5)
        assert not drainer.is_alive()


def test_accepted_rows_leave_the_outbox_in_order_and_are_reported_delivered(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    fill(database, 5)
    delivered: list[str] = []
    sink = ListSink()
    with draining(database, sink, on_delivered=lambda msg_id, at: delivered.append(msg_id)) as drainer:
        assert wait_for(lambda: drainer.sent == 5)
    assert [row.msg_id for row in sink.sent] == [f"m{i}" for i in range(5)]
    assert delivered == [f"m{i}" for i in range(5)]
    assert outbox_depth(database) == {"pending": 0, "rejected": 0}


def test_a_rejected_row_is_kept_marked_and_never_sent_again(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    fill(database, 3)
    sink = ListSink(lambda row, n: Verdict.REJECTED if row.msg_id == "m1" else Verdict.ACCEPTED)
    with draining(database, sink) as drainer:
        assert wait_for(lambda: drainer.sent == 2 and drainer.rejected == 1)
        drainer.kick()
        time.sleep(0.3)
    assert sink.attempts("m1") == 1
    assert outbox_depth(database) == {"pending": 0, "rejected": 1}


def test_a_row_answered_retry_stays_pending_and_goes_again_after_a_pause(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    fill(database, 2)
    settings = dataclasses.replace(FAST, retry_seconds=0.3)
    sink = ListSink(lambda row, n: Verdict.RETRY if row.msg_id == "m0" and n == 1 else Verdict.ACCEPTED)
    with draining(database, sink, settings) as drainer:
        assert wait_for(lambda: drainer.sent == 2)
    assert sink.attempts("m0") == 2
    assert drainer.rejected == 0
    assert outbox_depth(database) == {"pending": 0, "rejected": 0}


def test_an_unavailable_sink_is_retried_with_backoff_and_then_gets_the_backlog(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    fill(database, 3)
    sink = ListSink()
    sink.refusals = 3
    with draining(database, sink) as drainer:
        assert wait_for(lambda: drainer.sent == 3)
    assert sink.connects == 4
    assert [row.msg_id for row in sink.sent] == ["m0", "m1", "m2"]


def test_at_most_max_inflight_rows_are_unanswered_at_once(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    fill(database, 10)
    sink = ListSink()
    sink.answer_now = False
    with draining(database, sink) as drainer:
        assert wait_for(lambda: len(sink.sent) == FAST.max_inflight)
        time.sleep(0.3)
        assert len(sink.sent) == FAST.max_inflight
        sink.answer_now = True
        assert wait_for(lambda: drainer.sent == 10)


def test_stats_carry_the_drainers_own_outbox_figures(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    fill(database, 2)
    seen: list[tuple[dict[str, int], int, bool]] = []

    def stats(outbox: dict[str, int], inflight: int, connected: bool) -> dict[str, Any]:
        seen.append((outbox, inflight, connected))
        return {"kind": "stats"}

    settings = dataclasses.replace(FAST, stats_interval=0.1)
    sink = ListSink(lambda row, n: Verdict.REJECTED)
    with draining(database, sink, settings, stats=stats):
        assert wait_for(lambda: any(outbox["rejected"] == 2 for outbox, _, _ in seen))
    assert sink.stats
    assert all(connected for _, _, connected in seen)


def test_shutdown_delivers_the_backlog_then_says_goodbye(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    sink = ListSink()
    with draining(database, sink) as drainer:
        assert wait_for(lambda: sink.ready)
        fill(database, 3)
        drainer.kick()
    assert outbox_depth(database)["pending"] == 0
    assert sink.goodbyes == 1
