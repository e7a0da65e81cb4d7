"""`hpa-edge agreement`: a device's results against known labels."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agent.cli import main
from agent.stacks.labels import LOCATIONS
from export.training.agreement import agreement, flag_figures

NUC, CYTO, AGG = (LOCATIONS.index(name) for name in ("Nucleoplasm", "Cytosol", "Aggresome"))


def result(
    stack_id: str, labels: list[int], review: bool = False, reasons: tuple[str, ...] = ()
) -> dict[str, object]:
    return {"kind": "result", "stack_id": stack_id, "labels": [LOCATIONS[j] for j in labels],
            "review": review, "review_reasons": list(reasons)}  # fmt: skip


def test_labels_per_stack_and_the_exact_rate_compare_prediction_with_truth() -> None:
    figures = agreement([result("a", [NUC]), result("b", [CYTO, NUC])], {"a": (NUC,), "b": (CYTO,)})
    assert (figures["labels_per_stack_true"], figures["labels_per_stack_predicted"]) == (1.0, 1.5)
    assert figures["exact_label_sets"] == 0.5


def test_a_rare_location_predicted_everywhere_is_named() -> None:
    truth = {f"s{i}": (AGG,) if i == 0 else (NUC,) for i in range(20)}
    figures = agreement([result(f"s{i}", [NUC, AGG]) for i in range(20)], truth)
    assert figures["over_predicted"] == ["Aggresome"]


def test_macro_f1_comes_with_its_interval() -> None:
    truth = {f"s{i}": (NUC,) if i % 2 else (CYTO,) for i in range(40)}
    figures = agreement([result(f"s{i}", [NUC]) for i in range(40)], truth)
    low, high = figures["macro_f1_ci95"]
    assert low <= figures["macro_f1"] <= high


def test_the_flag_is_judged_by_how_often_flagged_and_unflagged_stacks_are_wrong() -> None:
    documents = [
        result("a", [CYTO], review=True, reasons=("near_threshold",)),
        result("b", [NUC], review=True, reasons=("near_threshold",)),
        result("c", [NUC]),
        result("d", [NUC]),
    ]
    wrong = np.array([True, False, False, False])
    flag = flag_figures(documents, wrong)
    assert (flag["flagged_share"], flag["wrong_when_flagged"], flag["wrong_when_not_flagged"]) == (
        0.5,
        0.5,
        0.0,
    )
    assert flag["reasons"] == {"near_threshold": {"stacks": 2, "wrong": 0.5}}


def test_results_without_a_label_are_counted_and_left_out() -> None:
    figures = agreement([result("a", [NUC]), result("z", [NUC])], {"a": (NUC,)})
    assert (figures["n_stacks"], figures["unlabelled_results"]) == (1, 1)


def test_no_labelled_result_at_all_is_an_error() -> None:
    with pytest.raises(ValueError, match="no result has a label"):
        agreement([result("z", [NUC])], {"a": (NUC,)})


def test_the_command_reads_files_as_predict_writes_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [json.dumps(result("a", [NUC])), json.dumps(result("b", [NUC, AGG])), '{"kind": "error"}']
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "train.csv").write_text(f"Id,Target\na,{NUC}\nb,{NUC} {CYTO}\n")
    assert main(["agreement", "--results", str(tmp_path / "r.jsonl"), "--labels", str(tmp_path / "train.csv"),
                 "--json", str(tmp_path / "figures.json")]) == 0  # fmt: skip
    assert "exact label sets 50.0%" in capsys.readouterr().out
    assert json.loads((tmp_path / "figures.json").read_text())["exact_label_sets"] == 0.5


def test_an_unknown_location_in_a_result_is_an_error_that_names_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "r.jsonl").write_text('{"kind": "result", "stack_id": "a", "labels": ["Nowhere"]}\n')
    (tmp_path / "train.csv").write_text("Id,Target\na,0\n")
    assert (
        main(["agreement", "--results", str(tmp_path / "r.jsonl"), "--labels", str(tmp_path / "train.csv")])
        == 2
    )
    assert "unknown location(s) ['Nowhere']" in capsys.readouterr().err


def test_the_flag_ratio_comes_with_an_interval_around_it() -> None:
    flagged = np.array([True] * 40 + [False] * 60)
    wrong = np.array([True] * 20 + [False] * 20 + [True] * 15 + [False] * 45)
    figures = flag_figures([result(str(i), [NUC], review=bool(f)) for i, f in enumerate(flagged)], wrong)
    assert figures["wrong_ratio"] == 2.0  # 50% against 25%
    low, high = figures["wrong_ratio_ci95"]
    assert low < 2.0 < high


def test_no_ratio_when_unflagged_stacks_are_never_wrong() -> None:
    documents = [result("a", [NUC], review=True), result("b", [NUC])]
    figures = flag_figures(documents, np.array([True, False]))
    assert (figures["wrong_ratio"], figures["wrong_ratio_ci95"]) == (None, None)
