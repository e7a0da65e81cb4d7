"""A stack's life in the agent: the book's transitions, driven with made-up looks and times."""

from __future__ import annotations

import pytest

from agent.model.pipeline import Analysis
from agent.service.lifecycle import TRANSITIONS, Phase, StackBook, TransitionError
from agent.service.tracker import Entry, Look

FOUR = {"red": "s_red.png", "green": "s_green.png", "blue": "s_blue.png", "yellow": "s_yellow.png"}


def analysis(stack_id: str = "s", kind: str = "result", msg_id: str = "m1") -> Analysis:
    return Analysis(stack_id, kind, "f" * 64, {"msg_id": msg_id}, {}, started=0.0)


def look(**parts: dict[str, dict[str, str]]) -> Look:
    return Look(**parts)  # type: ignore[arg-type]


def recorded_book(now: float = 1.0) -> StackBook:
    book = StackBook()
    book.observe(look(ready={"s": FOUR}), now)
    book.analysed("s", FOUR, analysis())
    book.recorded("s")
    return book


def test_a_stack_seen_in_part_is_seen_and_waits() -> None:
    book = StackBook()
    book.observe(look(pending={"s": {"red": "s_red.png"}}), 0.0)
    assert book.lives["s"].phase == Phase.SEEN
    assert book.waiting == 1
    assert book.ready(16, 0.0) == []


def test_a_seen_stack_becomes_complete_when_the_tracker_says_ready() -> None:
    book = StackBook()
    book.observe(look(pending={"s": {"red": "s_red.png"}}), 0.0)
    book.observe(look(ready={"s": FOUR}), 2.0)
    (life,) = book.ready(16, 0.0)
    assert (life.phase, life.names, life.complete_at) == (Phase.COMPLETE, FOUR, 2.0)


def test_ready_gives_complete_stacks_in_id_order_up_to_the_batch() -> None:
    book = StackBook()
    book.observe(look(ready={sid: FOUR for sid in ("c", "a", "b")}), 0.0)
    assert [life.stack_id for life in book.ready(2, 0.0)] == ["a", "b"]


def test_a_stack_whose_files_went_away_leaves_the_book() -> None:
    book = StackBook()
    book.observe(look(pending={"s": {"red": "s_red.png"}}), 0.0)
    book.observe(look(), 1.0)
    assert "s" not in book.lives


def test_an_overdue_stack_goes_from_seen_straight_to_analysed() -> None:
    book = StackBook()
    book.observe(look(pending={"s": {"red": "s_red.png"}}), 0.0)
    book.observe(look(overdue={"s": {"red": "s_red.png"}}), 700.0)
    book.analysed("s", {"red": "s_red.png"}, analysis(kind="quarantined"))
    assert book.lives["s"].phase == Phase.ANALYSED


def test_a_file_with_an_unusable_name_enters_already_analysed() -> None:
    book = StackBook()
    book.analysed("unsafe-1", {"red": "bad\\name_red.png"}, analysis("unsafe-1", "failed"))
    assert [life.stack_id for life in book.to_record()] == ["unsafe-1"]


def test_files_of_stacks_in_hand_are_hidden_from_the_tracker() -> None:
    book = recorded_book()
    listing = {name: Entry(10, 1) for name in FOUR.values()}
    assert book.hidden(listing) == set(FOUR.values())


def test_a_failed_commit_sends_the_stack_out_to_be_seen_afresh() -> None:
    book = StackBook()
    book.observe(look(ready={"s": FOUR}), 0.0)
    book.analysed("s", FOUR, analysis())
    book.record_failed("s")
    assert "s" not in book.lives
    book.observe(look(ready={"s": FOUR}), 5.0)
    assert book.lives["s"].phase == Phase.COMPLETE


def test_a_recorded_stack_is_due_for_disposal_at_once() -> None:
    book = recorded_book()
    assert [life.stack_id for life in book.to_dispose(1.0)] == ["s"]


def test_a_failed_disposal_waits_for_its_retry_time_and_keeps_the_stack() -> None:
    book = recorded_book()
    book.dispose_failed("s", retry_at=11.0)
    assert book.to_dispose(10.9) == []
    assert [life.stack_id for life in book.to_dispose(11.0)] == ["s"]
    assert book.lives["s"].phase == Phase.RECORDED  # never analysed again, never quarantined


def test_a_half_moved_stack_is_not_seen_as_a_new_incomplete_one() -> None:
    """Three of four files still in the folder after a failed move stay hidden with their stack."""
    book = recorded_book()
    book.dispose_failed("s", retry_at=11.0)
    remaining = {name: Entry(10, 1) for name in list(FOUR.values())[1:]}
    assert book.hidden(remaining) >= set(remaining)


def test_an_acknowledgement_after_disposal_publishes_the_stack_with_its_delivery_time() -> None:
    book = recorded_book(now=1.0)
    assert book.disposed("s", 1.5) is None
    assert "m1" in book.unpublished
    assert book.published("m1", 1.25 + 1.0) == pytest.approx(1.25)
    assert not book.unpublished


def test_an_acknowledgement_before_disposal_is_applied_when_the_files_are_gone() -> None:
    book = recorded_book(now=1.0)
    assert book.published("m1", 1.2) is None
    assert book.disposed("s", 1.3) == pytest.approx(0.2)
    assert not book.unpublished


def test_a_duplicate_ends_at_disposal_its_message_belongs_to_the_outbox() -> None:
    book = StackBook()
    book.observe(look(ready={"s": FOUR}), 0.0)
    book.analysed("s", FOUR, analysis())
    book.recorded("s", duplicate=True)
    book.disposed("s", 1.0)
    assert not book.lives
    assert not book.unpublished


def test_stacks_waiting_for_acknowledgement_are_bounded() -> None:
    book = StackBook(keep_unpublished=2)
    for n in range(3):
        sid = f"s{n}"
        book.observe(look(ready={sid: FOUR}), 0.0)
        book.analysed(sid, FOUR, analysis(sid, msg_id=f"m{n}"))
        book.recorded(sid)
        book.disposed(sid, 1.0)
    assert list(book.unpublished) == ["m1", "m2"]  # the oldest let go; the outbox still delivers it


def test_files_left_in_place_stay_hidden_until_they_change() -> None:
    book = recorded_book()
    left = {name: Entry(10, 1) for name in FOUR.values()}
    book.disposed("s", 2.0, left)
    assert book.hidden(left) == set(FOUR.values())
    changed = {**left, "s_red.png": Entry(11, 2)}
    assert "s_red.png" not in book.hidden(changed)
    assert "s_red.png" not in book.hidden(left)  # released for good: seen afresh from now on


def test_a_stack_in_hand_does_not_accept_a_second_analysis() -> None:
    book = recorded_book()
    assert not book.accepts("s")
    with pytest.raises(TransitionError, match="recorded -> analysed"):
        book.analysed("s", FOUR, analysis())


def test_moves_outside_the_table_are_refused() -> None:
    book = StackBook()
    book.observe(look(ready={"s": FOUR}), 0.0)
    with pytest.raises(TransitionError, match="complete -> recorded"):
        book.recorded("s")


def test_a_stack_not_in_the_book_cannot_be_recorded() -> None:
    with pytest.raises(TransitionError, match="not in the book"):
        StackBook().recorded("nobody")


def test_the_table_only_moves_a_stack_forward() -> None:
    order = list(Phase)
    for phase, targets in TRANSITIONS.items():
        if phase is None:
            continue  # entering the book
        for target in targets:
            assert target is None or order.index(target) > order.index(phase), (phase, target)


def test_the_next_retry_is_the_earliest_failed_disposal() -> None:
    book = recorded_book()
    assert book.next_retry() is None
    book.dispose_failed("s", retry_at=11.0)
    assert book.next_retry() == 11.0
