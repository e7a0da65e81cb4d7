"""Named points where a test can make the real agent process die, as a power cut or the OOM killer would.

`HPA_EDGE_CRASH_AT=<point>[:<n>]` makes the process SIGKILL itself the n-th time (default
first) it reaches `<point>`. Unset, `reach` is one dictionary lookup. The crash-point test
(tests/test_crashpoints.py) kills the agent at every step of a stack's path and checks
that after a restart each stack has exactly one answer and every file is where it belongs.
Points: `after_decode` (a stack decoded, nothing recorded), `after_commit` (recorded, no file
moved), `after_move` (after each file moved: `after_move:2` dies between the second and the
third), `after_publish` (a message sent, its acknowledgement not yet written).

`HPA_EDGE_CRASH_AT=hang_<point>[:<n>]` makes the thread that reaches `<point>` the n-th time
block for ever instead, as a wedged decoder or inference would: the process stays alive but
its loop stops turning, so the systemd watchdog must kill it (tests/test_systemd_container.py,
`hang_after_decode`).
"""

from __future__ import annotations

import os
import signal
import threading

POINTS = ("after_decode", "after_commit", "after_move", "after_publish")
HANG = "hang_"  # prefix of a point: block the thread there instead of killing the process


def _parse(spec: str) -> tuple[str, int]:
    point, _, count = spec.partition(":")
    if point.removeprefix(HANG) not in POINTS:
        raise ValueError(
            f"HPA_EDGE_CRASH_AT: unknown point {point!r} (one of {', '.join(POINTS)}, or hang_<point>)"
        )
    return point, int(count or 1)


_TARGET = _parse(os.environ["HPA_EDGE_CRASH_AT"]) if os.environ.get("HPA_EDGE_CRASH_AT") else None
_reached: dict[str, int] = {}


def reach(point: str) -> None:
    if _TARGET is None or _TARGET[0].removeprefix(HANG) != point:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == _TARGET[1]:
        if _TARGET[0].startswith(HANG):
            while True:  # hung for good: only a signal from outside ends this
                threading.Event().wait()
        os.kill(os.getpid(), signal.SIGKILL)
