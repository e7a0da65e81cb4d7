"""`hpa-edge agreement --results FILE --labels CSV`: how a device's results compare with known labels.

Reads result documents (one JSON per line, as `hpa-edge predict` prints them or `listen
--json` records them) and a Kaggle-style label file (`Id,Target`), and reports what a
biologist would feel: labels per stack (truth vs predicted), the exact label-set rate,
sample-averaged and macro F1, the locations predicted far more often than they occur, and
whether the review flag points at the wrong answers (the share of stacks flagged, how often
a flagged and an unflagged stack has a wrong label set, per reason). Stacks without a label
in the file are left out and counted. Exit 0, or 2 on unreadable input.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.stacks.labels import LOCATIONS, parse_target

OVER_RATE, RARE_RATE = 0.40, 0.10  # predicted on more than 40% while true on fewer than 10%


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, required=True, help="result documents, one JSON per line")
    parser.add_argument("--labels", type=Path, required=True, help="Id,Target label file")
    parser.add_argument("--json", type=Path, help="also write the figures here")


def read_results(path: Path) -> list[dict[str, Any]]:
    documents = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            document = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{number}: not a JSON document") from None
        if document.get("kind") == "result":
            documents.append(document)
    return documents


def read_truth(path: Path) -> dict[str, frozenset[str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return {
            row["Id"]: frozenset(LOCATIONS[i] for i in parse_target(row["Target"]))
            for row in csv.DictReader(handle)
        }


def agreement(documents: Sequence[Mapping[str, Any]], truth: Mapping[str, frozenset[str]]) -> dict[str, Any]:
    """The figures (pure: documents and truth in, numbers out)."""
    known = [d for d in documents if d["stack_id"] in truth]
    if not known:
        raise ValueError("no result has a label in the label file")
    true = np.array([[name in truth[d["stack_id"]] for name in LOCATIONS] for d in known])
    predicted = np.array([[name in d["labels"] for name in LOCATIONS] for d in known])
    wrong = (true != predicted).any(axis=1)
    flagged = np.array([bool(d.get("review")) for d in known])
    prevalence, rate = true.mean(axis=0), predicted.mean(axis=0)
    figures: dict[str, Any] = {
        "stacks": len(known),
        "unlabelled_results": len(documents) - len(known),
        "labels_per_stack_true": round(float(true.sum(axis=1).mean()), 3),
        "labels_per_stack_predicted": round(float(predicted.sum(axis=1).mean()), 3),
        "exact_label_set_rate": round(float((~wrong).mean()), 3),
        "sample_f1": round(float(np.mean(_f1(true, predicted, axis=1))), 3),
        "macro_f1": _macro_f1(true, predicted),
        "over_predicted": [
            {"location": name, "true_rate": round(float(p), 3), "predicted_rate": round(float(r), 3)}
            for name, p, r in zip(LOCATIONS, prevalence, rate, strict=True)
            if r > OVER_RATE and p < RARE_RATE
        ],
        "flagged_share": round(float(flagged.mean()), 3),
        "wrong_when_flagged": _share(wrong[flagged]),
        "wrong_when_not_flagged": _share(wrong[~flagged]),
        "reasons": {},
    }
    reasons: Counter[str] = Counter()
    wrong_by_reason: Counter[str] = Counter()
    for document, is_wrong in zip(known, wrong, strict=True):
        for reason in document.get("review_reasons", []):
            reasons[reason] += 1
            wrong_by_reason[reason] += int(is_wrong)
    figures["reasons"] = {
        reason: {"stacks": n, "wrong": round(wrong_by_reason[reason] / n, 3)} for reason, n in reasons.items()
    }
    return figures


def _f1(true: np.ndarray, predicted: np.ndarray, axis: int) -> np.ndarray:
    tp = (true & predicted).sum(axis=axis)
    denominator = true.sum(axis=axis) + predicted.sum(axis=axis)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), np.nan)


def _macro_f1(true: np.ndarray, predicted: np.ndarray) -> float | None:
    """Mean over locations with a true or a predicted positive (the training report's rule)."""
    scores = _f1(true, predicted, axis=0)
    return round(float(np.nanmean(scores)), 3) if np.isfinite(scores).any() else None


def _share(values: np.ndarray) -> float | None:
    return round(float(values.mean()), 3) if len(values) else None


def report(figures: Mapping[str, Any]) -> str:
    lines = [
        f"{figures['stacks']} stacks with labels ({figures['unlabelled_results']} results without)",
        f"labels per stack: true {figures['labels_per_stack_true']}, predicted "
        f"{figures['labels_per_stack_predicted']}",
        f"exact label sets {figures['exact_label_set_rate']:.1%}; sample F1 {figures['sample_f1']}; "
        f"macro F1 {figures['macro_f1']}",
    ]
    named = [
        f"{o['location']} ({o['predicted_rate']:.0%} vs {o['true_rate']:.0%})"
        for o in figures["over_predicted"]
    ]
    lines.append("predicted on > 40% of stacks while true on < 10%: " + (", ".join(named) or "none"))
    flagged, unflagged = figures["wrong_when_flagged"], figures["wrong_when_not_flagged"]
    lines.append(
        f"flagged for review: {figures['flagged_share']:.1%}; wrong label set when flagged "
        f"{_percent(flagged)}, when not flagged {_percent(unflagged)}"
    )
    for reason, entry in sorted(figures["reasons"].items()):
        lines.append(f"  {reason}: {entry['stacks']} stacks, {entry['wrong']:.0%} wrong")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def run(args: argparse.Namespace) -> int:
    try:
        figures = agreement(read_results(args.results), read_truth(args.labels))
    except (OSError, ValueError, KeyError) as exc:
        print(f"agreement: {exc}", file=sys.stderr)
        return 2
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0
