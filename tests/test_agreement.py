"""`hpa-edge agreement`: a device's results against known labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.stacks.labels import LOCATIONS
from agent.tools.agreement import agreement, read_results, read_truth, report

NUC, CYTO, AGG = "Nucleoplasm", "Cytosol", "Aggresome"


def result(
    stack_id: str, labels: list[str], review: bool = False, reasons: tuple[str, ...] = ()
) -> dict[str, object]:
    return {"kind": "result", "stack_id": stack_id, "labels": labels, "review": review,
            "review_reasons": list(reasons)}  # fmt: skip


def test_labels_per_stack_and_the_exact_rate_compare_prediction_with_truth() -> None:
    truth = {"a": frozenset({NUC}), "b": frozenset({CYTO})}
    figures = agreement([result("a", [NUC]), result("b", [CYTO, NUC])], truth)
    assert (figures["labels_per_stack_true"], figures["labels_per_stack_predicted"]) == (1.0, 1.5)
    assert figures["exact_label_set_rate"] == 0.5


def test_a_rare_location_predicted_everywhere_is_named() -> None:
    truth = {f"s{i}": frozenset({AGG} if i == 0 else {NUC}) for i in range(20)}
    figures = agreement([result(f"s{i}", [NUC, AGG]) for i in range(20)], truth)
    (over,) = figures["over_predicted"]
    assert (over["location"], over["true_rate"], over["predicted_rate"]) == (AGG, 0.05, 1.0)


def test_the_flag_is_judged_by_how_often_flagged_and_unflagged_stacks_are_wrong() -> None:
    truth = {s: frozenset({NUC}) for s in "abcd"}
    documents = [
        result("a", [CYTO], review=True, reasons=("near_threshold",)),
        result("b", [NUC], review=True, reasons=("near_threshold",)),
        result("c", [NUC]),
        result("d", [NUC]),
    ]
    figures = agreement(documents, truth)
    assert (figures["flagged_share"], figures["wrong_when_flagged"], figures["wrong_when_not_flagged"]) == (
        0.5,
        0.5,
        0.0,
    )
    assert figures["reasons"] == {"near_threshold": {"stacks": 2, "wrong": 0.5}}


def test_results_without_a_label_are_counted_and_left_out() -> None:
    figures = agreement([result("a", [NUC]), result("z", [NUC])], {"a": frozenset({NUC})})
    assert (figures["stacks"], figures["unlabelled_results"]) == (1, 1)


def test_no_labelled_result_at_all_is_an_error() -> None:
    with pytest.raises(ValueError, match="no result has a label"):
        agreement([result("z", [NUC])], {"a": frozenset({NUC})})


def test_files_are_read_as_predict_writes_them(tmp_path: Path) -> None:
    (tmp_path / "r.jsonl").write_text(json.dumps(result("a", [NUC])) + "\n" + '{"kind": "error"}\n')
    (tmp_path / "train.csv").write_text(f"Id,Target\na,{LOCATIONS.index(NUC)}\n")
    figures = agreement(read_results(tmp_path / "r.jsonl"), read_truth(tmp_path / "train.csv"))
    assert figures["exact_label_set_rate"] == 1.0
    assert "exact label sets 100.0%" in report(figures)
