"""`hpa-edge listen --broker HOST[:PORT]`: watch a device's results arrive, as a table.

What an operator runs to check that a microscope's agent is alive and publishing: it
subscribes to results, errors and status (default `hpa-edge/+/#` without stats) and prints
one line per message. A label near its threshold is shown with `?`; a result flagged for
review ends with `REVIEW:` and its reasons (`--topic 'hpa-edge/+/review'` shows only those).
`--count N` exits after N results or errors, `--seconds S` after S seconds; `--json` prints
the raw documents instead of the table. The broker options are the agent's own
(`--protocol`, `--username`/`--password-file`, `--tls` with `--ca-file`, `--cert-file`,
`--key-file`), so whatever the agent can reach, `listen` can too.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Any, TextIO

from agent.service.mqtt_client import Broker, add_broker_arguments, broker_from_args, make_client

COLUMNS = ("time", "instrument", "stack", "labels", "top score", "ms")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_broker_arguments(parser)
    parser.add_argument("--topic", default="hpa-edge/+/#", help="subscription (default hpa-edge/+/#)")
    parser.add_argument(
        "--count", type=int, default=0, help="exit after this many results/errors (0 = never)"
    )
    parser.add_argument("--seconds", type=float, default=0, help="exit after this long (0 = never)")
    parser.add_argument("--json", action="store_true", help="print raw JSON documents")


def format_row(topic: str, payload: bytes) -> str | None:
    """One table line for a message; None for messages the table does not show (stats)."""
    kind = topic.rsplit("/", 1)[-1]
    if kind == "status":
        return f"{'':24} {topic.split('/')[-2]:<14} status: {payload.decode(errors='replace')}"
    if kind not in ("results", "errors", "review"):
        return None
    try:
        doc: dict[str, Any] = json.loads(payload)
    except ValueError:
        return f"{'':24} {'?':<14} unreadable message on {topic}"
    stack = str(doc.get("stack_id"))[:36]
    if kind == "errors":
        where = f"{doc.get('time', ''):<24} {doc.get('instrument', ''):<14} {stack:<36}"
        return f"{where} ERROR {doc.get('code')}: {doc.get('message')}"
    scores = doc.get("scores", {})
    top = max(scores.items(), key=lambda kv: kv[1]) if scores else ("-", 0.0)
    near = set(doc.get("near_threshold", []))
    labels = ", ".join(f"{name}?" if name in near else name for name in doc.get("labels", [])) or "(none)"
    demo = " [demo]" if doc.get("purpose") == "demo" else ""
    flag = f" | REVIEW: {', '.join(doc.get('review_reasons', []))}" if doc.get("review") else ""
    return (
        f"{doc.get('time', ''):<24} {doc.get('instrument', ''):<14} {stack:<36} {labels}{demo}"
        f"  | top {top[0]} {top[1]:.2f} | {doc.get('total_ms', 0):.1f} ms{flag}"
    )


def listen(args: argparse.Namespace, broker: Broker, out: TextIO = sys.stdout) -> int:
    done = threading.Event()
    seen = 0
    client = make_client(broker)

    def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            print(f"listen: broker refused the connection: {reason}", file=sys.stderr)
            done.set()
            return
        client.subscribe(args.topic, qos=1)

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        nonlocal seen
        kind = message.topic.rsplit("/", 1)[-1]
        if kind in ("stats", "review") and kind not in args.topic:
            return  # stats only when asked; a flagged result already came on results
        if args.json:
            out.write(message.payload.decode(errors="replace") + "\n")
        else:
            row = format_row(message.topic, message.payload)
            if row is not None:
                out.write(row + "\n")
        out.flush()
        if kind in ("results", "errors", "review"):
            seen += 1
            if args.count and seen >= args.count:
                done.set()

    client.on_connect = on_connect
    client.on_message = on_message
    try:
        client.connect(broker.host, broker.port, keepalive=broker.keepalive)
    except OSError as exc:  # ssl.SSLError is one too
        print(f"listen: cannot reach {broker.address}: {exc}", file=sys.stderr)
        return 1
    if not args.json:
        out.write(f"listening on {broker.address} topic {args.topic}\n")
    client.loop_start()
    deadline = time.monotonic() + args.seconds if args.seconds else None
    try:
        while not done.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            done.wait(0.2)
    except KeyboardInterrupt:
        pass
    client.disconnect()
    client.loop_stop()
    if args.count and seen < args.count:
        print(f"listen: {seen} of {args.count} messages arrived", file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        broker = broker_from_args(args)
    except ValueError as exc:
        print(f"listen: {exc}", file=sys.stderr)
        return 2
    return listen(args, broker)
