"""A simulated fleet: instruments publishing recorded-looking results, as fast as the broker takes them.

For measuring and testing the collector without microscopes. Each instrument is one MQTT
client with its own connection (as a real agent is), publishing at QoS 1 on
`<prefix>/<instrument>/results` documents made by the agent's own `result_document`: 28
scores, the labels over 0.5, four files with hashes, a bundle, timings, the review fields.
Each document has a distinct `msg_id`, so the number of rows a collector stores is the number
of results delivered exactly once.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from agent.model.messages import encode, files_entry, msg_id, result_document
from agent.service.mqtt_client import Broker, make_client
from agent.stacks.labels import LOCATIONS

CHANNELS = ("blue", "green", "red", "yellow")
BUNDLE = {
    "id": "lite0-int8-fleet",
    "sha256": hashlib.sha256(b"simulated fleet bundle").hexdigest(),
    "purpose": "demo",
}


def results(instrument: str, count: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """`count` result documents of one instrument, as its agent would publish them."""
    rng = random.Random(f"{instrument}/{seed}")
    for i in range(count):
        stack = str(uuid.UUID(int=rng.getrandbits(128)))
        names = {c: f"{stack}_{c}.png" for c in CHANNELS}
        hashes = {c: hashlib.sha256(f"{stack}{c}{seed}{i}".encode()).hexdigest() for c in CHANNELS}
        scores = [rng.betavariate(0.4, 3.0) for _ in LOCATIONS]
        labels = [s >= 0.5 for s in scores]
        near = [name for name, s in zip(LOCATIONS, scores, strict=True) if 0.4 <= s < 0.6]
        reasons = (["near_threshold"] if near else []) + ([] if any(labels) else ["no_label"])
        files_hash = hashlib.sha256("".join(hashes[c] for c in CHANNELS).encode()).hexdigest()
        yield result_document(
            msg_id=msg_id(instrument, stack, files_hash, BUNDLE["sha256"]),
            instrument=instrument,
            stack_id=stack,
            files=files_entry(names, hashes),
            probabilities=scores,
            labels=labels,
            bundle=BUNDLE,
            timings_ms={
                "decode": rng.uniform(4, 8),
                "preprocess": rng.uniform(1, 2),
                "embed": rng.uniform(1.5, 3),
                "classify": rng.uniform(1, 2),
                "total": rng.uniform(8, 15),
            },
            trust={
                "review": bool(reasons),
                "review_reasons": reasons,
                "near_threshold": near,
                "novelty": round(rng.uniform(0.5, 1.5), 3),
                "unavailable": [],
            },
        )


@dataclass
class FleetRun:
    published: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.published / self.seconds if self.seconds > 0 else 0.0


def publish(
    broker: Broker,
    instruments: int = 20,
    per_instrument: int = 500,
    prefix: str = "hpa-edge",
    seed: int = 0,
    inflight: int = 100,
    name: str = "scope",
) -> FleetRun:
    """Every instrument publishes its results at full speed, in parallel; returns when the broker has all."""
    payloads = {
        f"{name}{i:02d}": [encode(doc) for doc in results(f"{name}{i:02d}", per_instrument, seed)]
        for i in range(instruments)
    }
    start = threading.Barrier(instruments + 1)
    failures: list[str] = []

    def one(instrument: str, docs: list[bytes]) -> None:
        client = make_client(broker, client_id=f"fleet-{instrument}-{seed}")
        client.max_inflight_messages_set(inflight)
        client.max_queued_messages_set(0)
        try:
            client.connect(broker.host, broker.port, keepalive=30)
            client.loop_start()
            client.publish(f"{prefix}/{instrument}/status", b"online", qos=1, retain=True)
            start.wait(30)
            sent = [client.publish(f"{prefix}/{instrument}/results", doc, qos=1) for doc in docs]
            for info in sent:
                info.wait_for_publish(120)
                if not info.is_published():
                    failures.append(f"{instrument}: message {info.mid} not acknowledged")
                    break
        except Exception as exc:
            failures.append(f"{instrument}: {exc}")
            start.abort()
        finally:
            client.disconnect()
            client.loop_stop()

    threads = [threading.Thread(target=one, args=item, daemon=True) for item in payloads.items()]
    for thread in threads:
        thread.start()
    start.wait(30)
    began = time.monotonic()
    for thread in threads:
        thread.join()
    if failures:
        raise RuntimeError("; ".join(failures[:5]))
    return FleetRun(instruments * per_instrument, time.monotonic() - began)
