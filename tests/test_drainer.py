"""The outbox drainer's policy, with a sink written here in a few lines.

The drainer must work with any sink: these tests give it one that is not MQTT (it answers
as the test says), with the real SQLite outbox underneath. The MQTT sink itself is tested
against a real mosquitto in test_agent_mqtt.py and the fault suite.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from agent.service import log
from agent.service.drainer import Drainer, DrainSettings
from agent.service.outbox import Row
from agent.service.sinks import Answer, SinkUnavailableError, Verdict
from agent.service.state import Ledger, Message, Record
from tests.agent_harness import outbox_depth

FAST = DrainSettings(
    max_inflight=4,
    reconnect_min=0.05,
    reconnect_max=0.2,
    stats_interval=0.0,
    flush_seconds=1.0,
    outbox_retry=0.05,
)


class ListSink:
    """Keeps what it is sent; answers each row as `verdict(row, attempt)` says, on the next poll."""

    name = "list://test"

    def __init__(self, verdict: Callable[[Row, int], Verdict] = lambda row, n: Verdict.ACCEPTED) -> None:
        self.verdict = verdict
        self.sent: list[Row] = []
        self.stats: list[bytes] = []
        self.statuses: list[bytes] = []
        self.lost = False  # set by a test: the next poll finds the link gone
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
        if self.lost:
            self.lost, self._ready = False, False
            raise SinkUnavailableError("lost by the test")
        if not self.answer_now:
            return []
        with self._lock:
            tokens, self._unanswered = self._unanswered, {}
        attempts = {token: sum(r.seq == row.seq for r in self.sent[:token]) for token, row in tokens.items()}
        return [Answer(t, self.verdict(row, attempts[t]), "test") for t, row in tokens.items()]

    def send_status(self, payload: bytes) -> None:
        self.statuses.append(payload)

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


class Events(logging.Handler):
    """The agent's log events, parsed, as a list of dicts."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[dict[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(log.parse_line(record.getMessage()))

    def named(self, name: str) -> list[dict[str, str]]:
        return [event for event in self.seen if event.get("event") == name]


@pytest.fixture
def events() -> Iterator[Events]:
    handler = Events()
    level = log.LOGGER.level
    log.LOGGER.addHandler(handler)
    log.LOGGER.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        log.LOGGER.removeHandler(handler)
        log.LOGGER.setLevel(level)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs: a real disk that fills up."""
    path = tmp_path / "disk"
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_up(disk: Path) -> Path:
    """Write a file until the disk has no byte left; deleting it gives the space back."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as out:
        for size in (65536, 4096, 512, 1):
            while True:
                try:
                    out.write(b"\0" * size)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return filler


def truncate_wal(database: Path) -> None:
    """Empty the write-ahead log, so the next write needs new disk space (not reused WAL pages)."""
    db = sqlite3.connect(database)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()


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


def test_a_status_set_is_sent_at_once_and_again_after_a_reconnect(tmp_path: Path) -> None:
    from agent.model import messages

    database = tmp_path / "state.db"
    fill(database, 0)
    sink = ListSink()
    with draining(database, sink) as drainer:
        assert wait_for(lambda: sink.ready)
        drainer.set_status(messages.DEGRADED)
        assert wait_for(lambda: sink.statuses == [messages.DEGRADED])
        sink.lost = True  # the link drops; the sink says online by itself on the next connect
        assert wait_for(lambda: sink.statuses == [messages.DEGRADED, messages.DEGRADED])
        drainer.set_status(messages.ONLINE)
        assert wait_for(lambda: sink.statuses[-1] == messages.ONLINE)


def test_reopen_reads_the_database_file_now_at_the_path(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    fill(database, 1)
    sink = ListSink()
    with draining(database, sink) as drainer:
        assert wait_for(lambda: drainer.sent == 1)
        for suffix in ("", "-wal", "-shm"):
            Path(str(database) + suffix).unlink(missing_ok=True)
        fill(database, 2)  # a new file at the path, as the agent's restore makes
        drainer.reopen()
        assert wait_for(lambda: drainer.sent == 3)


def test_shutdown_delivers_the_backlog_then_says_goodbye(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    sink = ListSink()
    with draining(database, sink) as drainer:
        assert wait_for(lambda: sink.ready)
        fill(database, 3)
        drainer.kick()
    assert outbox_depth(database)["pending"] == 0
    assert sink.goodbyes == 1


def test_answers_that_cannot_be_written_on_a_full_disk_are_kept_and_written_when_space_returns(
    small_disk: Path, events: Events
) -> None:
    database = small_disk / "state.db"
    fill(database, 6)
    sink = ListSink()
    sink.answer_now = False
    with draining(database, sink) as drainer:
        assert wait_for(lambda: len(sink.sent) == FAST.max_inflight)
        truncate_wal(database)
        filler = fill_up(small_disk)
        sink.answer_now = True  # the answers arrive while nothing can be written
        assert wait_for(lambda: bool(events.named("outbox_write_failed")))
        time.sleep(0.5)  # many retry pauses of 0.05 s
        assert drainer.is_alive()
        assert drainer.failure is None
        assert drainer.sent == 0
        assert len(sink.sent) == FAST.max_inflight  # answered rows are not sent again, nor new ones
        filler.unlink()
        assert wait_for(lambda: drainer.sent == 6)
    assert len(events.named("outbox_write_failed")) == 1
    assert [event["side"] for event in events.named("outbox_recovered")] == ["write"]
    assert all(sink.attempts(f"m{i}") == 1 for i in range(6))
    assert outbox_depth(database) == {"pending": 0, "rejected": 0}


def test_an_outbox_that_cannot_be_opened_at_start_is_opened_when_space_returns(
    small_disk: Path, events: Events
) -> None:
    database = small_disk / "state.db"
    fill(database, 3)
    filler = fill_up(small_disk)
    sink = ListSink()
    with draining(database, sink) as drainer:
        assert wait_for(lambda: bool(events.named("outbox_unreadable")))
        beat = drainer.beat
        assert wait_for(lambda: drainer.beat > beat)  # alive for the watchdog while it waits
        assert drainer.is_alive()
        assert not sink.sent
        filler.unlink()
        assert wait_for(lambda: drainer.sent == 3)
    assert len(events.named("outbox_unreadable")) == 1
    assert [event["side"] for event in events.named("outbox_recovered")] == ["read"]
    assert outbox_depth(database) == {"pending": 0, "rejected": 0}


class BlockingSink(ListSink):
    """Its connect blocks until the test releases it, as a name lookup that gets no answer does."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.returned = False
        self.closed_by: list[str] = []  # threads that called close after the connect returned

    def connect(self) -> None:
        self.entered.set()
        self.release.wait()
        super().connect()
        self.returned = True

    def close(self, goodbye: bool) -> None:
        if self.returned:
            self.closed_by.append(threading.current_thread().name)
        super().close(goodbye)


def beats_after(drainer: Drainer, beat: float) -> Callable[[], bool]:
    return lambda: drainer.beat > beat


def connect_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "test-connect"]


def test_a_connect_that_blocks_does_not_stop_the_beat_and_is_logged_slow_once(
    tmp_path: Path, events: Events
) -> None:
    database = tmp_path / "state.db"
    fill(database, 2)
    sink = BlockingSink()
    settings = dataclasses.replace(FAST, connect_slow_seconds=0.2)
    try:
        with draining(database, sink, settings) as drainer:
            assert sink.entered.wait(10)
            for _ in range(3):  # the loop keeps turning while the connect hangs
                assert wait_for(beats_after(drainer, drainer.beat))
            assert wait_for(lambda: bool(events.named("test_connect_slow")))
            sink.release.set()
            assert wait_for(lambda: drainer.sent == 2)
    finally:
        sink.release.set()
    assert len(events.named("test_connect_slow")) == 1
    assert sink.connects == 1


def test_a_connect_still_running_at_shutdown_is_left_behind_and_closed_when_it_returns(
    tmp_path: Path,
) -> None:
    database = tmp_path / "state.db"
    sink = BlockingSink()
    try:
        with draining(database, sink) as drainer:
            assert sink.entered.wait(10)
        assert not drainer.is_alive()  # shutdown did not wait for the connect
        assert sink.closed_by == []  # nor did it touch the sink while the connect ran
    finally:
        sink.release.set()
    assert wait_for(lambda: not connect_threads())
    assert sink.closed_by == ["test-connect"]
    assert not sink.ready


class StuckSink(ListSink):
    """Its poll hangs once `stuck` is set, as a publisher blocked in a send would."""

    def __init__(self) -> None:
        super().__init__()
        self.stuck = threading.Event()
        self.inside = threading.Event()
        self.release = threading.Event()

    def poll(self, timeout: float) -> list[Answer]:
        if self.stuck.is_set():
            self.inside.set()
            self.release.wait()
        return super().poll(timeout)


def test_a_sink_stuck_in_poll_stops_the_beat_for_the_watchdog_to_see(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    sink = StuckSink()
    try:
        with draining(database, sink) as drainer:
            assert wait_for(lambda: sink.ready)
            sink.stuck.set()
            assert sink.inside.wait(10)
            beat = drainer.beat
            time.sleep(0.3)  # six polls' worth
            assert drainer.beat == beat
            sink.release.set()
            assert wait_for(beats_after(drainer, beat))
    finally:
        sink.release.set()


# Run inside a private mount namespace whose /etc/resolv.conf names a DNS server that never
# answers: the real MQTT sink's connect then hangs in the resolver, as with a dead DNS server.
SILENT_DNS_SCRIPT = """
import json, sys, threading, time
from pathlib import Path
from agent.service import log
from agent.service.drainer import Drainer, DrainSettings
from agent.service.mqtt_client import Broker
from agent.service.sinks.mqtt import MqttSink

seen = []
log.setup("debug", stream=sys.stderr)
log.LOGGER.addHandler(type("H", (__import__("logging").Handler,), {
    "emit": lambda self, record: seen.append(log.parse_line(record.getMessage())["event"])})())
sink = MqttSink(Broker(host="broker.hpa-edge.test", port=1883), "t", "hpa-edge/t", 4)
settings = DrainSettings(reconnect_min=60, reconnect_max=60, stats_interval=0, connect_slow_seconds=1.0)
drainer = Drainer(Path(sys.argv[1]), sink, settings)
start = time.monotonic()
drainer.start()
stalest = 0.0
while "mqtt_connect_failed" not in seen and time.monotonic() - start < 60:
    stalest = max(stalest, time.monotonic() - drainer.beat)
    time.sleep(0.02)
took = time.monotonic() - start
drainer.shutdown(flush_seconds=0)
print(json.dumps({"events": seen, "connect_s": took, "stalest_beat_s": stalest, "alive": drainer.is_alive()}))
"""


@pytest.fixture
def silent_dns(tmp_path: Path) -> Iterator[Path]:
    """A resolv.conf naming a UDP port 53 on a loopback address that takes queries and never answers."""
    import random
    import shutil
    import socket

    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    address = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}.{random.randint(2, 254)}"
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        server.bind((address, 53))
    except OSError as exc:
        server.close()
        pytest.skip(f"cannot listen on {address}:53 (needs root): {exc}")
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {address}\noptions timeout:3 attempts:1\n")
    try:
        yield resolv
    finally:
        server.close()


def test_a_dns_server_that_never_answers_does_not_stop_the_beat(tmp_path: Path, silent_dns: Path) -> None:
    import json
    import os
    import sys

    repo = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [
            "unshare",
            "--mount",
            "sh",
            "-c",
            'mount --bind "$0" /etc/resolv.conf && exec "$1" -c "$2" "$3"',
            str(silent_dns),
            sys.executable,
            SILENT_DNS_SCRIPT,
            str(tmp_path / "state.db"),
        ],
        capture_output=True,
        text=True,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": str(repo)},
        timeout=120,
        check=False,
    )
    if done.returncode != 0 and not done.stdout:
        pytest.skip(f"cannot bind-mount a resolv.conf in a private mount namespace: {done.stderr.strip()}")
    result = json.loads(done.stdout)
    if result["connect_s"] < 2.5:
        pytest.skip(f"this machine's name lookups do not go through /etc/resolv.conf: {result}")
    assert result["events"].count("mqtt_connect_slow") == 1
    assert "mqtt_connect_failed" in result["events"]
    assert result["stalest_beat_s"] < result["connect_s"] / 2  # the lookup hung, the loop did not
    assert not result["alive"]


@pytest.mark.integration
def test_wake_ends_the_mqtt_sinks_poll_early(broker: Any) -> None:
    """What lets a committed result leave at once instead of at the end of the drainer's poll."""
    from agent.service.mqtt_client import Broker as MqttBroker
    from agent.service.sinks.mqtt import MqttSink

    sink = MqttSink(MqttBroker("127.0.0.1", broker.port), "wake-test", "hpa-edge/wake", 5)
    sink.connect()
    try:
        assert wait_for(lambda: bool(sink.poll(0.05) is not None and sink.ready))
        waker = threading.Timer(0.2, sink.wake)
        waker.start()
        started = time.monotonic()
        sink.poll(30.0)
        assert time.monotonic() - started < 15.0  # woken, not the 30 s timeout
        waker.join()
    finally:
        sink.close(goodbye=False)
