"""MQTT 5 PUBACK reason codes: which refusals pass (sent again) and which are final (kept, rejected).

mosquitto answers only "success" and "not authorized", so these tests use the fake broker of
`tests/fake_mqtt5.py`, which answers each PUBLISH with the code the test picks, against the
real paho-based MqttSink and the real Drainer over a real SQLite outbox.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from agent.service.drainer import Drainer, DrainSettings
from agent.service.mqtt_client import Broker
from agent.service.outbox import Row
from agent.service.sinks import Answer, Verdict
from agent.service.sinks.mqtt import TRANSIENT_CODES, MqttSink, verdict_of
from tests.agent_harness import outbox_depth
from tests.fake_mqtt5 import FakeBroker
from tests.test_drainer import fill, wait_for

PREFIX = "hpa-edge/scope"
SETTINGS = DrainSettings(
    max_inflight=4,
    reconnect_min=0.05,
    reconnect_max=0.2,
    stats_interval=0.0,
    flush_seconds=0.5,
    retry_seconds=0.05,
    outbox_retry=0.05,
)


def sink_for(broker: FakeBroker) -> MqttSink:
    return MqttSink(Broker(host="127.0.0.1", port=broker.port), "hpa-edge-scope", PREFIX, max_inflight=4)


def results_answered(code: int) -> FakeBroker:
    """A broker that answers `code` to results and accepts everything else (status, latest)."""
    return FakeBroker(lambda topic, payload: code if topic.endswith("/results") else 0x00)


@contextmanager
def draining(database: Path, broker: FakeBroker, settings: DrainSettings = SETTINGS) -> Iterator[Drainer]:
    drainer = Drainer(database, sink_for(broker), settings)
    drainer.start()
    try:
        yield drainer
    finally:
        drainer.shutdown(flush_seconds=0.5)
        assert not drainer.is_alive()


def answer_of(broker: FakeBroker) -> Answer:
    """The sink's answer for one results row, sent over a fresh connection to `broker`."""
    sink = sink_for(broker)
    answers: list[Answer] = []

    def turn() -> bool:  # what the drainer's loop does with a sink
        answers.extend(sink.poll(0.02))
        return True

    sink.connect()
    try:
        assert wait_for(lambda: turn() and sink.ready)
        token = sink.send(Row(1, "results", "m1", b"{}"))
        assert wait_for(lambda: turn() and any(answer.token == token for answer in answers))
    finally:
        sink.close(goodbye=False)
    (answer,) = [answer for answer in answers if answer.token == token]
    return answer


def reasons(database: Path) -> list[str]:
    with closing(sqlite3.connect(database)) as db:
        return [str(reason) for (reason,) in db.execute("SELECT reason FROM outbox ORDER BY seq")]


@pytest.mark.parametrize(
    ("code", "verdict"),
    [
        (0x00, Verdict.ACCEPTED),  # success
        (0x10, Verdict.ACCEPTED),  # no matching subscribers: the broker took it
        (0x80, Verdict.RETRY),  # unspecified error
        (0x83, Verdict.RETRY),  # implementation specific error
        (0x91, Verdict.RETRY),  # packet identifier in use
        (0x97, Verdict.RETRY),  # quota exceeded
        (0x87, Verdict.REJECTED),  # not authorized
        (0x90, Verdict.REJECTED),  # topic name invalid
        (0x99, Verdict.REJECTED),  # payload format invalid
    ],
    ids=lambda value: f"0x{value:02x}" if isinstance(value, int) else str(value),
)
def test_the_sink_classifies_each_puback_reason_code(code: int, verdict: Verdict) -> None:
    with results_answered(code) as broker:
        answer = answer_of(broker)
    assert answer.verdict == verdict
    if verdict != Verdict.ACCEPTED:
        assert answer.reason.endswith(f"({code})")


def test_failure_codes_not_listed_as_passing_are_final() -> None:
    unlisted = [code for code in range(0x80, 0x100) if code not in TRANSIENT_CODES]
    assert {verdict_of(code) for code in unlisted} == {Verdict.REJECTED}


def test_rows_refused_for_quota_are_sent_again_and_delivered_once_the_broker_accepts(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    fill(database, 2)
    accepting = False
    broker = FakeBroker(lambda topic, payload: 0x97 if topic.endswith("/results") and not accepting else 0x00)
    settings = dataclasses.replace(SETTINGS, retry_limit=20)  # far more than this test needs
    with broker, draining(database, broker, settings) as drainer:
        assert wait_for(
            lambda: all(broker.payloads("/results").count(f"payload {i}".encode()) >= 2 for i in (0, 1))
        )
        accepting = True
        assert wait_for(lambda: drainer.sent == 2)
        assert drainer.rejected == 0
    assert outbox_depth(database) == {"pending": 0, "rejected": 0}


def test_rows_refused_as_not_authorized_are_rejected_at_once_and_never_sent_again(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    fill(database, 2)
    with results_answered(0x87) as broker, draining(database, broker) as drainer:
        assert wait_for(lambda: drainer.rejected == 2)
        drainer.kick()
        time.sleep(0.5)  # ten retry pauses: a re-send would show
    assert len(broker.payloads("/results")) == 2
    assert outbox_depth(database) == {"pending": 0, "rejected": 2}
    assert reasons(database) == ["Not authorized (135)"] * 2


def test_a_row_still_refused_for_quota_after_the_retry_limit_is_rejected_with_the_last_reason(
    tmp_path: Path,
) -> None:
    database = tmp_path / "state.db"
    fill(database, 1)
    settings = dataclasses.replace(SETTINGS, retry_seconds=0.01, retry_limit=3)
    with results_answered(0x97) as broker, draining(database, broker, settings) as drainer:
        assert wait_for(lambda: drainer.rejected == 1)
    assert len(broker.payloads("/results")) == 4  # the first attempt and 3 re-sends
    assert outbox_depth(database) == {"pending": 0, "rejected": 1}
    assert reasons(database) == ["Quota exceeded (151), still after 4 attempts"]
