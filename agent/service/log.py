"""Structured logs: one `key=value` line per event on stdout, where journald picks it up.

`event("stack_done", stack="x", ms=12.3)` prints `level=info event=stack_done stack=x ms=12.3`.
Values with spaces or quotes are JSON-quoted, so a line always splits back into its pairs.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

LOGGER = logging.getLogger("hpa_edge")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def setup(level: str = "info", stream: Any = None) -> None:
    """Send the agent's events to `stream` (stdout) as bare lines; journald adds the time.
    Warnings that libraries log through `logging` (e.g. paho's) become
    `library_log` events, so every line in the journal still splits into its pairs."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(LEVELS[level])
    LOGGER.propagate = False
    root = logging.getLogger()
    root.handlers[:] = [h for h in root.handlers if not isinstance(h, _Library)] + [_Library()]
    root.setLevel(logging.WARNING)


class _Library(logging.Handler):
    """A library's log record as one structured event line."""

    def emit(self, record: logging.LogRecord) -> None:
        level = "error" if record.levelno >= logging.ERROR else "warning"
        try:
            message = record.getMessage()
        except Exception:  # a library's bad format string must not break logging
            message = str(record.msg)
        event("library_log", level, logger=record.name, message=message)


def format_event(level: str, name: str, fields: dict[str, Any]) -> str:
    parts = [f"level={level}", f"event={name}"]
    for key, value in fields.items():
        if value is None:
            continue
        text = f"{value:.6g}" if isinstance(value, float) else str(value)
        if not text or any(c in text for c in " \"'=\\\n\t") or not text.isprintable():
            text = json.dumps(text)
        parts.append(f"{key}={text}")
    return " ".join(parts)


def event(name: str, level: str = "info", **fields: Any) -> None:
    number = LEVELS[level]
    if LOGGER.isEnabledFor(number):
        LOGGER.log(number, format_event(level, name, fields))


def parse_line(line: str) -> dict[str, str]:
    """The inverse of `format_event`, for tests and log tooling."""
    out: dict[str, str] = {}
    rest = line.strip()
    while rest:
        key, _, rest = rest.partition("=")
        if rest.startswith('"'):
            decoder = json.JSONDecoder()
            value, end = decoder.raw_decode(rest)
            rest = rest[end:].lstrip()
        else:
            value, _, rest = rest.partition(" ")
        out[key] = value
    return out
