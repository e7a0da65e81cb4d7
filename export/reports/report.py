"""Write an evaluation as a chart (PNG) and a short summary a person can read in a minute.

Macro F1 alone hides over-prediction (a rare location labelled on every stack costs it
little), so both also show what a user of the labels feels: labels per stack, true and
predicted; exact label sets; sample F1; and per location the predicted rate beside the
prevalence, with the status of each location (trained, not trained, not predicted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from agent.stacks.labels import LOCATIONS

OURS, ORIGINAL = "ours", "original_method"


def write_chart(evaluation: dict[str, Any], path: Path) -> None:
    """Per-location F1 with 95% intervals (ours, the original method, the biologists), and
    below it each location's predicted rate beside its prevalence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = evaluation["split"]["methods"]
    x = np.arange(len(LOCATIONS))
    fig, (ax, rates) = plt.subplots(
        2, 1, figsize=(14, 10), dpi=100, sharex=True, gridspec_kw={"height_ratios": [1.1, 1]}
    )
    for offset, name, label, colour in (
        (-0.27, OURS, "ours (natural frequencies)", "#1f77b4"),
        (0.0, ORIGINAL, "original method (balanced, 0.5)", "#ff7f0e"),
    ):
        rows = methods[name]["per_location"]
        f1 = np.array([np.nan if r["f1"] is None else r["f1"] for r in rows])
        low = np.array([np.nan if r["f1_ci95"][0] is None else r["f1_ci95"][0] for r in rows])
        high = np.array([np.nan if r["f1_ci95"][1] is None else r["f1_ci95"][1] for r in rows])
        errors = np.vstack([np.clip(f1 - low, 0, None), np.clip(high - f1, 0, None)])
        macro = methods[name]["macro_f1"]
        ax.bar(
            x + offset,
            np.nan_to_num(f1),
            0.27,
            yerr=np.nan_to_num(errors),
            capsize=1.5,
            label=f"{label}: macro F1 {macro:.3f}",
            color=colour,
            error_kw={"lw": 0.6},
        )
    biologists = np.array([np.nan if v is None else v for v in evaluation["biologist_f1"]["per_location"]])
    ax.bar(
        x + 0.27,
        np.nan_to_num(biologists),
        0.27,
        color="#2ca02c",
        label=f"biologists (164 images): macro F1 {evaluation['biologist_f1']['macro_f1']:.3f}",
    )
    ax.set_ylabel("F1 (95% bootstrap interval)")
    ax.set_ylim(0, 1.05)
    ax.set_title(
        f"Per-location F1 on {evaluation['split']['n_stacks']} held-out stacks ({evaluation['data']['name']})"
    )
    ax.legend(fontsize=8, loc="upper right")
    _rates_panel(rates, evaluation)
    rates.set_xticks(
        x,
        [f"{j} {name}{_mark(evaluation, j)}" for j, name in enumerate(LOCATIONS)],
        rotation=75,
        ha="right",
        fontsize=7,
    )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _status(evaluation: dict[str, Any], j: int) -> str:
    locations = evaluation.get("locations")
    return str(locations[j]["status"]) if locations else "trained"


def _mark(evaluation: dict[str, Any], j: int) -> str:
    return {"not trained": " (not trained)", "not predicted": " (not predicted)"}.get(
        _status(evaluation, j), ""
    )


def _rates_panel(ax: Any, evaluation: dict[str, Any]) -> None:
    """Predicted rate beside prevalence per location (ours and the original method)."""
    methods = evaluation["split"]["methods"]
    x = np.arange(len(LOCATIONS))
    prevalence = np.array([r["prevalence"] for r in methods[OURS]["per_location"]])
    ax.bar(x - 0.27, prevalence, 0.27, color="#7f7f7f", label="prevalence (true on this share of stacks)")
    for offset, name, label, colour in (
        (0.0, OURS, "ours", "#1f77b4"),
        (0.27, ORIGINAL, "original method", "#ff7f0e"),
    ):
        rate = np.array([r["predicted_rate"] for r in methods[name]["per_location"]])
        felt = methods[name]
        ax.bar(
            x + offset,
            rate,
            0.27,
            color=colour,
            label=f"predicted by {label}: {felt['labels_per_stack_predicted']:.2f} labels per stack, "
            f"exact label set {felt['exact_label_sets']:.0%}",
        )
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_ylim(0, 1.0)
    ax.set_ylabel("share of held-out stacks")
    true_per_stack = methods[OURS]["labels_per_stack_true"]
    ax.set_title(f"Predicted rate beside prevalence (true: {true_per_stack:.2f} labels per stack)")
    ax.legend(fontsize=8, loc="upper right")


def summary_text(evaluation: dict[str, Any]) -> str:
    """A few lines: the honest figure, the comparison, the caveats."""
    split = evaluation["split"]
    ours, original = split["methods"][OURS], split["methods"][ORIGINAL]
    difference = split["paired_macro_f1_difference"][f"{OURS} - {ORIGINAL}"]
    data = evaluation["data"]
    lines = [
        f"# Evaluation: {data['name']}",
        "",
        f"Held-out split: {split['n_stacks']} stacks (multilabel-stratified, {data['test_fraction']:.0%} of"
        f" {data['n_stacks']}), scored at natural label frequencies. Macro F1 is the mean over the locations"
        f" with a defined F1 ({ours['locations_scored']} of 28 here): a location with no positives and no"
        " predictions in the split is left out; one with no positives but predictions scores 0.",
        "",
        "| method | macro F1 | 95% interval |",
        "| --- | --- | --- |",
        _row(
            "ours: cross-fitted forests, class weights, out-of-fold thresholds where there is evidence", ours
        ),
        _row("original method: balanced 50/50 subsample, threshold 0.5", original),
        "| original method, scored its own way (mean F1 of balanced test sets; not a macro F1) | "
        f"{_fmt(evaluation['original_balanced_test_f1'])} | - |",
        "| biologists (164 images, per-location figures from the reference data) | "
        f"{_fmt(evaluation['biologist_f1']['macro_f1'])} | - |",
        "",
        f"Paired difference ours - original: {_fmt(difference['difference'])}"
        f" (95% interval {_ci(difference['ci95'])}).",
        "",
        "What a user of the labels sees on the same split:",
        "",
        "| method | labels per stack (true / predicted) | exact label set | sample F1 | no label |",
        "| --- | --- | --- | --- | --- |",
        _felt("ours", ours),
        _felt("original method", original),
        "",
        "Predicted on more than 40% of stacks while true on fewer than 10%: "
        + (", ".join(ours["over_predicted"]) or "none")
        + " (ours); "
        + (", ".join(original["over_predicted"]) or "none")
        + " (original method).",
    ]
    locations = evaluation.get("locations")
    if locations:
        lines += [
            "",
            f"Per location ({evaluation.get('threshold_rule', '?')} thresholds on out-of-fold scores, "
            f"at least {evaluation.get('min_positives', '?')} training positives to train; the rates are "
            "on the held-out split):",
            "",
            "| location | status | training positives | threshold | margin | prevalence | predicted | F1 |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for row, scored in zip(locations, ours["per_location"], strict=True):
            lines.append(
                f"| {row['name']} | {row['status']} | {row['positives']} | {row['threshold']:.3f} | "
                f"{row['margin']:.3f} | {scored['prevalence']:.1%} | {scored['predicted_rate']:.1%} | "
                f"{_fmt(scored['f1'])} |"
            )
        unavailable = [f"{row['name']} ({row['reason']})" for row in locations if row["status"] != "trained"]
        if unavailable:
            lines += [
                "",
                "Never predicted by this model (each counts in macro F1: 0 where the split has positives): "
                + "; ".join(unavailable)
                + ".",
            ]
    rare = [r["name"] for r in ours["per_location"] if 0 < r["support"] < 10]
    if rare:
        lines += ["", f"Fewer than 10 positives in the split (read their F1 with care): {', '.join(rare)}."]
    for name, experiment in evaluation.get("experiments", {}).items():
        lines += ["", f"Experiment {name}: {experiment['summary']}"]
    return "\n".join(lines) + "\n"


def _felt(title: str, method: dict[str, Any]) -> str:
    return (
        f"| {title} | {method['labels_per_stack_true']:.2f} / {method['labels_per_stack_predicted']:.2f} | "
        f"{method['exact_label_sets']:.1%} | {method['samples_f1']:.3f} | {method['no_label_stacks']:.1%} |"
    )


def _row(title: str, method: dict[str, Any]) -> str:
    return f"| {title} | {_fmt(method['macro_f1'])} | {_ci(method['macro_f1_ci95'])} |"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ci(bounds: list[float | None]) -> str:
    return f"{_fmt(bounds[0])} - {_fmt(bounds[1])}"
