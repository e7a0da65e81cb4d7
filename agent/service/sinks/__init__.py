"""Where outbox rows go: the interface every sink implements, in the manner of Telegraf's outputs.

The drainer (`agent.service.drainer`) owns everything durable: which rows to send, how many
may be unacknowledged, backing off while a sink is unavailable, deleting a row once it was
accepted and keeping a rejected one for the operator. A sink only connects, sends a row,
and reports the far end's answer for it:
- ACCEPTED: delivered; the row is deleted;
- REJECTED: refused for good (e.g. not authorised); the row is kept, marked, never re-sent;
- RETRY: refused for now (e.g. a quota); the row stays pending and is sent again after a
  growing pause; after `retry_limit` re-sends still refused, it counts as REJECTED.
A second sink (a database, a web hook) is a new module here; the drainer does not change.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from agent.service.outbox import Row


class Verdict(StrEnum):
    ACCEPTED = "accepted"
    REJECTED = "rejected"
    RETRY = "retry"


@dataclass(frozen=True)
class Answer:
    token: int  # what `send` returned for the row
    verdict: Verdict
    reason: str = ""


class SinkUnavailableError(Exception):
    """The sink cannot be reached now (refused, lost, timed out); the drainer backs off and retries."""


class Sink(Protocol):
    """What the drainer needs of a sink. Never called from two threads at once: every method runs
    on the drainer's thread, except `connect`, which runs on a helper thread while the drainer
    waits (it may block on a name lookup); if the drainer stops waiting, that thread calls
    `close(goodbye=False)` once `connect` returns. `name` and `ready` are read from any thread."""

    @property
    def name(self) -> str:
        """Where rows go, for logs (e.g. `mqtt://host:1883`)."""
        ...

    @property
    def ready(self) -> bool:
        """Connected and able to take rows."""
        ...

    def connect(self) -> None:
        """Start a connection; SinkUnavailableError when it cannot even start."""

    def send(self, row: Row) -> int | None:
        """Hand a row over; a token its answer will carry, or None when it cannot take it now."""

    def poll(self, timeout: float) -> list[Answer]:
        """Do pending I/O for up to `timeout` s; the answers that arrived (SinkUnavailableError: lost)."""

    def send_stats(self, payload: bytes) -> None:
        """Best effort, never retried: a newer one follows."""

    # Optional: `wake(self) -> None`, callable from any thread, ends a running `poll` early (the
    # drainer calls it when new rows are committed; a sink without it is polled every 50 ms).

    def send_status(self, payload: bytes) -> None:
        """The instrument's state (`online`, `degraded`), best effort; a sink that has no such
        channel ignores it. The drainer sends it again after every reconnect."""

    def close(self, goodbye: bool) -> None:
        """Disconnect; with `goodbye`, first tell consumers this instrument goes offline."""
