"""The per-stack review flag and the bundle's trust entries it is built from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.model.bundle import BundleError, load_bundle
from agent.model.novelty import NoveltyReference
from agent.model.review import (
    SET_RISK_INPUTS,
    SET_RISK_METHOD,
    SetCalibration,
    SetRisk,
    Trust,
    read_set_risk,
    review,
    risk_inputs,
)
from agent.model.thresholds import near
from agent.stacks.digest import file_sha256
from agent.stacks.labels import LOCATIONS
from tests.conftest import REPO

N = len(LOCATIONS)
THRESHOLDS = np.full(N, 0.5)


def scores(**by_name: float) -> np.ndarray:
    out = np.zeros(N)
    for name, value in by_name.items():
        out[LOCATIONS.index(name.replace("_", " "))] = value
    return out


def test_a_score_within_the_margin_on_either_side_is_near_its_threshold() -> None:
    flags = near(np.array([[0.45, 0.55, 0.30, 0.70]]), np.full(4, 0.5), np.full(4, 0.1))
    assert flags.tolist() == [[True, True, False, False]]


def test_a_zero_margin_never_marks_a_label_uncertain() -> None:
    assert not near(np.array([0.5]), np.array([0.5]), np.array([0.0])).any()


def test_a_confident_labelled_stack_is_not_flagged() -> None:
    p = scores(Nucleoplasm=0.9)
    verdict = review(p, p >= THRESHOLDS, THRESHOLDS, Trust(margins=np.full(N, 0.1)), None)
    assert (verdict.flagged, verdict.reasons, verdict.near) == (False, [], [])


def test_a_label_near_its_threshold_flags_the_stack_and_names_the_location() -> None:
    p = scores(Nucleoplasm=0.9, Cytosol=0.55)
    verdict = review(p, p >= THRESHOLDS, THRESHOLDS, Trust(margins=np.full(N, 0.1)), None)
    assert verdict.reasons == ["near_threshold"]
    assert verdict.near == ["Cytosol"]


def test_a_near_miss_is_uncertain_too() -> None:
    p = scores(Nucleoplasm=0.9, Golgi_apparatus=0.45)
    verdict = review(p, p >= THRESHOLDS, THRESHOLDS, Trust(margins=np.full(N, 0.1)), None)
    assert verdict.near == ["Golgi apparatus"]


def test_a_location_the_bundle_cannot_predict_is_never_near() -> None:
    available = np.ones(N, dtype=bool)
    available[LOCATIONS.index("Cytosol")] = False
    p = scores(Nucleoplasm=0.9, Cytosol=0.5)
    verdict = review(p, p >= THRESHOLDS, THRESHOLDS, Trust(np.full(N, 0.1), available), None)
    assert verdict.near == []


def test_a_stack_with_no_label_is_flagged() -> None:
    p = scores(Nucleoplasm=0.1)
    assert review(p, p >= THRESHOLDS, THRESHOLDS, Trust(), None).reasons == ["no_label"]


def test_features_far_from_the_training_data_are_flagged_novel() -> None:
    rng = np.random.default_rng(0)
    reference = NoveltyReference.fit(rng.normal(size=(500, 8)), n_components=4)
    trust = Trust(novelty=reference, novelty_threshold=3.0)
    p = scores(Nucleoplasm=0.9)
    typical = review(p, p >= THRESHOLDS, THRESHOLDS, trust, np.zeros(8))
    strange = review(p, p >= THRESHOLDS, THRESHOLDS, trust, np.full(8, 40.0))
    assert "novel_input" not in typical.reasons
    assert strange.reasons == ["novel_input"]
    assert strange.novelty is not None
    assert strange.novelty > 3.0


def test_image_quality_reasons_are_carried_into_the_verdict() -> None:
    p = scores(Nucleoplasm=0.9)
    verdict = review(p, p >= THRESHOLDS, THRESHOLDS, Trust(), None, ["saturated"])
    assert verdict.reasons == ["saturated"]


# The set confidence (`uncertain_set`) -------------------------------------------------------
def linear_calibration(cut: float = 0.5) -> SetCalibration:
    """Every location present with about its score as probability (0.01 at 0, 0.99 at 1)."""
    return SetCalibration(
        tuple(np.array([0.0, 1.0]) for _ in LOCATIONS), tuple(np.array([0.01, 0.99]) for _ in LOCATIONS), cut
    )


def test_without_a_set_calibration_a_near_label_flags_the_stack_as_before() -> None:
    p = scores(Nucleoplasm=0.9, Cytosol=0.55)
    verdict = review(p, p >= THRESHOLDS, THRESHOLDS, Trust(margins=np.full(N, 0.1)), None)
    assert (verdict.reasons, verdict.set_confidence) == (["near_threshold"], None)


def test_a_set_calibration_gives_every_stack_its_set_confidence() -> None:
    p = scores(Nucleoplasm=0.9)
    verdict = review(p, p >= THRESHOLDS, THRESHOLDS, Trust(set_calibration=linear_calibration()), None)
    expected = (0.01 + 0.98 * 0.9) * 0.99 ** (N - 1)
    assert verdict.set_confidence == pytest.approx(expected)
    assert verdict.reasons == []


def test_a_label_near_its_threshold_makes_the_set_uncertain_and_says_why() -> None:
    p = scores(Nucleoplasm=0.9, Cytosol=0.55)
    trust = Trust(margins=np.full(N, 0.1), set_calibration=linear_calibration())
    verdict = review(p, p >= THRESHOLDS, THRESHOLDS, trust, None)
    assert verdict.set_confidence is not None
    assert verdict.set_confidence < 0.5
    assert verdict.reasons == ["uncertain_set", "near_threshold"]
    assert verdict.near == ["Cytosol"]


def test_with_a_set_calibration_a_near_label_of_a_confident_set_does_not_flag_it() -> None:
    p = scores(Nucleoplasm=0.9, Cytosol=0.55)
    trust = Trust(margins=np.full(N, 0.1), set_calibration=linear_calibration(cut=0.2))
    verdict = review(p, p >= THRESHOLDS, THRESHOLDS, trust, None)
    assert (verdict.flagged, verdict.near) == (False, ["Cytosol"])


def test_with_a_set_calibration_no_label_novel_input_and_image_quality_still_flag() -> None:
    p = scores(Nucleoplasm=0.02)
    trust = Trust(set_calibration=linear_calibration(cut=0.01))
    assert review(p, p >= THRESHOLDS, THRESHOLDS, trust, None, ["saturated"]).reasons == [
        "no_label",
        "saturated",
    ]


def fixed_risk(risk: float, cut: float = 0.7, seen: list[np.ndarray] | None = None) -> SetRisk:
    """A set-risk model that gives every stack `risk` (and keeps what it was given in `seen`)."""

    def model(inputs: np.ndarray) -> np.ndarray:
        if seen is not None:
            seen.append(inputs)
        return np.full((len(inputs), 1), risk, np.float32)

    return SetRisk(model, cut)


def test_with_a_set_risk_model_its_risk_above_the_cut_flags_the_set_uncertain() -> None:
    p = scores(Nucleoplasm=0.9)
    trust = Trust(set_calibration=linear_calibration(cut=0.0), set_risk=fixed_risk(0.8))
    verdict = review(p, p >= THRESHOLDS, THRESHOLDS, trust, None)
    assert verdict.reasons == ["uncertain_set"]
    assert verdict.set_risk == pytest.approx(0.8)


def test_with_a_set_risk_model_the_set_confidence_cut_no_longer_decides() -> None:
    p = scores(Nucleoplasm=0.9, Cytosol=0.55)  # a set the calibration alone would flag
    trust = Trust(set_calibration=linear_calibration(cut=0.99), set_risk=fixed_risk(0.3))
    verdict = review(p, p >= THRESHOLDS, THRESHOLDS, trust, None)
    assert verdict.reasons == []
    assert verdict.set_confidence is not None
    assert verdict.set_confidence < 0.99


def test_the_set_risk_model_reads_the_scores_the_log_set_confidence_and_the_label_count() -> None:
    p = scores(Nucleoplasm=0.9, Cytosol=0.6)
    seen: list[np.ndarray] = []
    trust = Trust(set_calibration=linear_calibration(), set_risk=fixed_risk(0.1, seen=seen))
    verdict = review(p, p >= THRESHOLDS, THRESHOLDS, trust, None)
    (inputs,) = seen
    assert verdict.set_confidence is not None
    assert inputs.shape == (1, SET_RISK_INPUTS)
    assert inputs.dtype == np.float32
    assert inputs[0, :N] == pytest.approx(p)
    assert inputs[0, N] == pytest.approx(np.log(verdict.set_confidence), rel=1e-6)
    assert inputs[0, N + 1] == 2


def test_risk_inputs_never_take_the_log_of_zero() -> None:
    inputs = risk_inputs(np.zeros((2, N)), np.zeros((2, N), bool), np.array([0.0, 1.0]))
    assert np.all(np.isfinite(inputs))
    assert inputs[1, N] == 0.0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "other"}, "method"),
        ({"version": 2}, "version"),
        ({"inputs": 28}, "inputs"),
        ({"cut": 1.5}, "cut"),
    ],
)
def test_a_malformed_set_risk_entry_is_refused(change: dict[str, object], message: str) -> None:
    entry = {"method": SET_RISK_METHOD, "version": 1, "inputs": SET_RISK_INPUTS, "cut": 0.7, **change}
    with pytest.raises(ValueError, match=message):
        read_set_risk(entry, fixed_risk(0.5).model)


# The bundle's optional trust entries -------------------------------------------------------
def bundle_with(tmp_path: Path, drop: tuple[str, ...] = (), **manifest_changes: object) -> Path:
    """A copy of the demo bundle with manifest entries changed or dropped (novelty drops its file too)."""
    folder = tmp_path / "bundle"
    shutil.copytree(REPO / "models" / "demo", folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    for key in drop:
        manifest.pop(key, None)
        manifest["files"].pop(key, None)
    manifest.update(manifest_changes)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def locations(status: str = "trained", margin: float = 0.05) -> list[dict[str, object]]:
    return [
        {"name": name, "status": status, "positives": 20, "threshold": 0.5, "margin": margin}
        for name in LOCATIONS
    ]


@pytest.mark.integration
def test_a_bundle_without_trust_entries_gives_no_margins_and_predicts_everything(tmp_path: Path) -> None:
    folder = bundle_with(tmp_path, drop=("locations", "novelty", "quality"))
    trust = load_bundle(folder, check_golden=False).trust
    assert not trust.margins.any()
    assert trust.unavailable == []
    assert trust.novelty is None


@pytest.mark.integration
def test_locations_give_margins_and_what_the_bundle_cannot_predict(tmp_path: Path) -> None:
    entries = locations()
    entries[LOCATIONS.index("Endosomes")] |= {"status": "not trained", "positives": 2, "margin": 0.0}
    bundle = load_bundle(bundle_with(tmp_path, locations=entries), check_golden=False)
    assert bundle.trust.unavailable == ["Endosomes"]
    assert bundle.trust.margins[0] == pytest.approx(0.05)


@pytest.mark.integration
def test_locations_out_of_order_are_refused(tmp_path: Path) -> None:
    entries = locations()[::-1]
    with pytest.raises(BundleError, match="locations are not the 28 locations"):
        load_bundle(bundle_with(tmp_path, locations=entries), check_golden=False)


@pytest.mark.integration
def test_an_unknown_status_is_refused_with_the_location_named(tmp_path: Path) -> None:
    entries = locations()
    entries[3]["status"] = "maybe"
    with pytest.raises(BundleError, match="Nucleoli fibrillar center: status 'maybe'"):
        load_bundle(bundle_with(tmp_path, locations=entries), check_golden=False)


def with_novelty(tmp_path: Path, n_features: int, entry: dict[str, object]) -> Path:
    """The demo bundle with a novelty reference of `n_features` (without residual) and this entry."""
    folder = bundle_with(tmp_path, drop=("novelty",))
    reference = NoveltyReference.fit(np.random.default_rng(0).normal(size=(50, n_features)), n_components=4)
    parts: dict[str, Any] = {
        "mean": reference.mean,
        "components": reference.components,
        "scales": reference.scales,
    }
    np.savez(folder / "novelty.npz", **parts)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["novelty"] = {"path": "novelty.npz", "sha256": file_sha256(folder / "novelty.npz")}
    manifest["novelty"] = entry
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def demo_width() -> int:
    """The demo bundle's feature width (its recipe's layout: 1,280 embedding + hand features)."""
    manifest = json.loads((Path(__file__).resolve().parent.parent / "models/demo/manifest.json").read_text())
    return sum(part["length"] for part in manifest["features"]["layout"])


@pytest.mark.integration
def test_a_novelty_reference_for_other_features_is_refused(tmp_path: Path) -> None:
    folder = with_novelty(tmp_path, 10, {"threshold": 3.0})
    with pytest.raises(BundleError, match=f"novelty reference is not for {demo_width()} features"):
        load_bundle(folder, check_golden=False)


@pytest.mark.integration
def test_a_novelty_file_of_the_other_formula_than_the_manifest_says_is_refused(tmp_path: Path) -> None:
    """The threshold was set for one formula: a reference without residual_scale cannot use it."""
    folder = with_novelty(
        tmp_path, demo_width(), {"threshold": 3.0, "method": "pca-whitened-rms-or-residual"}
    )
    with pytest.raises(BundleError, match="holds a pca-whitened-rms reference, the manifest says"):
        load_bundle(folder, check_golden=False)
