"""`hpa-edge agreement --results FILE --labels CSV`: how a device's results compare with known labels.

Reads result documents (one JSON per line, as `hpa-edge predict` prints them or `listen
--json` records them) and a Kaggle-style label file (`Id,Target`), and scores them as the
training report scores a held-out split (`evaluate.score_methods`: macro F1 with its 95%
interval, and what a user of the labels feels: labels per stack true vs predicted, exact
label sets, sample-averaged F1, locations predicted far more often than they occur). Then it
asks whether the review flag points at the wrong answers: the share of stacks flagged, and
how often a flagged and an unflagged stack has a wrong label set, per reason. Results
without a label in the file are left out and counted. Needs only numpy: it runs on a device
install too. Exit 0, or 2 on unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from agent.stacks.labels import LOCATIONS
from export.data.dataset import DatasetError, read_labels
from export.training.evaluate import score_methods
from export.training.metrics import bootstrap_weights, interval

RATIO_RESAMPLES = 2000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--results", type=Path, required=True, help="result documents, one JSON per line")
    parser.add_argument("--labels", type=Path, required=True, help="Id,Target label file (the truth)")
    parser.add_argument("--json", type=Path, help="also write the figures here")


def read_results(path: Path) -> list[dict[str, Any]]:
    """The result documents of a file (errors and other kinds are skipped)."""
    documents = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            document = json.loads(line)
        except ValueError:
            raise ValueError(f"{path}:{number}: not a JSON document") from None
        if isinstance(document, dict) and document.get("kind") == "result":
            documents.append(document)
    return documents


def agreement(documents: Sequence[Mapping[str, Any]], truth: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """The figures (pure: documents and label indices in, numbers out)."""
    known = [d for d in documents if d["stack_id"] in truth]
    if not known:
        raise ValueError("no result has a label in the label file")
    index = {name: j for j, name in enumerate(LOCATIONS)}
    y_true = np.zeros((len(known), len(LOCATIONS)), dtype=bool)
    y_pred = np.zeros_like(y_true)
    for i, document in enumerate(known):
        y_true[i, list(truth[document["stack_id"]])] = True
        unknown = [name for name in document["labels"] if name not in index]
        if unknown:
            raise ValueError(f"{document['stack_id']}: unknown location(s) {unknown}")
        y_pred[i, [index[name] for name in document["labels"]]] = True
    figures: dict[str, Any] = score_methods(y_true, {"results": y_pred})["methods"]["results"]
    figures["n_stacks"] = len(known)
    figures["unlabelled_results"] = len(documents) - len(known)
    figures["review"] = flag_figures(known, (y_true != y_pred).any(axis=1))
    return figures


def flag_figures(documents: Sequence[Mapping[str, Any]], wrong: np.ndarray) -> dict[str, Any]:
    """Does the review flag point at wrong label sets? Overall and per reason.

    The issue's test of a useful flag is a ratio (flagged stacks at least twice as often
    wrong as unflagged ones), so the ratio comes with its bootstrap interval: on 200 stacks
    a ratio of 2.1 has an interval of about 1.7-2.6, on 3,000 about 2.0-2.2.
    """
    flagged = np.array([bool(d.get("review")) for d in documents])
    reasons: Counter[str] = Counter()
    wrong_by_reason: Counter[str] = Counter()
    for document, is_wrong in zip(documents, wrong, strict=True):
        for reason in document.get("review_reasons", []):
            reasons[reason] += 1
            wrong_by_reason[reason] += int(is_wrong)
    return {
        **flag_summary(flagged, wrong),
        "reasons": {
            reason: {"stacks": n, "wrong": round(wrong_by_reason[reason] / n, 4)}
            for reason, n in sorted(reasons.items())
        },
    }


def flag_summary(flagged: np.ndarray, wrong: np.ndarray) -> dict[str, Any]:
    """The share flagged, how often a flagged and an unflagged stack is wrong, and their ratio
    (also the training report's figures on its held-out split)."""
    return {
        "flagged_share": round(float(flagged.mean()), 4),
        "wrong_when_flagged": _share(wrong[flagged]),
        "wrong_when_not_flagged": _share(wrong[~flagged]),
        **wrong_ratio(flagged, wrong),
    }


def wrong_ratio(flagged: np.ndarray, wrong: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """How many times more often a flagged stack is wrong than an unflagged one, with its 95%
    interval over stacks resampled with replacement; None where a side is empty or never wrong."""

    def ratio(weights: np.ndarray) -> np.ndarray:  # one ratio per row of stack weights
        with np.errstate(divide="ignore", invalid="ignore"):
            when_flagged = weights @ (flagged & wrong) / (weights @ flagged)
            return when_flagged / (weights @ (~flagged & wrong) / (weights @ ~flagged))

    point = float(ratio(np.ones((1, len(wrong))))[0])
    if not np.isfinite(point):
        return {"wrong_ratio": None, "wrong_ratio_ci95": None}
    low, high = interval(ratio(bootstrap_weights(len(wrong), RATIO_RESAMPLES, seed)))
    return {"wrong_ratio": round(point, 3), "wrong_ratio_ci95": [round(low, 3), round(high, 3)]}


def _share(values: np.ndarray) -> float | None:
    return round(float(values.mean()), 4) if len(values) else None


def report(figures: Mapping[str, Any]) -> str:
    low, high = figures["macro_f1_ci95"]
    flag = figures["review"]
    over = ", ".join(figures["over_predicted"]) or "none"
    flagged, unflagged = _percent(flag["wrong_when_flagged"]), _percent(flag["wrong_when_not_flagged"])
    lines = [
        f"{figures['n_stacks']} stacks with labels ({figures['unlabelled_results']} results without)",
        f"labels per stack: true {figures['labels_per_stack_true']}, predicted "
        f"{figures['labels_per_stack_predicted']}; stacks without a label {figures['no_label_stacks']:.1%}",
        f"exact label sets {figures['exact_label_sets']:.1%}; sample F1 {figures['samples_f1']}; "
        f"macro F1 {figures['macro_f1']} (95% {low}-{high}, {figures['locations_scored']} locations)",
        f"predicted on > 40% of stacks while true on < 10%: {over}",
        f"flagged for review: {flag['flagged_share']:.1%}; wrong label set when flagged {flagged}, "
        f"when not flagged {unflagged}; ratio {_ratio_text(flag)}",
    ]
    lines += [
        f"  {name}: {e['stacks']} stacks, {e['wrong']:.0%} wrong" for name, e in flag["reasons"].items()
    ]
    lines += [
        f"  {row['name']:<30} true {row['prevalence']:6.1%}  predicted {row['predicted_rate']:6.1%}"
        f"  F1 {'-' if row['f1'] is None else row['f1']}"
        for row in figures["per_location"]
        if row["predicted_rate"] or row["prevalence"]
    ]
    return "\n".join(lines)


def _ratio_text(flag: Mapping[str, Any]) -> str:
    if flag["wrong_ratio"] is None:
        return "-"
    low, high = flag["wrong_ratio_ci95"]
    return f"{flag['wrong_ratio']:.2f} (95% {low:.2f}-{high:.2f})"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def run(args: argparse.Namespace) -> int:
    try:
        truth = {row.stack_id: row.labels for row in read_labels(args.labels)}
        figures = agreement(read_results(args.results), truth)
    except (OSError, ValueError, KeyError, DatasetError) as exc:
        print(f"agreement: {exc}", file=sys.stderr)
        return 2
    print(report(figures))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0
