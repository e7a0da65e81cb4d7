"""Answers recorded before anything else happens: ledger rows and outbox rows in one transaction.

A stack's files leave the folder only after this commit, so a crash at any point either
redoes a stack or finds it in the ledger (see `state`). The ledger also recognises a stack
it answered with a result before (same id, same file contents): that one is disposed of
again, and its message, already in the outbox or delivered, is not written twice.

An error is not a final verdict on the bytes: the same stack dropped again after a failure
(a limit since raised, a new bundle, a file that was still being copied) is analysed again,
and its new answer recorded. Each file is recorded by name and sha256 too, so its remnants
are recognised later (`state.Ledger.recorded_file`).
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.model import messages
from agent.model.pipeline import Analysis
from agent.service.disposal import document_of
from agent.service.state import Ledger, Message, Record


def record_of(analysis: Analysis) -> Record:
    """The ledger row and outbox messages of one analysis: a result (also on `review` when it is
    flagged for a person, so experts can subscribe to those alone) or an error."""
    payload = messages.encode(document_of(analysis))
    if analysis.kind != "result":
        kinds: tuple[str, ...] = ("errors",)
    elif analysis.document.get("review"):
        kinds = ("results", "review")
    else:
        kinds = ("results",)
    sent = tuple(Message(kind, analysis.msg_id, payload) for kind in kinds)
    if analysis.thumbnail is not None:  # after the result: a dashboard shows the picture it names
        sent += (Message("thumbnail", analysis.msg_id, analysis.thumbnail),)
    files = {entry["name"]: entry["sha256"] for entry in analysis.document.get("files", {}).values()}
    return Record(analysis.stack_id, analysis.files_sha256, analysis.kind, analysis.msg_id, sent, files)


class Recorder:
    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def known(self, analysis: Analysis) -> bool:
        """The ledger already holds a result for this exact stack content."""
        return self.ledger.outcome(analysis.stack_id, analysis.files_sha256) == "result"

    def commit(self, analyses: Sequence[Analysis]) -> None:
        """Record the new analyses together, or nothing (StateError)."""
        self.ledger.record([record_of(analysis) for analysis in analyses])
