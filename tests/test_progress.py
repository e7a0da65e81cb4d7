"""Progress lines: rate and ETA, not too often."""

from __future__ import annotations

import io

from export.reports.progress import Progress, format_seconds


def test_a_line_names_done_total_rate_and_eta() -> None:
    stream = io.StringIO()
    progress = Progress("embed", 10, every=0.0, stream=stream)
    progress.advance(4)
    line = stream.getvalue().strip()
    assert line.startswith("embed: 4/10 stacks (40.0%)")
    assert "stacks/s" in line
    assert "eta" in line


def test_lines_are_rate_limited_but_the_last_one_always_comes() -> None:
    stream = io.StringIO()
    progress = Progress("embed", 100, every=3600.0, stream=stream)
    for _ in range(100):
        progress.advance()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("embed: 100/100")


def test_seconds_are_shown_as_clock_time() -> None:
    assert format_seconds(75) == "1:15"
    assert format_seconds(3725) == "1:02:05"
    assert format_seconds(float("nan")) == "?"
