"""`hpa-edge query NAME --db URL`: the canned questions of a facility, as a table or JSON.

NAME is one of: location (results with a location among their labels), results (by
instrument, bundle or stack-id pattern), review (flagged for a person), instruments (per
instrument: results, flagged, errors, last result, last status), bundles (per bundle), errors
(counts by code), invalid (bad input on the wire). Filters: `--since` and `--until` (ISO 8601,
UTC when no zone is given), `--instrument`, `--stack`, `--bundle` (SQL LIKE patterns, `%` any
text), `--location`, `--limit`. `--sql` prints the statement instead of running it; the same
statements, with a Grafana panel, are in docs/collector.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from agent.collector.database import DatabaseError, open_database
from agent.collector.queries import QUERIES
from agent.collector.queries import run as run_query
from agent.collector.schema import LATEST
from agent.stacks.labels import LOCATIONS
from agent.tools.collect import add_database_argument


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=sorted(QUERIES), help="which question")
    add_database_argument(parser)
    parser.add_argument("--since", help="from this time on (ISO 8601, e.g. 2026-11-15)")
    parser.add_argument("--until", help="before this time")
    parser.add_argument("--instrument", help="instrument name or LIKE pattern")
    parser.add_argument("--stack", help="stack id LIKE pattern, e.g. 'P17%%'")
    parser.add_argument("--bundle", help="bundle id or sha256, or a LIKE pattern")
    parser.add_argument("--location", help="for `location`: one of the 28 locations")
    parser.add_argument("--limit", type=int, default=1000, help="most rows for listings (1000)")
    parser.add_argument("--json", action="store_true", help="one JSON array of objects")
    parser.add_argument("--sql", action="store_true", help="print the SQL and exit")


def table(names: list[str], rows: list[dict[str, Any]], out: TextIO) -> None:
    def cell(value: Any) -> str:
        if isinstance(value, list):
            return ", ".join(map(str, value)) or "-"
        if isinstance(value, float):
            return f"{value:.3g}"
        return "-" if value is None else str(value)

    cells = [[cell(row[name]) for name in names] for row in rows]
    widths = [min(60, max([len(name), *(len(c[i]) for c in cells)])) for i, name in enumerate(names)]
    out.write("  ".join(name.ljust(w) for name, w in zip(names, widths, strict=True)).rstrip() + "\n")
    for line in cells:
        text = [(c if len(c) <= w else c[: w - 1] + "…").ljust(w) for c, w in zip(line, widths, strict=True)]
        out.write("  ".join(text).rstrip() + "\n")
    out.write(f"({len(rows)} row{'' if len(rows) == 1 else 's'})\n")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.sql:
        out.write(QUERIES[args.name].sql + ";\n")
        return 0
    if args.name == "location":
        if not args.location:
            print("query: `location` needs --location NAME", file=sys.stderr)
            return 2
        if args.location not in LOCATIONS:
            known = ", ".join(LOCATIONS)
            print(f"query: unknown location {args.location!r}; one of: {known}", file=sys.stderr)
            return 2
    try:
        db = open_database(args.db)
    except DatabaseError as exc:
        print(f"query: {exc}", file=sys.stderr)
        return 1
    try:
        try:
            _, found = db.rows("SELECT MAX(version) FROM schema_version")
            version = found[0][0] or 0
        except Exception:
            version = 0
        if version != LATEST:
            print(
                f"query: {args.db} is not a collector database at schema {LATEST} (found {version}); "
                "`hpa-edge collect --migrate-only --db URL` creates or migrates it",
                file=sys.stderr,
            )
            return 1
        try:
            names, rows = run_query(db, args.name, vars(args))
        except ValueError as exc:
            print(f"query: {exc}", file=sys.stderr)
            return 2
    finally:
        db.close()
    if args.json:
        out.write(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    else:
        table(names, rows, out)
    return 0
