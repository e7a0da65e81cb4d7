"""`hpa-edge collect --broker HOST[:PORT] --db URL`: every instrument's results into one database.

Subscribes to `<prefix>/+/results`, `<prefix>/+/errors` and `<prefix>/+/status` (prefix
`hpa-edge` by default) with MQTT 5 at QoS 1, a fixed client id and a persistent session, and
writes each message into SQLite (`--db sqlite:///PATH`, the default is
`sqlite:///hpa-edge-results.db` in the current folder) or PostgreSQL (`--db postgresql://...`).
A message is acknowledged to the broker only after its row is committed; each `msg_id` is
stored once whatever the re-deliveries; bad input goes to the `invalid` table with the reason.
The schema is created and migrated at start (`--migrate-only` does just that).

`--group NAME` shares the subscriptions (`$share/NAME/...`): run several collectors with the
same group and distinct `--client-id`s to split the load. The broker options are the agent's
own (`--tls`, `--ca-file`, `--cert-file`, `--key-file`, `--username`, `--password-file`).
SIGTERM or Ctrl-C: what is held is written and acknowledged, then the collector leaves its
session for the broker to keep. Tables, queries and growing a facility: docs/collector.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading

from agent.collector.collector import Collector, Settings, default_client_id
from agent.collector.database import DEFAULT_URL, DatabaseError, open_database
from agent.collector.schema import migrate
from agent.service.mqtt_client import add_broker_arguments, broker_from_args


def add_database_argument(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get("HPA_EDGE_DB", DEFAULT_URL)
    parser.add_argument(
        "--db",
        default=default,
        help=f"sqlite:///PATH or postgresql://USER@HOST/DB (default $HPA_EDGE_DB or {DEFAULT_URL})",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_broker_arguments(parser)
    add_database_argument(parser)
    parser.add_argument("--prefix", default="hpa-edge", help="topic root: <prefix>/+/results... (hpa-edge)")
    parser.add_argument("--group", help="share the subscriptions with the collectors of this group")
    parser.add_argument(
        "--client-id", default="", help="fixed MQTT client id (default hpa-edge-collect[-GROUP]-HOSTNAME)"
    )
    parser.add_argument(
        "--session-expiry",
        type=int,
        default=7 * 24 * 3600,
        help="seconds the broker keeps the session and queues messages while the collector is away (1 week)",
    )
    parser.add_argument("--batch", type=int, default=500, help="most messages per transaction (500)")
    parser.add_argument(
        "--batch-ms", type=float, default=50, help="longest a message waits for its batch, ms (50)"
    )
    parser.add_argument(
        "--bundle-sha256",
        action="append",
        default=[],
        metavar="HASH",
        help="a bundle this facility uses (repeat); results of any other go to `invalid`",
    )
    parser.add_argument("--stats-interval", type=float, default=60, help="seconds between stats lines (60)")
    parser.add_argument("--migrate-only", action="store_true", help="create or migrate the schema and exit")


def run(args: argparse.Namespace) -> int:
    def log(line: str) -> None:
        print(f"collect {line}", file=sys.stderr, flush=True)

    try:
        broker = broker_from_args(args)
        if broker.protocol != "5":
            raise ValueError("the collector needs MQTT 5 (shared subscriptions, session expiry)")
        if args.batch < 1 or args.batch_ms <= 0 or args.session_expiry < 0:
            raise ValueError("--batch, --batch-ms must be positive and --session-expiry not negative")
    except ValueError as exc:
        print(f"collect: {exc}", file=sys.stderr)
        return 2
    try:
        db = open_database(args.db)
        migrate(db, log=log)
    except DatabaseError as exc:
        print(f"collect: {exc}", file=sys.stderr)
        return 1
    if args.migrate_only:
        db.close()
        return 0
    settings = Settings(
        prefix=args.prefix.rstrip("/"),
        group=args.group,
        client_id=args.client_id or default_client_id(args.group),
        session_expiry=args.session_expiry,
        batch=args.batch,
        batch_seconds=args.batch_ms / 1000,
        receive_maximum=max(2 * args.batch, 100),
        known_bundles=frozenset(args.bundle_sha256),
        stats_seconds=args.stats_interval,
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log(f"event=start db={args.db.split('@')[-1]} client_id={settings.client_id} group={args.group or '-'}")
    try:
        return Collector(db, broker, settings, log=log).run(stop)
    finally:
        db.close()
