"""A stack's life in the agent, owned in one place: the only way a stack moves on.

    SEEN -> COMPLETE -> ANALYSED -> RECORDED -> DISPOSED -> PUBLISHED
      \\________________/^

- SEEN: some of its channel files are in the folder, not all written yet.
- COMPLETE: the tracker says all four are written; it waits for the models. An analysis
  that failed for a reason outside the stack (out of memory, a runtime failing) leaves it
  COMPLETE with a time to try again (`deferred`).
- ANALYSED: it has a result or an error (a SEEN stack that stays incomplete too long goes
  straight here as `quarantined`; a file whose name cannot be a stack id as `failed`).
- RECORDED: its ledger and outbox rows are committed; from here on it is never analysed
  again. A failed commit takes it out of the book: the next look sees it afresh and analyses
  it again.
- DISPOSED: its files are moved, deleted or deliberately left. A failed move keeps it
  RECORDED with a time to try again, and only the files still in the folder are retried,
  so a half-moved stack is never mistaken for a new, incomplete one.
- PUBLISHED: the broker acknowledged its message (an acknowledgement that arrives before
  the files are disposed is remembered and applied then). The stack's life ends here.

Pure bookkeeping: no threads, no files, no clock of its own (every call is given `now`),
so tests drive it with made-up looks and times. The loop, the recorder and the disposer
act; this book says what is due and records what they did. Transitions outside the table
raise `TransitionError`: a bug, never a stack's fault.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from agent.model.pipeline import Analysis
from agent.service.tracker import Entry, Look


class Phase(StrEnum):
    SEEN = "seen"
    COMPLETE = "complete"
    ANALYSED = "analysed"
    RECORDED = "recorded"
    DISPOSED = "disposed"
    PUBLISHED = "published"


# Where a stack may go from each phase; None is "not in the book" (entering or leaving it).
TRANSITIONS: dict[Phase | None, frozenset[Phase | None]] = {
    None: frozenset({Phase.SEEN, Phase.COMPLETE, Phase.ANALYSED}),
    Phase.SEEN: frozenset({Phase.COMPLETE, Phase.ANALYSED, None}),  # None: its files went away
    Phase.COMPLETE: frozenset({Phase.ANALYSED, None}),
    Phase.ANALYSED: frozenset({Phase.RECORDED, None}),  # None: the commit failed, seen afresh
    Phase.RECORDED: frozenset({Phase.DISPOSED}),
    Phase.DISPOSED: frozenset({Phase.PUBLISHED, None}),  # None: its message is the outbox's alone
    Phase.PUBLISHED: frozenset({None}),
}


class TransitionError(RuntimeError):
    """A stack was asked to move in a way the table does not allow (a bug in the caller)."""


@dataclass
class StackLife:
    stack_id: str
    names: dict[str, str]  # channel -> file name in the watched folder
    phase: Phase
    since: float  # when it entered the book
    complete_at: float | None = None
    entries: dict[str, Entry] = field(default_factory=dict)  # how its files looked when taken for analysis
    analysis: Analysis | None = None
    duplicate: bool = False  # the ledger already held this exact content
    retry_at: float | None = None  # RECORDED after a failed disposal: not before this time
    acknowledged_at: float | None = None  # the broker took its message before the files were disposed

    @property
    def msg_id(self) -> str:
        if self.analysis is None:
            raise TransitionError(f"stack {self.stack_id!r} has no analysis yet")
        return self.analysis.msg_id


class StackBook:
    """Every stack the agent is dealing with, by phase; see the module's docstring."""

    def __init__(self, keep_unpublished: int = 10_000) -> None:
        self.lives: dict[str, StackLife] = {}  # SEEN .. RECORDED, by stack id
        # DISPOSED stacks waiting for the broker's acknowledgement, oldest first, by msg_id. Bounded:
        # during a long outage the oldest are let go (the outbox still delivers them), so memory
        # does not grow with the backlog.
        self.unpublished: OrderedDict[str, StackLife] = OrderedDict()
        self.keep_unpublished = keep_unpublished
        self.left: dict[str, Entry] = {}  # files deliberately left in the folder, as they looked

    # What the folder says ---------------------------------------------------------------
    def hidden(self, listing: Mapping[str, Entry]) -> set[str]:
        """Names the tracker must not see: files of stacks in the agent's hands, and files left
        in place that have not changed since (a changed one is released, to be seen afresh)."""
        for name, entry in list(self.left.items()):
            if listing.get(name) != entry:
                del self.left[name]
        busy = {
            name
            for life in self.lives.values()
            if life.phase in (Phase.ANALYSED, Phase.RECORDED)
            for name in life.names.values()
        }
        return busy | set(self.left)

    def observe(self, look: Look, now: float) -> None:
        """New and completed stacks from the tracker's look; stacks whose files went away leave."""
        for stack_id, names in look.pending.items():
            if stack_id not in self.lives:
                self._enter(StackLife(stack_id, dict(names), Phase.SEEN, now))
            elif self.lives[stack_id].phase == Phase.SEEN:
                self.lives[stack_id].names = dict(names)
        for stack_id, names in look.ready.items():
            life = self.lives.get(stack_id)
            if life is None:
                life = StackLife(stack_id, dict(names), Phase.COMPLETE, now, complete_at=now)
                self._enter(life)
            elif life.phase == Phase.SEEN:
                self._move(life, Phase.COMPLETE)
                life.names, life.complete_at = dict(names), now
            elif life.phase == Phase.COMPLETE and life.names != dict(names):
                life.names, life.retry_at = dict(names), None  # other files: a fresh start
        listed = look.pending.keys() | look.ready.keys() | look.overdue.keys()
        for life in list(self.lives.values()):
            if life.phase in (Phase.SEEN, Phase.COMPLETE) and life.stack_id not in listed:
                self._leave(life)

    # What is due ------------------------------------------------------------------------
    def ready(self, limit: int, now: float) -> list[StackLife]:
        """COMPLETE stacks not deferred past `now`, in stack-id order, at most `limit` (one batch)."""
        complete = sorted(
            (
                life
                for life in self.lives.values()
                if life.phase == Phase.COMPLETE and (life.retry_at is None or now >= life.retry_at)
            ),
            key=lambda life: life.stack_id,
        )
        return complete[:limit]

    def to_record(self) -> list[StackLife]:
        return [life for life in self.lives.values() if life.phase == Phase.ANALYSED]

    def to_dispose(self, now: float) -> list[StackLife]:
        """RECORDED stacks whose files are due to go (at once, or after a failed move's pause)."""
        return [
            life
            for life in self.lives.values()
            if life.phase == Phase.RECORDED and (life.retry_at is None or now >= life.retry_at)
        ]

    def accepts(self, stack_id: str) -> bool:
        """A stack of this id may be analysed now: it is new, or only seen or complete."""
        life = self.lives.get(stack_id)
        return life is None or life.phase in (Phase.SEEN, Phase.COMPLETE)

    def next_retry(self) -> float | None:
        """When the earliest deferred analysis or failed disposal is due again, if any."""
        times = [life.retry_at for life in self.lives.values() if life.retry_at is not None]
        return min(times) if times else None

    @property
    def waiting(self) -> int:
        """Stacks seen but not analysed yet."""
        return sum(life.phase in (Phase.SEEN, Phase.COMPLETE) for life in self.lives.values())

    # What was done ----------------------------------------------------------------------
    def analysed(self, stack_id: str, names: Mapping[str, str], analysis: Analysis) -> None:
        """A result or an error: also how an overdue stack or an unusable file name enters."""
        life = self.lives.get(stack_id)
        if life is None:
            life = StackLife(stack_id, dict(names), Phase.ANALYSED, analysis.started)
            self._enter(life)
        else:
            self._move(life, Phase.ANALYSED)
            life.names = dict(names)
        life.analysis, life.retry_at = analysis, None

    def deferred(self, stack_id: str, retry_at: float) -> None:
        """Its analysis failed for a reason outside the stack: it stays COMPLETE until `retry_at`."""
        life = self._get(stack_id)
        if life.phase != Phase.COMPLETE:
            raise TransitionError(f"stack {stack_id!r} is {life.phase}, not complete")
        life.retry_at = retry_at

    def recorded(self, stack_id: str, duplicate: bool = False) -> None:
        life = self._get(stack_id)
        self._move(life, Phase.RECORDED)
        life.duplicate = duplicate

    def record_failed(self, stack_id: str) -> None:
        """Nothing was committed: the stack leaves the book and is seen afresh at the next look."""
        self._leave(self._get(stack_id))

    def dispose_failed(self, stack_id: str, retry_at: float) -> None:
        life = self._get(stack_id)
        if life.phase != Phase.RECORDED:
            raise TransitionError(f"stack {stack_id!r} is {life.phase}, not recorded")
        life.retry_at = retry_at

    def disposed(self, stack_id: str, now: float, left: Mapping[str, Entry] | None = None) -> float | None:
        """Files gone (or left on purpose, as `left` shows them). Returns the delivery latency in
        seconds when the broker had already acknowledged the stack's message."""
        life = self._get(stack_id)
        self._move(life, Phase.DISPOSED)
        self.left.update(left or {})
        del self.lives[stack_id]
        if life.duplicate:  # answered before: the outbox alone owns its message
            self._end(life)
            return None
        if life.acknowledged_at is not None:
            return self._published(life, life.acknowledged_at)
        self.unpublished[life.msg_id] = life
        while len(self.unpublished) > self.keep_unpublished:
            _, oldest = self.unpublished.popitem(last=False)
            self._end(oldest)
        return None

    def published(self, msg_id: str, now: float) -> float | None:
        """The broker acknowledged `msg_id`. Returns complete -> acknowledged in seconds, when known."""
        life = self.unpublished.pop(msg_id, None)
        if life is not None:
            return self._published(life, now)
        for candidate in self.lives.values():
            if candidate.phase == Phase.RECORDED and candidate.msg_id == msg_id:
                candidate.acknowledged_at = now
        return None  # a message from before a restart, or one already let go

    # The table --------------------------------------------------------------------------
    def _published(self, life: StackLife, acknowledged_at: float) -> float | None:
        self._move(life, Phase.PUBLISHED)
        self._end(life)
        return None if life.complete_at is None else acknowledged_at - life.complete_at

    def _get(self, stack_id: str) -> StackLife:
        try:
            return self.lives[stack_id]
        except KeyError:
            raise TransitionError(f"stack {stack_id!r} is not in the book") from None

    def _enter(self, life: StackLife) -> None:
        _check(None, life.phase, life.stack_id)
        self.lives[life.stack_id] = life

    def _move(self, life: StackLife, phase: Phase) -> None:
        _check(life.phase, phase, life.stack_id)
        life.phase = phase

    def _leave(self, life: StackLife) -> None:
        _check(life.phase, None, life.stack_id)
        self.lives.pop(life.stack_id, None)

    def _end(self, life: StackLife) -> None:
        _check(life.phase, None, life.stack_id)


def _check(current: Phase | None, wanted: Phase | None, stack_id: str) -> None:
    if wanted not in TRANSITIONS[current]:
        raise TransitionError(f"stack {stack_id!r}: {current or 'new'} -> {wanted or 'gone'} is not allowed")
