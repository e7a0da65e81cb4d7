"""The canned queries of `hpa-edge query`: the questions a facility asks of its results.

Each is one SQL statement that runs unchanged on SQLite and PostgreSQL, with named parameters
(`:since`, `:until`, `:instrument`...). Every filter is always present: an option left out
binds a value that matches everything (`%` for a LIKE pattern, the ends of time for a
window), so the statement docs/collector.md shows is exactly the one that runs. Times are
ISO 8601; a date or time without a zone is taken as UTC.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.collector.database import Database, time_text

BEGINNING = "0001-01-01T00:00:00.000Z"
END = "9999-12-31T23:59:59.999Z"
JSON_COLUMNS = {"labels", "review_reasons", "near_threshold", "scores", "files"}
BOOL_COLUMNS = {"review", "retained"}


@dataclass(frozen=True)
class Query:
    summary: str
    sql: str
    parameters: tuple[str, ...]


RESULT_FILTERS = """r.time >= :since AND r.time < :until
  AND r.instrument LIKE :instrument
  AND r.stack_id LIKE :stack
  AND (r.bundle_id LIKE :bundle OR r.bundle_sha256 LIKE :bundle)"""
RESULT_FILTER_PARAMETERS = ("since", "until", "instrument", "stack", "bundle")

QUERIES: dict[str, Query] = {
    "location": Query(
        "results with a location among their labels, in a time window",
        """SELECT r.time, r.instrument, r.stack_id, r.labels, r.bundle_id, r.review
FROM result_labels l JOIN results r ON r.msg_id = l.msg_id
WHERE l.location = :location
  AND l.time >= :since AND l.time < :until
  AND r.instrument LIKE :instrument
  AND r.stack_id LIKE :stack
  AND (r.bundle_id LIKE :bundle OR r.bundle_sha256 LIKE :bundle)
ORDER BY r.time
LIMIT :limit""",
        ("location", *RESULT_FILTER_PARAMETERS, "limit"),
    ),
    "results": Query(
        "results of an instrument, a bundle or a stack-id pattern, in a time window",
        f"""SELECT r.time, r.instrument, r.stack_id, r.labels, r.bundle_id, r.review, r.total_ms
FROM results r
WHERE {RESULT_FILTERS}
ORDER BY r.time
LIMIT :limit""",
        (*RESULT_FILTER_PARAMETERS, "limit"),
    ),
    "review": Query(
        "results flagged for a person to look at, with the reasons",
        f"""SELECT r.time, r.instrument, r.stack_id, r.labels, r.review_reasons, r.near_threshold, r.novelty
FROM results r
WHERE r.review = TRUE
  AND {RESULT_FILTERS}
ORDER BY r.time
LIMIT :limit""",
        (*RESULT_FILTER_PARAMETERS, "limit"),
    ),
    "instruments": Query(
        "per instrument: results, flagged, errors in the window; last result; last status",
        """WITH known AS (
  SELECT instrument FROM results UNION SELECT instrument FROM errors UNION SELECT instrument FROM status
)
SELECT k.instrument,
  (SELECT COUNT(*) FROM results r
    WHERE r.instrument = k.instrument AND r.time >= :since AND r.time < :until) AS results,
  (SELECT COUNT(*) FROM results r
    WHERE r.instrument = k.instrument AND r.review = TRUE
      AND r.time >= :since AND r.time < :until) AS flagged,
  (SELECT COUNT(*) FROM errors e
    WHERE e.instrument = k.instrument AND e.time >= :since AND e.time < :until) AS errors,
  (SELECT MAX(r.time) FROM results r WHERE r.instrument = k.instrument) AS last_result,
  (SELECT s.status FROM status s WHERE s.instrument = k.instrument
    ORDER BY s.received_at DESC LIMIT 1) AS status
FROM known k
WHERE k.instrument LIKE :instrument
ORDER BY k.instrument""",
        ("since", "until", "instrument"),
    ),
    "bundles": Query(
        "per bundle: results, instruments, first and last use",
        f"""SELECT r.bundle_id, r.bundle_sha256, r.purpose, COUNT(*) AS results,
  COUNT(DISTINCT r.instrument) AS instruments, MIN(r.time) AS first, MAX(r.time) AS last
FROM results r
WHERE {RESULT_FILTERS}
GROUP BY r.bundle_id, r.bundle_sha256, r.purpose
ORDER BY MAX(r.time) DESC""",
        RESULT_FILTER_PARAMETERS,
    ),
    "errors": Query(
        "error counts by code, in a time window",
        """SELECT e.code, COUNT(*) AS errors, COUNT(DISTINCT e.instrument) AS instruments,
  MIN(e.time) AS first, MAX(e.time) AS last
FROM errors e
WHERE e.time >= :since AND e.time < :until AND e.instrument LIKE :instrument
GROUP BY e.code
ORDER BY COUNT(*) DESC, e.code""",
        ("since", "until", "instrument"),
    ),
    "invalid": Query(
        "bad input on the wire: when, on which topic, why",
        """SELECT i.received_at, i.topic, i.reason
FROM invalid i
WHERE i.received_at >= :since AND i.received_at < :until
ORDER BY i.received_at
LIMIT :limit""",
        ("since", "until", "limit"),
    ),
}


def when(text: str | None, default: str) -> str:
    """An option's time as the stored form (UTC, milliseconds, Z); a date or a zoneless time is UTC."""
    if not text:
        return default
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        example = "e.g. 2026-11-22 or 2026-11-22T06:10"
        raise ValueError(f"{text!r} is not an ISO 8601 date or time ({example})") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return str(time_text(parsed))


def parameters(query: Query, options: Mapping[str, Any]) -> dict[str, Any]:
    """The values bound to `query` from the command's options (None where an option was left out)."""
    values = {
        "since": when(options.get("since"), BEGINNING),
        "until": when(options.get("until"), END),
        "instrument": options.get("instrument") or "%",
        "stack": options.get("stack") or "%",
        "bundle": options.get("bundle") or "%",
        "location": options.get("location"),
        "limit": int(options.get("limit") or 1000),
    }
    return {name: values[name] for name in query.parameters}


def run(db: Database, name: str, options: Mapping[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
    """The query's column names and its rows as plain values (times as ISO text, JSON decoded, booleans)."""
    query = QUERIES[name]
    names, rows = db.rows(query.sql, parameters(query, options))
    return names, [plain(names, row) for row in rows]


def plain(names: Sequence[str], row: Sequence[Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in zip(names, row, strict=True):
        if name in JSON_COLUMNS and isinstance(value, str):
            value = json.loads(value)
        elif name in BOOL_COLUMNS and isinstance(value, int):
            value = bool(value)
        out[name] = time_text(value)
    return out
