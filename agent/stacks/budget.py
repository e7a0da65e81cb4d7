"""How much memory the threads decoding channels may hold at once.

Each channel file says its size in its header before a pixel is decoded, so its reader can
reserve what decoding and reducing it will take (`ChannelFile.decode_cost` plus
`Reducer.cost`) and wait until that fits beside the reservations of the other decode
threads. A reservation larger than the whole budget waits until it is alone, then runs: so
at any moment the channels being decoded hold at most max(budget, the largest channel's cost).
Reservations are served first come, first served, so a big channel is never starved by a
stream of small ones.

What a thread frees must also go back to the system, or the budget bounds nothing: by
default glibc's malloc raises its mmap threshold to the size of the biggest block freed (up to
32 MB) and keeps smaller freed blocks in each thread's arena, which it trims only above twice
that; two decode threads taking turns with 4000 x 4000 16-bit channels kept 46 MB each
(measured: 124 MB above the start for one 77 MB channel at a time). The first budget of a
process fixes the threshold at 16 MB (`mallopt`; glibc only, and not where the operator set
it: MALLOC_MMAP_THRESHOLD_, or glibc.malloc.mmap_threshold in GLIBC_TUNABLES): blocks from
16 MB are mapped and unmapped (measured: 78 MB for the same channels). It also fixes the trim
threshold at twice that, 32 MB, the value glibc's own rule would give it: fixing the mmap
threshold leaves it at 128 kB otherwise, and then every buffer of a few MB freed at an
arena's top (a 2048 x 2048 channel's 8-bit copy, the resize's float32 bands) went back to
the system and was faulted in again for the next channel, a fifth of a 2048 x 2048 16-bit
stack's time (measured: 32.1-32.6 -> 26.5-27.3 ms end to end, peak RSS +1.5 MB; 8 or 16 MB
kept most of the cost). What a big channel frees is still given back at once
(`agent.stacks.heap.trim`, from 32 MB reserved), as is the heap when the agent goes idle.
Not where the operator set it (MALLOC_TRIM_THRESHOLD_, glibc.malloc.trim_threshold).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# Two 2048 x 2048 16-bit channels fit side by side; a 6000 x 6000 16-bit one runs alone.
DEFAULT_BUDGET = 128 * 1024 * 1024
# Blocks from this size are mapped on their own and given back when freed (see above).
MMAP_THRESHOLD = 16 * 1024 * 1024
# Free memory an arena keeps at its top before giving it back (see above).
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_malloc_fixed = False


def fix_malloc_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD and its trim threshold at TRIM_THRESHOLD for
    this process (once); False where the C library is not glibc or the operator set the mmap
    threshold (an operator's trim threshold is kept too). `mallopt` overrides both ways an
    operator has of setting them, so each is looked for first."""
    global _malloc_fixed
    if _malloc_fixed or _operator_set("mmap_threshold"):
        return _malloc_fixed
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    _malloc_fixed = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    if _malloc_fixed and not _operator_set("trim_threshold"):
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return _malloc_fixed


def _operator_set(parameter: str) -> bool:
    """Whether glibc's malloc `parameter` was set from the environment: the old way
    (MALLOC_MMAP_THRESHOLD_) or as a tunable (GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...)."""
    tunables = os.environ.get("GLIBC_TUNABLES", "").split(":")
    named = {item.partition("=")[0].strip() for item in tunables}
    return f"MALLOC_{parameter.upper()}_" in os.environ or f"glibc.malloc.{parameter}" in named


class Budget:
    """Bytes shared by the threads that decode channels (see the module docstring)."""

    def __init__(self, capacity: int = DEFAULT_BUDGET) -> None:
        if capacity <= 0:
            raise ValueError(f"a decode budget must be > 0 bytes, not {capacity}")
        self.capacity = capacity
        fix_malloc_threshold()
        self.held = 0  # bytes reserved now
        self.most_held = 0  # the most ever reserved at once
        self.most_at_once = 0  # the most reservations ever held at once
        self._holders = 0
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold `nbytes` of the budget for the duration of the block (waits for its turn)."""
        nbytes = max(0, int(nbytes))
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving or not self._fits(nbytes):
                self._cond.wait()
            self._serving += 1
            self.held += nbytes
            self._holders += 1
            self.most_held = max(self.most_held, self.held)
            self.most_at_once = max(self.most_at_once, self._holders)
            self._cond.notify_all()  # the next ticket may fit too
        try:
            yield
        finally:
            with self._cond:
                self.held -= nbytes
                self._holders -= 1
                self._cond.notify_all()

    def _fits(self, nbytes: int) -> bool:
        return self._holders == 0 or self.held + nbytes <= self.capacity
