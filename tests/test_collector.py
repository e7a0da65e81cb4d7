"""The facility's collector: ingest, exactly-once storage, migrations, queries, and the MQTT side.

Database tests run on SQLite everywhere and on a throwaway PostgreSQL cluster (tests/postgres.py)
when Debian's postgresql binaries are installed (.ci/run installs them). MQTT tests start their
own mosquitto; the scale-out tests run real `hpa-edge collect` processes and kill one.
"""

from __future__ import annotations

import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.cli import main
from agent.collector import fleet, ingest, queries, schema, store
from agent.collector.collector import Collector, Settings
from agent.collector.database import Database, DatabaseError, open_database
from agent.model.messages import encode, error_document, msg_id
from agent.service.mqtt_client import Broker as MqttBroker
from agent.service.mqtt_client import make_client
from agent.stacks.labels import LOCATIONS
from tests.broker import Broker
from tests.postgres import Cluster, cluster

REPO = Path(__file__).resolve().parent.parent


# Fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def postgres() -> Iterator[Cluster]:
    with cluster() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'results.db'}"
    server: Cluster = request.getfixturevalue("postgres")
    return server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    opened = open_database(db_url)
    schema.migrate(opened)
    yield opened
    opened.close()


def results(n: int, instrument: str = "scope01", seed: int = 0) -> list[dict[str, Any]]:
    return list(fleet.results(instrument, n, seed))


def arrivals(docs: list[dict[str, Any]], kind: str = "results") -> list[tuple[ingest.Record, str]]:
    return [
        (ingest.parse(f"hpa-edge/{d['instrument']}/{kind}", encode(d)), "2026-11-22T08:00:00.000Z")
        for d in docs
    ]


def an_error(
    instrument: str, stack: str, code: str, time_: str = "2026-11-22T07:00:00.000Z"
) -> dict[str, Any]:
    return error_document(
        msg_id=msg_id(instrument, stack, "", "", kind="error"),
        instrument=instrument,
        stack_id=stack,
        code=code,
        message=f"{code} file",
        files={"red": {"name": f"{stack}_red.png", "sha256": ""}},
        moved_to="failed",
        time=time_,
    )


def count(db: Database, table: str) -> int:
    return int(db.rows(f"SELECT COUNT(*) FROM {table}")[1][0][0])


# Ingest -----------------------------------------------------------------------------------
def test_a_fleet_result_an_error_and_a_status_are_read() -> None:
    doc = results(1)[0]
    record = ingest.parse("hpa-edge/scope01/results", encode(doc))
    assert isinstance(record, ingest.Result)
    assert (record.msg_id, record.stack_id, record.labels) == (doc["msg_id"], doc["stack_id"], doc["labels"])
    error = ingest.parse("hpa-edge/scope01/errors", encode(an_error("scope01", "s1", "corrupt")))
    assert isinstance(error, ingest.Error)
    assert error.code == "corrupt"
    assert ingest.parse("lab/scope9/status", b"offline", retained=True) == ingest.Status(
        "scope9", "offline", True
    )


def _changed(**fields: Any) -> bytes:
    doc = results(1)[0]
    doc.update(fields)
    return encode({k: v for k, v in doc.items() if v is not None})


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("hpa-edge/s/results", b'{"kind": "result",', "malformed JSON"),
        ("hpa-edge/s/results", b"\xff\xfe", "not UTF-8"),
        ("hpa-edge/s/results", b"[1, 2]", "not a JSON object but list"),
        ("hpa-edge/s/results", _changed(schema_version=2), "unknown schema_version 2"),
        ("hpa-edge/s/errors", _changed(), "kind 'result' where 'error' was expected"),
        ("hpa-edge/s/results", _changed(msg_id="xyz"), "msg_id missing or not 32 hex digits"),
        ("hpa-edge/s/results", _changed(time="yesterday"), "is not ISO 8601"),
        ("hpa-edge/s/results", _changed(time="2026-11-22T06:10:02"), "has no time zone"),
        ("hpa-edge/s/results", _changed(labels=["Golgi"]), "labels missing or not a list of known locations"),
        ("hpa-edge/s/results", _changed(total_ms="fast"), "total_ms missing or not a finite number"),
        ("hpa-edge/s/results", _changed(review="yes"), "review is not true or false"),
        ("hpa-edge/s/results", _changed(stack_id=None), "stack_id missing"),
        ("hpa-edge/s/status", b"maybe", "unknown status 'maybe'"),
        ("hpa-edge/s/stats", b"{}", "does not read 'stats' topics"),
    ],
)
def test_bad_input_becomes_an_invalid_record_with_the_reason(topic: str, payload: bytes, reason: str) -> None:
    record = ingest.parse(topic, payload)
    assert isinstance(record, ingest.Invalid)
    assert reason in record.reason
    assert (record.topic, record.payload) == (topic, payload)


def test_a_result_of_a_bundle_the_facility_does_not_use_is_invalid() -> None:
    payload = encode(results(1)[0])
    assert isinstance(
        ingest.parse("hpa-edge/s/results", payload, known_bundles={fleet.BUNDLE["sha256"]}), ingest.Result
    )
    record = ingest.parse("hpa-edge/s/results", payload, known_bundles={"0" * 64})
    assert isinstance(record, ingest.Invalid)
    assert record.reason.startswith("unknown bundle 'lite0-int8-fleet'")


def test_times_are_stored_in_the_agents_form() -> None:
    assert ingest.normal_time("2026-11-22T07:10:02.5+01:00") == "2026-11-22T06:10:02.500Z"


# Storage: both databases ------------------------------------------------------------------
def test_each_msg_id_is_stored_once_whatever_the_redeliveries(db: Database) -> None:
    docs = results(30)
    errors = [an_error("scope01", f"s{i}", "corrupt") for i in range(3)]
    batch = arrivals(docs) + arrivals(errors, "errors")
    with db.transaction() as tx:
        first = store.write(tx, batch, "c1")
    with db.transaction() as tx:
        again = store.write(tx, batch[:10] + batch[-2:], "c2")
    assert (first.results, first.errors, first.duplicates) == (30, 3, 0)
    assert (again.results, again.errors, again.duplicates) == (0, 0, 12)
    assert count(db, "results") == 30
    assert count(db, "errors") == 3
    assert count(db, "result_labels") == sum(len(d["labels"]) for d in docs)
    _, rows = db.rows("SELECT received_by, COUNT(*) FROM results GROUP BY received_by")
    assert [tuple(r) for r in rows] == [("c1", 30)]


def test_a_result_row_holds_every_field(db: Database) -> None:
    doc = results(1)[0]
    with db.transaction() as tx:
        store.write(tx, arrivals([doc]), "c1")
    names, rows = db.rows("SELECT * FROM results")
    row = queries.plain(names, rows[0])
    assert row["msg_id"] == doc["msg_id"]
    assert row["time"] == doc["time"]
    assert row["labels"] == doc["labels"]
    assert row["scores"] == doc["scores"]
    assert row["files"] == doc["files"]
    assert (row["bundle_id"], row["bundle_sha256"], row["purpose"]) == (
        doc["bundle_id"], doc["bundle_sha256"], doc["purpose"],
    )  # fmt: skip
    assert row["total_ms"] == pytest.approx(doc["total_ms"])
    assert row["review"] is doc["review"]
    assert row["review_reasons"] == doc["review_reasons"]
    document = row["document"]
    assert (json.loads(document) if isinstance(document, str) else document) == doc


def test_status_history_keeps_the_changes(db: Database) -> None:
    sequence = ["online", "online", "offline", "offline", "online"]
    for i, status in enumerate(sequence):
        with db.transaction() as tx:
            store.write(tx, [(ingest.Status("scope01", status, i == 0), f"2026-11-22T08:00:0{i}.000Z")], "c")
    _, rows = db.rows("SELECT status FROM status WHERE instrument = 'scope01' ORDER BY received_at")
    assert [r[0] for r in rows] == ["online", "offline", "online"]


def test_the_same_bad_message_is_kept_once(db: Database) -> None:
    bad = (ingest.parse("hpa-edge/s/results", b"not json"), "2026-11-22T08:00:00.000Z")
    for _ in range(3):
        with db.transaction() as tx:
            store.write(tx, [bad], "c")
    _, rows = db.rows("SELECT topic, payload, reason FROM invalid")
    assert len(rows) == 1
    assert bytes(rows[0][1]) == b"not json"
    assert rows[0][2].startswith("malformed JSON")


# Migrations -------------------------------------------------------------------------------
def test_a_version_1_database_is_migrated_to_2_with_its_rows_filled_in(db_url: str) -> None:
    db = open_database(db_url)
    assert schema.migrate(db, target=1) == [1]
    assert schema.version(db) == 1
    docs = results(12)
    flagged = [d for d in docs if d["review"]]
    assert flagged
    with db.transaction() as tx:  # rows as a version-1 collector wrote them
        tx.executemany(
            "INSERT INTO results (msg_id, instrument, stack_id, time, received_at, labels, n_labels, scores, "
            "files, bundle_id, bundle_sha256, purpose, total_ms, document) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (d["msg_id"], d["instrument"], d["stack_id"], d["time"], d["time"], json.dumps(d["labels"]),
                 d["n_labels"], json.dumps(d["scores"]), json.dumps(d["files"]), d["bundle_id"],
                 d["bundle_sha256"], d["purpose"], d["total_ms"], json.dumps(d))
                for d in docs
            ],
        )  # fmt: skip
    assert "review" not in schema.columns(db, "results")
    assert schema.migrate(db) == [2]
    assert schema.version(db) == schema.LATEST == 2
    assert {"review", "review_reasons", "near_threshold", "novelty", "received_by"} <= set(
        schema.columns(db, "results")
    )
    assert count(db, "result_labels") == sum(len(d["labels"]) for d in docs)
    _, rows = db.rows("SELECT msg_id FROM results WHERE review = TRUE ORDER BY msg_id")
    assert [r[0] for r in rows] == sorted(d["msg_id"] for d in flagged)
    assert schema.migrate(db) == []  # a second start changes nothing
    _, history = db.rows("SELECT version FROM schema_version ORDER BY version")
    assert [r[0] for r in history] == [1, 2]
    db.close()


def test_a_database_newer_than_the_code_is_refused(db: Database) -> None:
    with db.transaction() as tx:
        tx.execute("INSERT INTO schema_version (version, applied_at, note) VALUES (99, ?, 'future')", (
            "2030-01-01T00:00:00.000Z",))  # fmt: skip
    with pytest.raises(DatabaseError, match="newer than this hpa-edge knows"):
        schema.migrate(db)


def test_a_bad_database_url_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="expected sqlite:///PATH or postgresql://"):
        open_database("mysql://x")
    with pytest.raises(DatabaseError, match="does not exist"):
        open_database(f"sqlite:///{tmp_path}/missing/r.db")


# Queries ----------------------------------------------------------------------------------
@pytest.fixture
def filled(db: Database) -> tuple[Database, list[dict[str, Any]]]:
    docs = results(40, "scope01") + results(25, "scope02", seed=1)
    for i, d in enumerate(docs):
        d["time"] = f"2026-11-{10 + i % 10:02d}T12:00:00.000Z"
        d["stack_id"] = f"P{17 + i % 2}-{i:03d}"
    errors = [an_error("scope01", "a", "corrupt"), an_error("scope02", "b", "corrupt"),
              an_error("scope02", "c", "truncated")]  # fmt: skip
    bad = [(ingest.parse("hpa-edge/scope03/results", b"{oops"), "2026-11-22T08:00:00.000Z")]
    status: list[tuple[ingest.Record, str]] = [
        (ingest.Status("scope02", "online", True), "2026-11-22T08:00:00.000Z")
    ]
    with db.transaction() as tx:
        store.write(tx, arrivals(docs) + arrivals(errors, "errors") + bad + status, "c")
    return db, docs


def test_the_location_query_finds_the_stacks_with_that_label(filled: Any) -> None:
    db, docs = filled
    common = Counter(name for d in docs for name in d["labels"]).most_common(1)[0][0]
    golgi = [
        d for d in docs
        if common in d["labels"] and d["stack_id"].startswith("P17") and d["time"] >= "2026-11-15"
    ]  # fmt: skip
    assert golgi
    names, rows = queries.run(db, "location", {"location": common, "stack": "P17%", "since": "2026-11-15"})
    assert names == ["time", "instrument", "stack_id", "labels", "bundle_id", "review"]
    assert sorted(r["stack_id"] for r in rows) == sorted(d["stack_id"] for d in golgi)
    assert all(common in r["labels"] and r["bundle_id"] == fleet.BUNDLE["id"] for r in rows)
    assert [r["time"] for r in rows] == sorted(r["time"] for r in rows)


def test_the_summary_queries_count_what_was_stored(filled: Any) -> None:
    db, docs = filled
    _, instruments = queries.run(db, "instruments", {})
    by_name = {r["instrument"]: r for r in instruments}
    assert set(by_name) == {"scope01", "scope02"}
    assert (by_name["scope01"]["results"], by_name["scope02"]["results"]) == (40, 25)
    assert by_name["scope02"]["flagged"] == sum(1 for d in docs[40:] if d["review"])
    assert (by_name["scope01"]["errors"], by_name["scope02"]["errors"]) == (1, 2)
    assert (by_name["scope01"]["status"], by_name["scope02"]["status"]) == (None, "online")
    _, bundles = queries.run(db, "bundles", {})
    assert [(b["bundle_id"], b["results"], b["instruments"]) for b in bundles] == [
        (fleet.BUNDLE["id"], 65, 2)
    ]
    _, errors = queries.run(db, "errors", {})
    assert [(e["code"], e["errors"], e["instruments"]) for e in errors] == [
        ("corrupt", 2, 2),
        ("truncated", 1, 1),
    ]
    _, review = queries.run(db, "review", {"instrument": "scope01"})
    assert len(review) == sum(1 for d in docs[:40] if d["review"])
    assert all(r["review_reasons"] for r in review)
    _, window = queries.run(db, "results", {"since": "2026-11-12", "until": "2026-11-13", "bundle": "lite0%"})
    assert len(window) == sum(1 for d in docs if d["time"].startswith("2026-11-12"))
    _, invalid = queries.run(db, "invalid", {})
    assert [(i["topic"], i["reason"][:14]) for i in invalid] == [
        ("hpa-edge/scope03/results", "malformed JSON")
    ]


def test_hpa_edge_query_prints_a_table_and_json(filled: Any, db_url: str, capsys: Any) -> None:
    assert main(["query", "errors", "--db", db_url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["code", "errors", "instruments", "first", "last"]
    assert lines[1].split()[:3] == ["corrupt", "2", "2"]
    assert lines[-1] == "(2 rows)"
    assert main(["query", "review", "--db", db_url, "--json", "--limit", "3"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 3
    assert all(isinstance(row["review_reasons"], list) for row in rows)
    assert main(["query", "location", "--db", db_url]) == 2
    assert main(["query", "location", "--location", "Golgi", "--db", db_url]) == 2
    assert main(["query", "errors", "--since", "last week", "--db", db_url]) == 2


def test_query_refuses_a_database_that_is_not_the_collectors(tmp_path: Path, capsys: Any) -> None:
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE x (a)").connection.commit()
    assert main(["query", "errors", "--db", f"sqlite:///{tmp_path / 'other.db'}"]) == 1
    assert "collect --migrate-only" in capsys.readouterr().err


def test_the_docs_show_every_canned_query_as_it_runs() -> None:
    text = (REPO / "docs" / "collector.md").read_text()
    for name, query in queries.QUERIES.items():
        assert f"```sql\n{query.sql};\n```" in text, name


def test_the_grafana_panel_query_runs_on_postgresql(postgres: Cluster) -> None:
    text = (REPO / "docs" / "collector.md").read_text()
    panel = re.search(r"### Grafana.*?```sql\n(.*?)```", text, re.S)
    assert panel
    docs = results(20)
    first, last = min(d["time"] for d in docs), max(d["time"] for d in docs)
    # Grafana's PostgreSQL macros, expanded as its documentation gives them
    sql = (
        panel.group(1)
        .replace("$__timeGroupAlias(r.time, '1h')", 'floor(extract(epoch from r.time)/3600)*3600 AS "time"')
        .replace("$__timeFilter(r.time)", f"r.time BETWEEN '{first}' AND '{last}'")
    )
    assert "$__" not in sql
    url = postgres.create_database(f"g_{uuid.uuid4().hex[:12]}")
    db = open_database(url)
    schema.migrate(db)
    with db.transaction() as tx:
        store.write(tx, arrivals(docs), "c")
    _, rows = db.rows(sql)
    assert sum(r[2] for r in rows) == sum(len(d["labels"]) for d in docs)
    assert {r[1] for r in rows} <= set(LOCATIONS)
    db.close()


# The loop without a broker: what is held, what is refused ---------------------------------
def _message(topic: str, payload: bytes, mid: int) -> Any:
    return SimpleNamespace(topic=topic, payload=payload, retain=False, mid=mid, qos=1)


def test_a_batch_the_database_refuses_is_written_one_by_one(postgres: Cluster) -> None:
    """PostgreSQL refuses a NUL in text: that message goes to invalid, the others are stored."""
    db = open_database(postgres.create_database(f"n_{uuid.uuid4().hex[:12]}"))
    schema.migrate(db)
    collector = Collector(db, MqttBroker("127.0.0.1", 1), Settings(client_id="t"), log=lambda _: None)
    docs = results(5)
    docs[2]["stack_id"] = "bad\u0000stack"
    for i, doc in enumerate(docs):
        collector._on_message(None, None, _message("hpa-edge/scope01/results", encode(doc), i + 1))
    assert collector.flush()
    assert count(db, "results") == 4
    _, rows = db.rows("SELECT reason FROM invalid")
    assert len(rows) == 1
    assert rows[0][0].startswith("refused by the database")
    assert collector.pending == []
    db.close()


def test_a_locked_database_holds_the_batch_unacknowledged(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.db'}"
    db = open_database(url)
    schema.migrate(db)
    db.connection.execute("PRAGMA busy_timeout = 50")  # type: ignore[attr-defined]
    lines: list[str] = []
    collector = Collector(db, MqttBroker("127.0.0.1", 1), Settings(client_id="t"), log=lines.append)
    acked: list[int] = []
    collector.client.ack = lambda mid, qos: acked.append(mid)
    collector.connected = True
    for i, doc in enumerate(results(3)):
        collector._on_message(None, None, _message("hpa-edge/scope01/results", encode(doc), i + 1))
    other = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    assert collector.flush() is False
    assert (len(collector.pending), acked) == (3, [])
    assert any("event=database_unavailable" in line for line in lines)
    other.execute("COMMIT")
    collector._retry_at = 0
    assert collector.flush() is True
    assert (acked, count(db, "results")) == ([1, 2, 3], 3)
    assert any("event=database_recovered" in line for line in lines)
    db.close()


def test_a_stopping_collector_writes_everything_it_holds(tmp_path: Path) -> None:
    db = open_database(f"sqlite:///{tmp_path / 'r.db'}")
    schema.migrate(db)
    settings = Settings(client_id="t", batch=2)
    collector = Collector(db, MqttBroker("127.0.0.1", 1), settings, log=lambda _: None)
    for i, doc in enumerate(results(5)):
        collector._on_message(None, None, _message("hpa-edge/scope01/results", encode(doc), i + 1))
    stop = threading.Event()
    stop.set()
    assert collector.run(stop) == 0
    assert (count(db, "results"), collector.pending) == (5, [])
    db.close()


# Against mosquitto ------------------------------------------------------------------------
def _publish(port: int, items: list[tuple[str, bytes]]) -> None:
    client = make_client(MqttBroker("127.0.0.1", port))
    client.connect("127.0.0.1", port)
    client.loop_start()
    for topic, payload in items:
        client.publish(topic, payload, qos=1).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


@pytest.mark.integration
def test_collect_stores_a_fleet_and_keeps_bad_input_aside(tmp_path: Path, db_url: str) -> None:
    broker = Broker(tmp_path / "broker", extra="allow_anonymous true\nmax_queued_messages 0\n").start()
    db = open_database(db_url)
    schema.migrate(db)
    collector = Collector(
        db, MqttBroker("127.0.0.1", broker.port), Settings(client_id="c1"), log=lambda _: None
    )
    stop = threading.Event()
    thread = threading.Thread(target=collector.run, args=(stop,))
    thread.start()
    try:
        assert collector.subscribed.wait(10)
        error = encode(an_error("scope09", "x", "corrupt"))
        bad = [("hpa-edge/scope09/results", b"{broken"), ("hpa-edge/scope09/results", b"[]")]
        _publish(broker.port, [*bad, ("hpa-edge/scope09/errors", error)])
        run = fleet.publish(MqttBroker("127.0.0.1", broker.port), instruments=4, per_instrument=100)
        deadline = time.monotonic() + 30
        while collector.counts.results < run.published and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(30)
        broker.stop()
    assert count(db, "results") == 400
    assert count(db, "errors") == 1
    assert count(db, "invalid") == 2
    assert count(db, "status") == 4  # each simulated instrument said online once
    assert collector.counts.duplicates == 0
    db.close()


@pytest.mark.integration
def test_while_the_database_is_locked_the_broker_keeps_the_rest(tmp_path: Path) -> None:
    """At most Receive Maximum messages are held unacknowledged; the broker queues the others."""
    broker = Broker(tmp_path / "broker", extra="allow_anonymous true\nmax_queued_messages 0\n").start()
    db = open_database(f"sqlite:///{tmp_path / 'r.db'}")
    schema.migrate(db)
    db.connection.execute("PRAGMA busy_timeout = 50")  # type: ignore[attr-defined]
    settings = Settings(client_id="c1", receive_maximum=20, batch=10)
    collector = Collector(db, MqttBroker("127.0.0.1", broker.port), settings, log=lambda _: None)
    lock = sqlite3.connect(tmp_path / "r.db", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")
    stop = threading.Event()
    thread = threading.Thread(target=collector.run, args=(stop,))
    thread.start()
    try:
        assert collector.subscribed.wait(10)
        fleet.publish(MqttBroker("127.0.0.1", broker.port), instruments=2, per_instrument=50)
        time.sleep(0.5)
        assert len(collector.pending) == 20
        lock.execute("ROLLBACK")
        deadline = time.monotonic() + 30
        while collector.counts.results < 100 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join(30)
        broker.stop()
    assert count(db, "results") == 100
    db.close()


def _collect(port: int, db_url: str, client_id: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "collect", "--broker", f"127.0.0.1:{port}", "--db", db_url,
         "--client-id", client_id, "--stats-interval", "3600", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip


def _wait_for_line(process: subprocess.Popen[str], text: str, timeout: float = 30) -> list[str]:
    assert process.stderr is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            threading.Thread(target=process.stderr.read, daemon=True).start()  # keep the pipe drained
            return lines
    raise AssertionError(f"{text!r} not seen: {''.join(lines)}")


def _rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path, timeout=30) as con:
        return con.execute(sql).fetchall()


@pytest.mark.integration
def test_a_collector_killed_before_its_commit_loses_nothing(tmp_path: Path) -> None:
    """The database is locked, so nothing can be committed: the collector holds the messages
    unacknowledged; SIGKILL; the restarted collector (same client id) gets them again."""
    broker = Broker(tmp_path / "broker", extra="allow_anonymous true\nmax_queued_messages 0\n").start()
    path = tmp_path / "r.db"
    url = f"sqlite:///{path}"
    assert main(["collect", "--db", url, "--migrate-only"]) == 0
    first = _collect(broker.port, url, "c1")
    try:
        _wait_for_line(first, "event=subscribed")
        lock = sqlite3.connect(path, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        fleet.publish(MqttBroker("127.0.0.1", broker.port), instruments=2, per_instrument=50)
        time.sleep(1.0)  # received, and failing to commit
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        lock.execute("ROLLBACK")
        assert _rows(path, "SELECT COUNT(*) FROM results") == [(0,)]
        second = _collect(broker.port, url, "c1")
        lines = _wait_for_line(second, "event=connected")
        assert "session_present=1" in lines[-1]
        deadline = time.monotonic() + 30
        while _rows(path, "SELECT COUNT(*) FROM results") != [(100,)] and time.monotonic() < deadline:
            time.sleep(0.1)
        second.terminate()
        assert second.wait(30) == 0
    finally:
        for process in (first, locals().get("second")):
            if process is not None and process.poll() is None:
                process.kill()
        broker.stop()
    assert _rows(path, "SELECT COUNT(*), COUNT(DISTINCT msg_id) FROM results") == [(100, 100)]


@pytest.mark.integration
def test_killing_one_of_two_collectors_mid_stream_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    broker = Broker(tmp_path / "broker", extra="allow_anonymous true\nmax_queued_messages 0\n").start()
    path = tmp_path / "r.db"
    url = f"sqlite:///{path}"
    total = 10 * 300
    group = ["--group", "lab", "--batch", "50"]
    a = _collect(broker.port, url, "collector-a", *group)
    b = _collect(broker.port, url, "collector-b", *group)
    processes = [a, b]
    try:
        _wait_for_line(a, "event=subscribed")
        _wait_for_line(b, "event=subscribed")
        publishing = threading.Thread(
            target=fleet.publish,
            args=(MqttBroker("127.0.0.1", broker.port), 10, 300),
            kwargs={"inflight": 20},
        )
        publishing.start()
        deadline = time.monotonic() + 60
        while _rows(path, "SELECT COUNT(*) FROM results")[0][0] < total // 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        a.send_signal(signal.SIGKILL)  # mid-stream: batches in flight, unacknowledged
        a.wait(10)
        killed_at = _rows(path, "SELECT COUNT(*) FROM results")[0][0]
        time.sleep(0.5)
        again = _collect(broker.port, url, "collector-a", *group)  # systemd's Restart=always
        processes.append(again)
        publishing.join(120)
        deadline = time.monotonic() + 60
        while _rows(path, "SELECT COUNT(*) FROM results")[0][0] < total and time.monotonic() < deadline:
            time.sleep(0.1)
        for process in (b, again):
            process.terminate()
            assert process.wait(30) == 0
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
        broker.stop()
    assert killed_at < total
    assert _rows(path, "SELECT COUNT(*), COUNT(DISTINCT msg_id) FROM results") == [(total, total)]
    split = dict(_rows(path, "SELECT received_by, COUNT(*) FROM results GROUP BY received_by"))
    assert set(split) == {"collector-a", "collector-b"}
    assert min(split.values()) > total // 10


@pytest.mark.integration
def test_collect_bench_measures_a_backlog_split_between_two_collectors(
    postgres: Cluster, capsys: Any
) -> None:
    url = postgres.create_database(f"b_{uuid.uuid4().hex[:12]}")
    code = main(["collect-bench", "--db", url, "--collectors", "2", "--instruments", "4",
                 "--per-instrument", "50", "--mode", "backlog", "--json"])  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (report["results"], report["stored"]) == (200, 200)
    assert sorted(report["by_collector"].values()) == [100, 100]  # round-robin between the two
    assert report["store_rate"] > 0


def test_collect_refuses_bad_options(tmp_path: Path, capsys: Any) -> None:
    assert main(["collect", "--protocol", "3.1.1", "--db", f"sqlite:///{tmp_path}/r.db"]) == 2
    assert "needs MQTT 5" in capsys.readouterr().err
    assert main(["collect", "--db", "oracle://x"]) == 1
    assert main(["collect", "--db", f"sqlite:///{tmp_path}/r.db", "--migrate-only"]) == 0
    assert schema.version(open_database(f"sqlite:///{tmp_path}/r.db")) == schema.LATEST


def test_shared_subscriptions_and_a_fixed_client_id() -> None:
    settings = Settings(prefix="lab", group="g")
    assert settings.subscriptions() == [
        "$share/g/lab/+/results",
        "$share/g/lab/+/errors",
        "$share/g/lab/+/status",
    ]
    assert Settings().subscriptions()[0] == "hpa-edge/+/results"
    collector = Collector(
        open_database("sqlite:///:memory:"), MqttBroker(), Settings(group="g"), log=lambda _: None
    )
    assert collector.client_id.startswith("hpa-edge-collect-g-")
    properties = collector._connect_properties()
    assert (properties.SessionExpiryInterval, properties.ReceiveMaximum) == (7 * 24 * 3600, 1000)
