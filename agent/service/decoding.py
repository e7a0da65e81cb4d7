"""Decoding the next stacks while the models run on the current one.

Decoding (OpenCV, numpy: the GIL is released) is the longest stage; running it in threads
beside the models keeps both cores busy. The look-ahead is bounded, so only a few prepared
stacks wait however large the batch (measured: 96 -> 110-115 stacks/s in a burst of 1,000
with two threads on 2 cores, and peak RSS 201 -> 193 MB against a whole batch ahead).

Memory: a prepared stack holds only the model's input and its figures, never full-resolution
pixels (`Pipeline.prepare` reads a channel at a time). While the threads decode, the channels
they hold share the pipeline's decode budget (`agent.stacks.budget`): a channel too big to
share it is decoded alone, so two big stacks never sit in memory at once (measured with two
6000 x 6000 16-bit stacks arriving together: peak 353 MB, idle 212 MB; docs/benchmark.md#memory).
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

DECODE_THREADS = 2
DECODE_AHEAD = 3

Item = TypeVar("Item")
Done = TypeVar("Done")


class Decoder:
    def __init__(self, threads: int = DECODE_THREADS, ahead: int = DECODE_AHEAD) -> None:
        self.ahead = ahead
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    def map(self, work: Callable[[Item], Done], items: Iterable[Item]) -> Iterator[tuple[Item, Done]]:
        """(item, work(item)) in the order of `items`, at most `ahead` computed in advance.

        `work` must not raise: it turns its own failures into a value (the pipeline's error analysis).
        """
        pending: deque[tuple[Item, Future[Done]]] = deque()
        waiting = iter(items)
        for item in itertools.islice(waiting, self.ahead):
            pending.append((item, self._pool.submit(work, item)))
        while pending:
            item, future = pending.popleft()
            following = next(waiting, None)
            if following is not None:
                pending.append((following, self._pool.submit(work, following)))
            yield item, future.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
