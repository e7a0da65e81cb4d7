"""Named points where a test can make the real agent process die, as a power cut or the OOM killer would.

`HPA_EDGE_CRASH_AT=<point>[:<n>]` makes the process SIGKILL itself the n-th time (default
first) it reaches `<point>`. Unset, `reach` is one dictionary lookup. The crash-point test
(tests/test_crashpoints.py) kills the agent at every step of a stack's path and checks
that after a restart each stack has exactly one answer and every file is where it belongs.
Points: `after_decode` (a stack decoded, nothing recorded), `after_commit` (recorded, no file
moved), `after_move` (after each file moved: `after_move:2` dies between the second and the
third), `after_publish` (a message sent, its acknowledgement not yet written).
"""

from __future__ import annotations

import os
import signal

POINTS = ("after_decode", "after_commit", "after_move", "after_publish")


def _parse(spec: str) -> tuple[str, int]:
    point, _, count = spec.partition(":")
    if point not in POINTS:
        raise ValueError(f"HPA_EDGE_CRASH_AT: unknown point {point!r} (one of {', '.join(POINTS)})")
    return point, int(count or 1)


_TARGET = _parse(os.environ["HPA_EDGE_CRASH_AT"]) if os.environ.get("HPA_EDGE_CRASH_AT") else None
_reached: dict[str, int] = {}


def reach(point: str) -> None:
    if _TARGET is None or _TARGET[0] != point:
        return
    _reached[point] = _reached.get(point, 0) + 1
    if _reached[point] == _TARGET[1]:
        os.kill(os.getpid(), signal.SIGKILL)
