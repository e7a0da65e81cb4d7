"""One MQTT message to the rows it becomes: a result, an error, a status, or an `invalid` row.

Pure functions, no database and no network. Whatever arrives on the wire gives a record and
never an exception: malformed JSON, a document that is not an object, an unknown
`schema_version`, a document of the wrong kind for its topic, a missing or ill-typed field, a
time that does not parse, a result from a bundle the collector was told not to expect, an
unknown status, a topic the collector does not read. Each becomes an `Invalid` record with the
reason and the raw payload, so a bad message is kept for a person and never blocks the queue.

The checks are the fields the tables need, by hand (jsonschema is a developer's package, not
the collector's); the full contract is `agent/model/messages.schema.json`.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.model.messages import MESSAGE_SCHEMA_VERSION
from agent.stacks.labels import LOCATIONS

MAX_STORED_PAYLOAD = 64 * 1024  # bytes of a bad message kept in `invalid`
STATUSES = ("online", "offline")
TIMINGS = ("decode_ms", "preprocess_ms", "embed_ms", "classify_ms", "total_ms")
_MSG_ID = re.compile(r"^[0-9a-f]{32}$")
_KNOWN = frozenset(LOCATIONS)


@dataclass(frozen=True)
class Result:
    msg_id: str
    instrument: str
    stack_id: str
    time: str
    labels: list[str]
    document: dict[str, Any]
    raw: str = ""  # the payload as it came, kept as the `document` column


@dataclass(frozen=True)
class Error:
    msg_id: str
    instrument: str
    stack_id: str | None
    time: str
    code: str
    message: str
    document: dict[str, Any]
    raw: str = ""


@dataclass(frozen=True)
class Status:
    instrument: str
    status: str
    retained: bool


@dataclass(frozen=True)
class Invalid:
    topic: str
    payload: bytes
    reason: str

    @property
    def digest(self) -> str:
        """The same bad message delivered twice is stored once."""
        return hashlib.sha256(self.topic.encode("utf-8", "replace") + b"\0" + self.payload).hexdigest()[:32]

    @property
    def stored_payload(self) -> bytes:
        return self.payload[:MAX_STORED_PAYLOAD]


Record = Result | Error | Status | Invalid


class _BadMessageError(ValueError):
    pass


def normal_time(text: Any) -> str:
    """An ISO 8601 time to UTC with milliseconds and Z (the agent's own form), or raise."""
    if not isinstance(text, str):
        raise _BadMessageError("time missing or not a string")
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise _BadMessageError(f"time {text[:40]!r} is not ISO 8601") from None
    if parsed.tzinfo is None:
        raise _BadMessageError(f"time {text[:40]!r} has no time zone")
    return parsed.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse(topic: str, payload: bytes, retained: bool = False, known_bundles: Collection[str] = ()) -> Record:
    """The record a message on `<prefix>/<instrument>/<kind>` becomes. Never raises."""
    parts = topic.split("/")
    kind = parts[-1]
    instrument = parts[-2] if len(parts) >= 2 else ""
    try:
        if kind == "status":
            return _status(instrument, payload, retained)
        if kind not in ("results", "errors"):
            raise _BadMessageError(f"the collector does not read {kind!r} topics")
        document = _document(payload)
        raw = payload.decode("utf-8")
        if kind == "results":
            return _result(document, known_bundles, raw)
        return _error(document, raw)
    except _BadMessageError as exc:
        return Invalid(topic, bytes(payload), str(exc))
    except Exception as exc:  # a bug here must not stop the queue either
        return Invalid(topic, bytes(payload), f"unreadable: {type(exc).__name__}: {exc}")


def _status(instrument: str, payload: bytes, retained: bool) -> Status:
    if not instrument:
        raise _BadMessageError("status topic without an instrument")
    text = payload.decode("utf-8", "replace").strip()
    if text not in STATUSES:
        raise _BadMessageError(f"unknown status {text[:40]!r} (expected online or offline)")
    return Status(instrument, text, retained)


def _document(payload: bytes) -> dict[str, Any]:
    try:
        document = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError:
        raise _BadMessageError("not UTF-8") from None
    except ValueError as exc:
        raise _BadMessageError(f"malformed JSON: {exc}") from None
    if not isinstance(document, dict):
        raise _BadMessageError(f"not a JSON object but {type(document).__name__}")
    version = document.get("schema_version")
    if version != MESSAGE_SCHEMA_VERSION:
        known = MESSAGE_SCHEMA_VERSION
        raise _BadMessageError(f"unknown schema_version {version!r} (this collector reads {known})")
    return document


def _text(document: Mapping[str, Any], key: str, empty: bool = False) -> str:
    value = document.get(key)
    if not isinstance(value, str) or (not empty and not value):
        raise _BadMessageError(f"{key} missing or not a{'' if empty else ' non-empty'} string")
    return value


def _number(document: Mapping[str, Any], key: str, required: bool = False) -> None:
    value = document.get(key)
    if value is None and not required:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _BadMessageError(f"{key} missing or not a finite number")


def _common(document: Mapping[str, Any], kind: str) -> tuple[str, str, str]:
    if document.get("kind") != kind:
        raise _BadMessageError(f"kind {document.get('kind')!r} where {kind!r} was expected")
    msg_id = document.get("msg_id")
    if not isinstance(msg_id, str) or not _MSG_ID.match(msg_id):
        raise _BadMessageError("msg_id missing or not 32 hex digits")
    if not isinstance(document.get("files"), dict):
        raise _BadMessageError("files missing or not an object")
    return msg_id, _text(document, "instrument"), normal_time(document.get("time"))


def _result(document: dict[str, Any], known_bundles: Collection[str], raw: str) -> Result:
    msg_id, instrument, time = _common(document, "result")
    stack_id = _text(document, "stack_id")
    labels = document.get("labels")
    if not isinstance(labels, list) or not all(isinstance(x, str) and x in _KNOWN for x in labels):
        raise _BadMessageError("labels missing or not a list of known locations")
    scores = document.get("scores")
    if not isinstance(scores, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in scores.values()
    ):
        raise _BadMessageError("scores missing or not an object of numbers")
    if not isinstance(document.get("n_labels"), int):
        raise _BadMessageError("n_labels missing or not an integer")
    _text(document, "bundle_id")
    bundle = _text(document, "bundle_sha256", empty=True)
    _text(document, "purpose")
    for key in TIMINGS:
        _number(document, key, required=key == "total_ms")
    _number(document, "novelty")
    if "review" in document and not isinstance(document["review"], bool):
        raise _BadMessageError("review is not true or false")
    for key in ("review_reasons", "near_threshold"):
        value = document.get(key)
        if value is not None and not (isinstance(value, list) and all(isinstance(x, str) for x in value)):
            raise _BadMessageError(f"{key} is not a list of strings")
    if known_bundles and bundle not in known_bundles:
        raise _BadMessageError(f"unknown bundle {document['bundle_id']!r} (sha256 {bundle[:12]}...)")
    return Result(msg_id, instrument, stack_id, time, list(dict.fromkeys(labels)), document, raw)


def _error(document: dict[str, Any], raw: str) -> Error:
    msg_id, instrument, time = _common(document, "error")
    stack_id = document.get("stack_id")
    if stack_id is not None and not isinstance(stack_id, str):
        raise _BadMessageError("stack_id is neither a string nor null")
    code = _text(document, "code")
    message = _text(document, "message", empty=True)
    moved_to = document.get("moved_to")
    if moved_to is not None and not isinstance(moved_to, str):
        raise _BadMessageError("moved_to is not a string")
    return Error(msg_id, instrument, stack_id, time, code, message, document, raw)
