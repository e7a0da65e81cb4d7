"""What the agent says over MQTT: topics, `msg_id`s and the JSON documents.

The contract is written down as a JSON Schema, `agent/messages.schema.json`; tests validate
real messages against it. Topics under the prefix (`hpa-edge/<instrument>` by default):
- `status`: retained "online" / "offline" (also the last will);
- `results`: one document per stack, QoS 1; `latest`: the same, retained; `review`: the
  results flagged for a person to look at (`review` true), QoS 1;
- `errors`: one document per stack that could not be processed, QoS 1;
- `stats`: periodic counters and latencies, QoS 0.
Delivery is at-least-once, so every result and error carries a `msg_id` that depends only
on the instrument, the stack id, its files' hashes and the bundle: a re-send after a crash
or a reconnect is recognisably the same message. Numbers sit at the top level (flat JSON
suits Grafana and Node-RED); the 28 scores form one flat object keyed by location.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from agent.stacks.labels import LOCATIONS

MESSAGE_SCHEMA_VERSION = 1
ONLINE = b"online"
DEGRADED = b"degraded"  # connected, but taking no stacks for now (stats.degraded says why)
OFFLINE = b"offline"
KINDS = ("status", "results", "latest", "review", "errors", "stats", "thumbnail")


def topic(prefix: str, kind: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown topic kind {kind!r}")
    return f"{prefix}/{kind}"


def msg_id(
    instrument: str, stack_id: str, files_sha256: str, bundle_sha256: str, kind: str = "result"
) -> str:
    """Stable identity of what the agent says about one stack content with one bundle."""
    text = "\0".join((kind, instrument, stack_id, files_sha256, bundle_sha256))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def files_entry(names: Mapping[str, str], sha256: Mapping[str, str]) -> dict[str, dict[str, str]]:
    return {channel: {"name": names[channel], "sha256": sha256.get(channel, "")} for channel in sorted(names)}


def result_document(
    *,
    msg_id: str,
    instrument: str,
    stack_id: str,
    files: Mapping[str, Mapping[str, str]],
    probabilities: Sequence[float],
    labels: Sequence[bool],
    bundle: Mapping[str, str],
    timings_ms: Mapping[str, float],
    time: str | None = None,
    trust: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """`trust`: the review fields (review, review_reasons, near_threshold, novelty, unavailable) and
    the image-quality figures (as quality_<name>), flat at the top level like everything else."""
    if len(probabilities) != len(LOCATIONS) or len(labels) != len(LOCATIONS):
        raise ValueError(f"a result needs {len(LOCATIONS)} scores and labels")
    document: dict[str, Any] = {
        "schema_version": MESSAGE_SCHEMA_VERSION,
        "kind": "result",
        "msg_id": msg_id,
        "instrument": instrument,
        "stack_id": stack_id,
        "time": time or utc_now(),
        "labels": [name for name, on in zip(LOCATIONS, labels, strict=True) if on],
        "n_labels": int(sum(bool(on) for on in labels)),
        "scores": {name: round(float(p), 6) for name, p in zip(LOCATIONS, probabilities, strict=True)},
        "files": {channel: dict(entry) for channel, entry in files.items()},
        "bundle_id": bundle["id"],
        "bundle_sha256": bundle["sha256"],
        "purpose": bundle["purpose"],
    }
    for stage, ms in timings_ms.items():
        document[f"{stage}_ms"] = round(float(ms), 3)
    document.update(trust or {})
    return document


def error_document(
    *,
    msg_id: str,
    instrument: str,
    stack_id: str | None,
    code: str,
    message: str,
    files: Mapping[str, Mapping[str, str]],
    moved_to: str | None = None,
    time: str | None = None,
) -> dict[str, Any]:
    """`moved_to` (done, failed, quarantine) is added by whoever decides where the files go."""
    document = {
        "schema_version": MESSAGE_SCHEMA_VERSION,
        "kind": "error",
        "msg_id": msg_id,
        "instrument": instrument,
        "stack_id": stack_id,
        "time": time or utc_now(),
        "code": code,
        "message": message,
        "files": {channel: dict(entry) for channel, entry in files.items()},
    }
    if moved_to is not None:
        document["moved_to"] = moved_to
    return document


def encode(document: Mapping[str, Any]) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
