"""Records to rows, exactly once per msg_id: `INSERT ... ON CONFLICT DO NOTHING` in one transaction.

A re-delivered result or error (the agent re-sent it, or the broker did after a collector
died before acknowledging) hits the primary key and is counted as a duplicate, never stored
twice. A status is stored only when it differs from the instrument's last stored one, so the
retained `online` a collector gets at every (re)subscription does not fill the history. An
invalid message is stored once per (topic, payload) digest.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.collector.database import Transaction
from agent.collector.ingest import TIMINGS, Error, Invalid, Record, Result, Status

INSERT_RESULT = (
    "INSERT INTO results (msg_id, instrument, stack_id, time, received_at, labels, n_labels, scores, "
    "files, bundle_id, bundle_sha256, purpose, decode_ms, preprocess_ms, embed_ms, classify_ms, total_ms, "
    "review, review_reasons, near_threshold, novelty, received_by, document) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (msg_id) DO NOTHING"
)
INSERT_LABEL = (
    "INSERT INTO result_labels (msg_id, location, time) VALUES (?, ?, ?) "
    "ON CONFLICT (msg_id, location) DO NOTHING"
)
INSERT_ERROR = (
    "INSERT INTO errors (msg_id, instrument, stack_id, time, received_at, code, message, files, moved_to, "
    "received_by, document) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (msg_id) DO NOTHING"
)
INSERT_INVALID = (
    "INSERT INTO invalid (digest, received_at, topic, payload, reason) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (digest) DO NOTHING"
)
LAST_STATUS = "SELECT status FROM status WHERE instrument = ? ORDER BY received_at DESC LIMIT 1"
INSERT_STATUS = (
    "INSERT INTO status (instrument, received_at, status, retained) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (instrument, received_at) DO NOTHING"
)


@dataclass
class Counts:
    """What one write did; added up over a collector's life for its stats line."""

    results: int = 0
    errors: int = 0
    status: int = 0
    invalid: int = 0
    duplicates: int = 0

    def add(self, other: Counts) -> None:
        self.results += other.results
        self.errors += other.errors
        self.status += other.status
        self.invalid += other.invalid
        self.duplicates += other.duplicates


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def result_row(record: Result, received_at: str, received_by: str) -> tuple[Any, ...]:
    doc = record.document
    return (
        record.msg_id,
        record.instrument,
        record.stack_id,
        record.time,
        received_at,
        _json(record.labels),
        doc["n_labels"],
        _json(doc["scores"]),
        _json(doc["files"]),
        doc["bundle_id"],
        doc["bundle_sha256"],
        doc["purpose"],
        *(None if doc.get(key) is None else float(doc[key]) for key in TIMINGS),
        doc.get("review"),
        _json(doc.get("review_reasons")),
        _json(doc.get("near_threshold")),
        None if doc.get("novelty") is None else float(doc["novelty"]),
        received_by,
        record.raw or _json(doc),
    )


def error_row(record: Error, received_at: str, received_by: str) -> tuple[Any, ...]:
    doc = record.document
    return (
        record.msg_id,
        record.instrument,
        record.stack_id,
        record.time,
        received_at,
        record.code,
        record.message,
        _json(doc["files"]),
        doc.get("moved_to"),
        received_by,
        record.raw or _json(doc),
    )


def invalid_row(record: Invalid, received_at: str) -> tuple[Any, ...]:
    return (record.digest, received_at, record.topic, record.stored_payload, record.reason)


def write(tx: Transaction, arrivals: Sequence[tuple[Record, str]], received_by: str) -> Counts:
    """Every (record, time it arrived) in one transaction (the caller's); what was new, what a duplicate."""
    counts = Counts()
    results = [(r, at) for r, at in arrivals if isinstance(r, Result)]
    errors = [(r, at) for r, at in arrivals if isinstance(r, Error)]
    invalid = [(r, at) for r, at in arrivals if isinstance(r, Invalid)]
    if results:
        stored = tx.executemany(INSERT_RESULT, [result_row(r, at, received_by) for r, at in results])
        tx.executemany(INSERT_LABEL, [(r.msg_id, name, r.time) for r, _ in results for name in r.labels])
        counts.results += stored
        counts.duplicates += len(results) - stored
    if errors:
        stored = tx.executemany(INSERT_ERROR, [error_row(r, at, received_by) for r, at in errors])
        counts.errors += stored
        counts.duplicates += len(errors) - stored
    if invalid:
        counts.invalid += tx.executemany(INSERT_INVALID, [invalid_row(r, at) for r, at in invalid])
    for record, at in arrivals:
        if isinstance(record, Status):
            last = tx.fetchall(LAST_STATUS, (record.instrument,))
            if not last or last[0][0] != record.status:
                row = (record.instrument, at, record.status, record.retained)
                counts.status += tx.execute(INSERT_STATUS, row)
    return counts
