"""Giving freed heap memory back to the system: glibc's `malloc_trim`.

glibc keeps memory freed below data still in use (and each thread's arena) instead of
returning it, so a process that once decoded a big channel or built a large ONNX session
keeps that peak as resident memory. The decode threads (`stack`), the bundle loader and the
forests' session (`agent.model`) and the agent's idle loop (`agent.service`) call `trim`
after such a peak; measured effects are in their docstrings. On a C library without
`malloc_trim` (musl, macOS) it does nothing. Standard library only.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable
from typing import Literal

_trim: Callable[[int], int] | Literal[False] | None = None


def trim() -> None:
    """Return the free memory at the top of every glibc arena to the system, where it can."""
    global _trim
    if _trim is None:
        try:
            function = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
            function.argtypes = [ctypes.c_size_t]
            function.restype = ctypes.c_int
            _trim = function
        except (OSError, AttributeError):  # not glibc: nothing to do
            _trim = False
    if _trim:
        _trim(0)
