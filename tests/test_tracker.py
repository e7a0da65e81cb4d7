"""When a channel file counts as written and a stack as ready or overdue (no files, a made-up clock)."""

from __future__ import annotations

import pytest

from agent.service.tracker import RENAME_QUIET, STALE_WRITE_FACTOR, Entry, Tracker
from agent.stacks.labels import CHANNELS
from agent.stacks.naming import ChannelName, NamingScheme

SETTLE, TIMEOUT = 2.0, 60.0


def tracker() -> Tracker:
    return Tracker(NamingScheme(), settle=SETTLE, timeout=TIMEOUT)


def listing(
    stack: str = "s", channels: tuple[str, ...] = CHANNELS, size: int = 100, mtime: int = 1
) -> dict[str, Entry]:
    return {f"{stack}_{c}.png": Entry(size, mtime) for c in channels}


def close_all(t: Tracker, names: dict[str, Entry], now: float) -> None:
    for name in names:
        t.note(name, "modified", now)
        t.note(name, "closed", now)


def test_a_stack_closed_after_writing_is_ready_at_once() -> None:
    t, files = tracker(), listing()
    close_all(t, files, 0.0)
    assert list(t.look(files, 0.0).ready) == ["s"]


def test_a_stack_whose_files_are_renamed_in_is_ready_at_once() -> None:
    t, files = tracker(), listing()
    for name in files:
        t.note(name, "moved_in", 0.0)
    assert list(t.look(files, 0.0).ready) == ["s"]


def test_a_stack_renamed_in_needs_no_quiet_time_and_no_second_look() -> None:
    """What the inotify watcher reports for a rename from beside the folder: one IN_MOVED_TO
    per file, nothing else; the loop need not come back after RENAME_QUIET."""
    t, files = tracker(), listing()
    for name in files:
        t.note(name, "moved_in", 0.0)
    assert list(t.look(files, 0.0).ready) == ["s"]
    assert t.next_due(0.0) is None


def test_an_empty_file_renamed_in_is_not_written_by_the_event() -> None:
    t, files = tracker(), listing(size=0)
    for name in files:
        t.note(name, "moved_in", 0.0)
    assert not t.look(files, 0.0).ready
    assert list(t.look(files, SETTLE).ready) == ["s"]  # unchanged for the settle time, as polling


def test_a_file_created_with_no_write_after_it_was_renamed_in_from_elsewhere() -> None:
    t, files = tracker(), listing()
    for name in files:
        t.note(name, "created", 0.0)
    assert not t.look(files, 0.0).ready  # a write may still follow
    assert list(t.look(files, RENAME_QUIET).ready) == ["s"]


def test_a_created_file_that_is_being_written_waits_for_its_close() -> None:
    t, files = tracker(), listing()
    for name in files:
        t.note(name, "created", 0.0)
        t.note(name, "modified", 0.0)
    assert not t.look(files, SETTLE * 2).ready
    close_all(t, files, SETTLE * 2)
    assert t.look(files, SETTLE * 2).ready


def test_without_events_a_file_is_written_once_unchanged_for_settle_seconds() -> None:
    t, files = tracker(), listing()
    assert not t.look(files, 0.0).ready
    assert not t.look(files, SETTLE - 0.1).ready
    assert list(t.look(files, SETTLE).ready) == ["s"]


def test_a_growing_file_restarts_the_settle_time() -> None:
    t = tracker()
    t.look(listing(size=100), 0.0)
    assert not t.look(listing(size=200), SETTLE).ready  # grew: unchanged only since now
    assert not t.look(listing(size=200), SETTLE * 1.5).ready
    assert t.look(listing(size=200), SETTLE * 2).ready


def test_a_touched_file_restarts_the_settle_time() -> None:
    t = tracker()
    t.look(listing(mtime=1), 0.0)
    assert not t.look(listing(mtime=2), SETTLE).ready


def test_a_write_without_a_close_must_stay_unchanged_much_longer() -> None:
    t, files = tracker(), listing()
    for name in files:
        t.note(name, "modified", 0.0)
    assert not t.look(files, 0.0).ready
    assert not t.look(files, SETTLE * 2).ready
    assert t.look(files, SETTLE * STALE_WRITE_FACTOR).ready  # the close event was lost


def test_a_write_after_the_close_makes_the_file_unwritten_again() -> None:
    t, files = tracker(), listing()
    close_all(t, files, 0.0)
    t.note("s_red.png", "modified", 0.1)
    assert not t.look(files, 0.1).ready


def test_an_empty_file_is_never_taken_as_written_by_an_event() -> None:
    t, files = tracker(), listing(size=0)
    close_all(t, files, 0.0)
    assert not t.look(files, 0.0).ready
    assert t.look(files, SETTLE).ready  # but an empty file left alone is, and is then refused as empty


@pytest.mark.parametrize("order", [CHANNELS, tuple(reversed(CHANNELS)), ("green", "yellow", "red", "blue")])
def test_a_stack_is_ready_only_with_all_four_channels_whatever_the_order(order: tuple[str, ...]) -> None:
    t = tracker()
    present: dict[str, Entry] = {}
    for i, channel in enumerate(order):
        present.update(listing(channels=(channel,)))
        t.note(f"s_{channel}.png", "closed", float(i))
        look = t.look(present, float(i))
        assert bool(look.ready) == (i == 3)


def test_an_incomplete_stack_is_overdue_after_the_timeout_from_its_first_file() -> None:
    t = tracker()
    files = listing(channels=("red", "green", "blue"))
    close_all(t, files, 0.0)
    assert t.look(files, 0.0).waiting == 1
    look = t.look(files, TIMEOUT - 1)
    assert not look.overdue
    assert look.waiting == 1
    look = t.look(files, TIMEOUT)
    assert look.overdue == {"s": {c: f"s_{c}.png" for c in ("blue", "green", "red")}}


def test_a_stack_still_growing_at_the_timeout_is_overdue_too() -> None:
    t = tracker()
    for second in range(int(TIMEOUT)):
        look = t.look(listing(size=100 + second), float(second))
        assert not look.ready
        assert not look.overdue
    assert list(t.look(listing(size=1000), TIMEOUT).overdue) == ["s"]


def test_files_that_disappear_are_forgotten() -> None:
    t, files = tracker(), listing()
    t.look(files, 0.0)
    t.look({}, 1.0)
    assert not t.files
    assert not t.look(files, SETTLE).ready  # back again: a new file, settle starts over


def test_forget_drops_files_the_caller_dealt_with() -> None:
    t, files = tracker(), listing()
    t.look(files, 0.0)
    t.forget(files)
    assert not t.files


def test_temporary_hidden_and_foreign_names_are_not_stacks() -> None:
    t = tracker()
    names = {
        n: Entry(10, 1) for n in (".s_red.png", "s_red.png.part", "s_red.png~", "notes.txt", "s_purple.png")
    }
    look = t.look(names, SETTLE * 10)
    assert not look.ready
    assert not look.overdue
    assert look.waiting == 0


def test_two_stacks_are_tracked_independently() -> None:
    t = tracker()
    a, b = listing("a"), listing("b", channels=("red",))
    close_all(t, a, 0.0)
    look = t.look({**a, **b}, 0.0)
    assert list(look.ready) == ["a"]
    assert look.waiting == 1


def test_a_name_is_parsed_when_first_seen_not_at_every_look(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[str] = []
    parse = NamingScheme.parse

    def counting(self: NamingScheme, name: str) -> ChannelName | None:
        asked.append(name)
        return parse(self, name)

    monkeypatch.setattr(NamingScheme, "parse", counting)
    t, files = tracker(), {**listing("a"), **listing("b", channels=("red",))}
    t.look(files, 0.0)
    first = len(asked)
    for now in (1.0, 2.0, 3.0):
        t.look(files, now)
    assert len(asked) == first  # a burst of 1,000 stacks no longer parses 4,000 names a look
    t.look({}, 4.0)
    t.look(files, 5.0)  # gone and back: new files, parsed again
    assert len(asked) == 2 * first


def test_an_unknown_event_kind_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown event kind"):
        tracker().note("s_red.png", "opened", 0.0)


def test_a_written_file_with_an_unusable_id_is_reported_once_settled() -> None:
    t = tracker()
    files = {"bad\x07id_red.png": Entry(10, 1)}
    assert not t.look(files, 0.0).unsafe
    assert t.look(files, SETTLE).unsafe == {"bad\x07id_red.png": "red"}


def test_the_next_look_is_due_when_a_renamed_in_file_has_been_quiet_long_enough() -> None:
    """The loop sleeps until then, not a whole poll interval (rename-in latency)."""
    t, files = tracker(), listing()
    for name in files:
        t.note(name, "created", 10.0)
    assert t.look(files, 10.05).ready == {}
    assert t.next_due(10.05) == pytest.approx(10.0 + RENAME_QUIET)
    assert list(t.look(files, 10.0 + RENAME_QUIET + 1e-6).ready) == ["s"]


def test_the_next_look_is_due_when_a_quiet_file_has_settled() -> None:
    t, files = tracker(), listing()
    t.look(files, 5.0)
    assert t.next_due(5.0) == pytest.approx(5.0 + SETTLE)


def test_nothing_is_due_when_every_file_is_written() -> None:
    t, files = tracker(), listing()
    close_all(t, files, 0.0)
    t.look(files, 0.0)
    assert t.next_due(0.0) is None
