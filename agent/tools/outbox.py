"""Look at the agent's outbox and act on it: list rows, send rejected ones again, drop rows.

  hpa-edge outbox list  --config /etc/hpa-edge/agent.toml [--json]
  hpa-edge outbox retry --config ... [--seq N ...]      rejected -> pending (all, or these)
  hpa-edge outbox drop  --config ... --seq N ... | --rejected

A row the broker refused for good (e.g. "Not authorized": an ACL mistake) stays in the outbox,
marked rejected, so nothing is lost while the cause is fixed; `retry` then puts it back and the
running agent sends it within a few seconds. `drop` deletes rows for good and insists on a
selection, so it cannot empty the outbox by accident. Safe while the agent runs: the database
is in WAL mode and each change is one short transaction. Run it as the agent's user
(`sudo -u hpa-edge`): files SQLite creates beside the database must stay the agent's.

Exit codes: 0 done; 1 the database cannot be read or changed, or a --seq names no such row;
2 bad arguments or configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from agent.service.config import ConfigError, load_config
from agent.service.outbox import Entry, Outbox
from agent.service.state import StateError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = argparse.ArgumentParser(add_help=False)
    source = where.add_argument_group("which database").add_mutually_exclusive_group()
    default = os.environ.get("HPA_EDGE_CONFIG")
    source.add_argument(
        "--config",
        type=Path,
        default=Path(default) if default else None,
        help="the agent's TOML configuration; its state.database (default: $HPA_EDGE_CONFIG)",
    )
    source.add_argument("--database", type=Path, help="the state database itself")
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = actions.add_parser("list", parents=[where], help="pending and rejected rows, oldest first")
    listing.add_argument("--json", action="store_true", help="one JSON object per row")
    retry = actions.add_parser("retry", parents=[where], help="put rejected rows back to pending")
    retry.add_argument("--seq", type=int, nargs="+", help="only these rows (default: every rejected row)")
    drop = actions.add_parser("drop", parents=[where], help="delete rows for good (a selection is required)")
    chosen = drop.add_mutually_exclusive_group(required=True)
    chosen.add_argument("--seq", type=int, nargs="+", help="these rows, pending or rejected")
    chosen.add_argument("--rejected", action="store_true", help="every rejected row")


def run(args: argparse.Namespace) -> int:
    try:
        database = _database(args)
    except ValueError as exc:
        print(f"hpa-edge outbox: {exc}", file=sys.stderr)
        return 2
    if not database.is_file():
        print(f"hpa-edge outbox: {database}: no such database", file=sys.stderr)
        return 1
    owner = database.stat().st_uid
    if os.geteuid() == 0 and owner != 0:  # root would leave root-owned -wal/-shm files the agent cannot open
        print(
            f"hpa-edge outbox: {database} belongs to uid {owner}; run this as that user "
            "(sudo -u hpa-edge hpa-edge outbox ...)",
            file=sys.stderr,
        )
        return 2
    try:
        outbox = Outbox(database)
    except StateError as exc:
        print(f"hpa-edge outbox: {exc}", file=sys.stderr)
        return 1
    try:
        if args.action == "list":
            return _list(outbox, args.json)
        if args.action == "retry":
            return _report("put back to pending", outbox.requeue(args.seq), args.seq, "rejected ")
        return _report("dropped", outbox.drop(None if args.rejected else args.seq), args.seq, "")
    except StateError as exc:
        print(f"hpa-edge outbox: {exc}", file=sys.stderr)
        return 1
    finally:
        outbox.close()


def _database(args: argparse.Namespace) -> Path:
    if args.database is not None:
        return Path(args.database)
    if args.config is None:
        raise ValueError("which database? give --config FILE (or set HPA_EDGE_CONFIG) or --database PATH")
    try:
        return load_config(args.config).state.database
    except ConfigError as exc:
        raise ValueError(f"configuration error: {exc}") from None


def _list(outbox: Outbox, as_json: bool) -> int:
    entries = outbox.entries()
    now = time.time()
    if as_json:
        for entry in entries:
            print(json.dumps(_document(entry, now)))
        return 0
    if entries:
        print(f"{'seq':>8}  {'kind':<8} {'msg_id':<36} {'state':<8} {'age':>6}  reason")
    for e in entries:
        age = _age(now - e.created_at)
        print(f"{e.seq:>8}  {e.kind:<8} {e.msg_id:<36} {e.state:<8} {age:>6}  {e.reason or ''}".rstrip())
    pending = sum(e.state == "pending" for e in entries)
    print(f"{pending} pending, {len(entries) - pending} rejected")
    return 0


def _document(entry: Entry, now: float) -> dict[str, object]:
    return {
        "seq": entry.seq,
        "kind": entry.kind,
        "msg_id": entry.msg_id,
        "state": entry.state,
        "reason": entry.reason,
        "created_at": entry.created_at,
        "age_s": round(now - entry.created_at, 1),
        "bytes": entry.size,
    }


def _age(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:.0f}s"


def _report(what: str, changed: list[int], asked: list[int] | None, kind: str) -> int:
    print(f"{what}: {len(changed)} row(s)" + (f" (seq {', '.join(map(str, changed))})" if changed else ""))
    missing = sorted(set(asked or ()) - set(changed))
    for seq in missing:
        print(f"hpa-edge outbox: seq {seq}: no such {kind}row", file=sys.stderr)
    return 1 if missing else 0
