"""The collector's tables and their numbered migrations; `migrate` brings any database up to date.

`schema_version` holds one row per migration applied (version, when, what). `migrate` runs
every step above the database's version, each in its own transaction with the step's row, so
a collector killed mid-migration leaves the database at the previous version, and two
collectors starting together take turns (SQLite's write lock, PostgreSQL's advisory lock).
A database newer than this code is refused rather than written to.

Version 1: results, errors, status history, invalid input. Version 2 (the trust fields of
issue 16): the results' review flag, reasons, near-threshold locations and novelty as columns,
one `result_labels` row per (result, location) for queries by location, which collector
received each row, and indexes for the canned queries; existing rows are filled in from the
documents they keep. The tables, column by column: docs/collector.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from agent.collector.database import Database, DatabaseError, Transaction, ddl
from agent.model.messages import utc_now


@dataclass(frozen=True)
class Migration:
    version: int
    note: str
    statements: Sequence[str]
    data: Callable[[Transaction, str], None] | None = None  # a step in Python after the statements


V1 = (
    """CREATE TABLE results (
        msg_id TEXT PRIMARY KEY,
        instrument TEXT NOT NULL,
        stack_id TEXT NOT NULL,
        time {time} NOT NULL,
        received_at {time} NOT NULL,
        labels {json} NOT NULL,
        n_labels INTEGER NOT NULL,
        scores {json} NOT NULL,
        files {json} NOT NULL,
        bundle_id TEXT NOT NULL,
        bundle_sha256 TEXT NOT NULL,
        purpose TEXT NOT NULL,
        decode_ms {real},
        preprocess_ms {real},
        embed_ms {real},
        classify_ms {real},
        total_ms {real},
        document {json} NOT NULL
    )""",
    "CREATE INDEX results_time ON results (time)",
    "CREATE INDEX results_instrument_time ON results (instrument, time)",
    """CREATE TABLE errors (
        msg_id TEXT PRIMARY KEY,
        instrument TEXT NOT NULL,
        stack_id TEXT,
        time {time} NOT NULL,
        received_at {time} NOT NULL,
        code TEXT NOT NULL,
        message TEXT NOT NULL,
        files {json} NOT NULL,
        moved_to TEXT,
        document {json} NOT NULL
    )""",
    "CREATE INDEX errors_code_time ON errors (code, time)",
    """CREATE TABLE status (
        instrument TEXT NOT NULL,
        received_at {time} NOT NULL,
        status TEXT NOT NULL,
        retained {bool} NOT NULL,
        PRIMARY KEY (instrument, received_at)
    )""",
    """CREATE TABLE invalid (
        digest TEXT PRIMARY KEY,
        received_at {time} NOT NULL,
        topic TEXT NOT NULL,
        payload {blob} NOT NULL,
        reason TEXT NOT NULL
    )""",
    "CREATE INDEX invalid_received_at ON invalid (received_at)",
)

V2 = (
    "ALTER TABLE results ADD COLUMN review {bool}",
    "ALTER TABLE results ADD COLUMN review_reasons {json}",
    "ALTER TABLE results ADD COLUMN near_threshold {json}",
    "ALTER TABLE results ADD COLUMN novelty {real}",
    "ALTER TABLE results ADD COLUMN received_by TEXT",
    "ALTER TABLE errors ADD COLUMN received_by TEXT",
    """CREATE TABLE result_labels (
        msg_id TEXT NOT NULL REFERENCES results (msg_id),
        location TEXT NOT NULL,
        time {time} NOT NULL,
        PRIMARY KEY (msg_id, location)
    )""",
    "CREATE INDEX result_labels_location_time ON result_labels (location, time)",
    "CREATE INDEX results_bundle ON results (bundle_sha256)",
    "CREATE INDEX results_review_time ON results (review, time)",
)


def _fill_trust_fields(tx: Transaction, dialect: str) -> None:
    """Version 2's new columns and label rows for the results stored before it, from their documents."""
    updates = []
    labels = []
    for msg_id, document, time in tx.fetchall("SELECT msg_id, document, time FROM results"):
        doc = json.loads(document) if isinstance(document, str | bytes) else document
        reasons = doc.get("review_reasons")
        near = doc.get("near_threshold")
        updates.append(
            (
                doc.get("review"),
                None if reasons is None else json.dumps(reasons),
                None if near is None else json.dumps(near),
                doc.get("novelty"),
                msg_id,
            )
        )
        labels += [(msg_id, location, time) for location in doc.get("labels", [])]
    tx.executemany(
        "UPDATE results SET review = ?, review_reasons = ?, near_threshold = ?, novelty = ? WHERE msg_id = ?",
        updates,
    )
    tx.executemany(
        "INSERT INTO result_labels (msg_id, location, time) VALUES (?, ?, ?) ON CONFLICT DO NOTHING", labels
    )


MIGRATIONS = (
    Migration(1, "results, errors, status history, invalid input", V1),
    Migration(2, "review flag and reasons, novelty, result_labels, received_by", V2, _fill_trust_fields),
)
LATEST = MIGRATIONS[-1].version
VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied_at {time} NOT NULL,
    note TEXT NOT NULL
)"""


def version(db: Database) -> int:
    """The database's schema version; 0 for an empty database."""
    with db.transaction(exclusive=True) as tx:
        return _version(tx, db.dialect)


def _version(tx: Transaction, dialect: str) -> int:
    tx.execute(ddl(dialect, VERSION_TABLE))
    ((found,),) = tx.fetchall("SELECT COALESCE(MAX(version), 0) FROM schema_version")
    return int(found)


def migrate(db: Database, target: int = LATEST, log: Callable[[str], None] | None = None) -> list[int]:
    """Apply every migration above the database's version up to `target`; the versions applied."""
    applied = []
    for step in MIGRATIONS:
        if step.version > target:
            break
        with db.transaction(exclusive=True) as tx:
            current = _version(tx, db.dialect)
            if current > LATEST:
                raise DatabaseError(
                    f"the database's schema is version {current}, newer than this hpa-edge knows "
                    f"({LATEST}): upgrade hpa-edge"
                )
            if step.version <= current:
                continue
            if step.version != current + 1:
                raise DatabaseError(f"schema version {current} has no migration to {step.version}")
            for statement in step.statements:
                tx.execute(ddl(db.dialect, statement))
            if step.data is not None:
                step.data(tx, db.dialect)
            tx.execute(
                "INSERT INTO schema_version (version, applied_at, note) VALUES (?, ?, ?)",
                (step.version, utc_now(), step.note),
            )
        applied.append(step.version)
        if log is not None:
            log(f"event=migrated version={step.version} note={step.note!r}")
    return applied


def columns(db: Database, table: str) -> list[str]:
    """A table's column names, in order (for tests and docs)."""
    names, _ = db.rows(f"SELECT * FROM {table} WHERE 1 = 0")
    return names
