"""The agent's counters and the stats document built from them.

The loop counts (processed, failed, quarantined, duplicates; compute and delivery latencies);
the drainer, which owns the outbox, adds its own figures when it builds the document to send.
Data flows one way, loop -> Stats <- drainer, under one lock; neither calls back into the other.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from agent.model import messages

KEEP = 1000  # latencies kept for the percentiles


class Stats:
    def __init__(
        self, instrument: str, purpose: str = "production", clock: Callable[[], float] = time.time
    ) -> None:
        self.instrument = instrument
        self.purpose = purpose
        self.clock = clock
        self.started_at = clock()
        self.counts = {"processed": 0, "failed": 0, "quarantined": 0, "duplicates": 0}
        self.waiting = 0
        self.degraded: str | None = None  # why no stacks are taken for now; None when working
        self._compute_ms: deque[float] = deque(maxlen=KEEP)
        self._delivery_ms: deque[float] = deque(maxlen=KEEP)
        self._lock = threading.Lock()

    # The loop ----------------------------------------------------------------------------
    def count(self, kind: str, compute_ms: float | None = None) -> None:
        """One stack answered: kind is processed, failed, quarantined or duplicates."""
        with self._lock:
            self.counts[kind] += 1
            if compute_ms is not None:
                self._compute_ms.append(compute_ms)

    def delivered(self, seconds: float) -> None:
        with self._lock:
            self._delivery_ms.append(seconds * 1e3)

    # Any thread -------------------------------------------------------------------------
    def compute_latencies(self) -> list[float]:
        """Decode-to-labels milliseconds of the last stacks, oldest first."""
        with self._lock:
            return list(self._compute_ms)

    def status_line(self, connected: bool) -> str:
        """One line for `systemctl status`."""
        c = self.counts
        degraded = f"DEGRADED: {self.degraded}; " if self.degraded else ""
        return degraded + (
            f"processed {c['processed']}, failed {c['failed']}, quarantined {c['quarantined']}, "
            f"waiting {self.waiting}; MQTT {'connected' if connected else 'not connected'}"
        )

    def document(self, outbox: dict[str, int], inflight: int, connected: bool) -> dict[str, Any]:
        """The stats message; `outbox`, `inflight` and `connected` are the drainer's own figures."""
        with self._lock:
            compute = np.asarray(self._compute_ms, dtype=np.float64)
            delivery = np.asarray(self._delivery_ms, dtype=np.float64)
            counts = dict(self.counts)
        return {
            "schema_version": messages.MESSAGE_SCHEMA_VERSION,
            "kind": "stats",
            "instrument": self.instrument,
            "time": messages.utc_now(),
            "uptime_s": round(self.clock() - self.started_at, 1),
            **counts,
            "waiting_stacks": self.waiting,
            "outbox_pending": outbox["pending"],
            "outbox_rejected": outbox["rejected"],
            "inflight": inflight,
            "latency_p50_ms": percentile(compute, 50),
            "latency_p95_ms": percentile(compute, 95),
            "latency_max_ms": percentile(compute, 100),
            "delivery_p50_ms": percentile(delivery, 50),
            "delivery_p95_ms": percentile(delivery, 95),
            "degraded": self.degraded,
            "purpose": self.purpose,
        }


def percentile(values: np.ndarray, q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None
