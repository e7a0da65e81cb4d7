"""The process's long-lived worker threads: one named pool per job (hashing files, reading a
stack's channels, the recipe beside the embedder, the recipe's measuring tasks), made on first
use and shared by every caller, so no stack starts threads of its own. Imports nothing of the
project."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

_pools: dict[str, ThreadPoolExecutor] = {}
_lock = threading.Lock()


def pool(name: str, workers: int) -> ThreadPoolExecutor:
    """The pool for `name` (its threads are named after it); `workers` counts on first use."""
    with _lock:
        found = _pools.get(name)
        if found is None:
            found = _pools[name] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        return found
