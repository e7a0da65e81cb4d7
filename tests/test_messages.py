"""MQTT payloads: stable msg_ids, documents valid against the published schema, log lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agent.model import messages
from agent.service.log import format_event, parse_line
from agent.stacks.labels import LOCATIONS

SCHEMA = json.loads(
    (Path(__file__).resolve().parent.parent / "agent" / "model" / "messages.schema.json").read_text()
)
FILES = messages.files_entry(
    {"red": "a_red.png", "green": "a_green.png"}, {"red": "ab" * 32, "green": "cd" * 32}
)


def of(definition: str) -> dict[str, Any]:
    return {"$defs": SCHEMA["$defs"], "$ref": f"#/$defs/{definition}"}


def result(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "msg_id": messages.msg_id("scope", "a", "f" * 64, "b" * 64),
        "instrument": "scope",
        "stack_id": "a",
        "files": FILES,
        "probabilities": [0.1] * 27 + [0.9],
        "labels": [False] * 27 + [True],
        "bundle": {"id": "lite0-int8-x", "sha256": "b" * 64, "purpose": "demo"},
        "timings_ms": {"decode": 7.0, "embed": 2.0, "total": 10.0},
    }
    values.update(overrides)
    return messages.result_document(**values)


def test_the_schema_is_a_valid_json_schema() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_the_schema_lists_the_28_locations_in_order() -> None:
    assert SCHEMA["$defs"]["location"]["enum"] == list(LOCATIONS)


def test_a_result_document_is_valid_and_flat() -> None:
    document = result()
    jsonschema.validate(document, of("result"))
    assert document["labels"] == ["Rods & rings"]
    assert document["n_labels"] == 1
    assert document["total_ms"] == 10.0
    assert document["purpose"] == "demo"


def test_a_result_without_its_scores_is_invalid() -> None:
    document = result()
    del document["scores"]["Nucleoplasm"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(document, of("result"))


def test_a_result_needs_28_scores() -> None:
    with pytest.raises(ValueError, match="28 scores"):
        result(probabilities=[0.5] * 27)


def test_an_error_document_is_valid() -> None:
    document = messages.error_document(
        msg_id=messages.msg_id("scope", "a", "f" * 64, "b" * 64, kind="error"),
        instrument="scope",
        stack_id="a",
        code="truncated",
        message="a_red.png: cut short",
        files=FILES,
        moved_to="failed",
    )
    jsonschema.validate(document, of("error"))


def test_msg_id_is_stable_and_changes_with_each_part() -> None:
    parts = ("scope", "a", "f" * 64, "b" * 64)
    first = messages.msg_id(*parts)
    assert first == messages.msg_id(*parts)
    for i in range(4):
        changed = list(parts)
        changed[i] += "x"
        assert messages.msg_id(*changed) != first
    assert messages.msg_id(*parts, kind="error") != first


def test_topics_sit_under_the_prefix() -> None:
    assert messages.topic("hpa-edge/scope", "results") == "hpa-edge/scope/results"
    with pytest.raises(ValueError, match="unknown topic kind"):
        messages.topic("p", "result")


def test_times_are_utc_with_milliseconds() -> None:
    jsonschema.validate(messages.utc_now(), of("time"))


def test_log_lines_split_back_into_their_fields() -> None:
    line = format_event(
        "info", "stack_done", {"stack": "a b", "labels": 'x="y"', "ms": 1.23456789, "skip": None}
    )
    assert line.startswith("level=info event=stack_done ")
    assert parse_line(line) == {
        "level": "info",
        "event": "stack_done",
        "stack": "a b",
        "labels": 'x="y"',
        "ms": "1.23457",
    }


def test_log_lines_never_span_two_lines() -> None:
    line = format_event("error", "stack_failed", {"message": "bad\nname\x1b[31m"})
    assert "\n" not in line
    assert parse_line(line)["message"] == "bad\nname\x1b[31m"


def test_a_library_warning_becomes_one_structured_line() -> None:
    import io
    import logging

    from agent.service import log

    out = io.StringIO()
    log.setup("info", out)
    logging.getLogger("watchdog.observers.inotify").error("queue_events() called when %s", "inactive")
    (line,) = out.getvalue().splitlines()
    assert log.parse_line(line) == {
        "level": "error",
        "event": "library_log",
        "logger": "watchdog.observers.inotify",
        "message": "queue_events() called when inactive",
    }
