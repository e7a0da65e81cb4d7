"""The set confidence of the `uncertain_set` review reason: fitted out of fold, read back on the device."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agent.model.review import SET_CONFIDENCE_METHOD, SetCalibration, read_set_calibration, risk_inputs
from export.training.flagging import SetConfidence, SetRiskModel, choose_cut

L = 4
NAMES = [f"location {j}" for j in range(L)]
THRESHOLDS = np.array([0.5, 0.5, 0.5, 1.0])  # the last location has no forest
AVAILABLE = np.array([True, True, True, False])


def calibrated_data(n: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Scores mostly near 0 or 1 (as a forest's), each location present with probability equal
    to its score (the last location: never scored, present on about 5% of stacks)."""
    rng = np.random.default_rng(seed)
    scores = rng.beta(0.3, 0.3, size=(n, L))
    scores[:, -1] = 0.0
    chance = scores.copy()
    chance[:, -1] = 0.05
    return scores, (rng.uniform(size=(n, L)) < chance).astype(np.uint8)


@pytest.fixture(scope="module")
def fitted() -> SetConfidence:
    scores, y = calibrated_data()
    return SetConfidence(share=0.35).fit(scores, y, THRESHOLDS, AVAILABLE)


def test_every_calibration_table_increases_in_score_and_never_decreases_in_probability(
    fitted: SetConfidence,
) -> None:
    for x, p in zip(fitted.scores_, fitted.probabilities_, strict=True):
        assert np.all(np.diff(x) > 0)
        assert np.all(np.diff(p) >= 0)
        assert np.all((p >= fitted.clip) & (p <= 1 - fitted.clip))


def test_a_calibrated_score_maps_to_about_itself(fitted: SetConfidence) -> None:
    present = fitted.calibration().present(np.array([0.1, 0.5, 0.9, 0.0]))
    assert present[:3] == pytest.approx([0.1, 0.5, 0.9], abs=0.08)


def test_a_location_without_a_forest_gets_its_prevalence_whatever_the_score(fitted: SetConfidence) -> None:
    assert len(fitted.scores_[-1]) == 1
    calibration = fitted.calibration()
    low = calibration.present(np.array([0.0, 0.0, 0.0, 0.0]))[-1]
    high = calibration.present(np.array([0.0, 0.0, 0.0, 0.9]))[-1]
    assert low == high == pytest.approx(0.05, abs=0.015)


def test_a_score_near_its_threshold_makes_the_set_uncertain(fitted: SetConfidence) -> None:
    calibration = fitted.calibration()
    sure = np.array([0.97, 0.02, 0.03, 0.0])
    torn = np.array([0.97, 0.52, 0.03, 0.0])  # location 1 just over its threshold
    sure_confidence = calibration.confidence(sure, sure >= THRESHOLDS)
    torn_confidence = calibration.confidence(torn, torn >= THRESHOLDS)
    assert torn_confidence < 0.6 * sure_confidence
    assert sure_confidence >= calibration.cut > torn_confidence


def test_the_cut_flags_the_wanted_share_of_the_fitting_stacks(fitted: SetConfidence) -> None:
    scores, _ = calibrated_data()
    labels = scores >= THRESHOLDS
    flagged = (fitted.confidence(scores, labels) < fitted.cut_) | ~labels.any(axis=1)
    assert 0.34 <= flagged.mean() <= 0.35  # at most the share: stacks of equal confidence stay together
    assert fitted.flagged_share_ == pytest.approx(flagged.mean())


def test_stacks_flagged_anyway_count_in_the_share() -> None:
    scores, y = calibrated_data()
    novel = np.zeros(len(scores), dtype=bool)
    novel[:300] = True  # 10% flagged for another reason
    model = SetConfidence(share=0.35).fit(scores, y, THRESHOLDS, AVAILABLE, flagged=novel)
    labels = scores >= THRESHOLDS
    uncertain = model.confidence(scores, labels) < model.cut_
    assert 0.34 <= (uncertain | novel | ~labels.any(axis=1)).mean() <= 0.35
    assert uncertain.mean() < 0.35


def test_flagged_stacks_are_the_wrong_ones_more_often(fitted: SetConfidence) -> None:
    scores, y = calibrated_data(seed=1)  # new stacks from the same process
    labels = scores >= THRESHOLDS
    wrong = (labels != y.astype(bool)).any(axis=1)
    flagged = fitted.confidence(scores, labels) < fitted.cut_
    assert wrong[flagged].mean() > 1.5 * wrong[~flagged].mean()


def test_the_cut_is_zero_when_other_reasons_flag_the_share_already() -> None:
    assert choose_cut(np.array([0.1, 0.2, 0.3, 0.4]), np.array([True, True, False, False]), 0.5) == 0.0


def test_the_cut_lies_between_the_last_flagged_and_the_next() -> None:
    cut = choose_cut(np.array([0.4, 0.1, 0.3, 0.2]), np.zeros(4, dtype=bool), 0.5)
    assert cut == pytest.approx(0.25)


def test_the_manifest_entry_reads_back_to_the_same_confidences(fitted: SetConfidence) -> None:
    entry = json.loads(json.dumps(fitted.manifest_entry(NAMES)))
    assert entry["method"] == SET_CONFIDENCE_METHOD
    assert [table["name"] for table in entry["locations"]] == NAMES
    device = read_set_calibration(entry, NAMES)
    scores, _ = calibrated_data(n=50, seed=2)
    labels = scores >= THRESHOLDS
    on_device = [device.confidence(s, lab) for s, lab in zip(scores, labels, strict=True)]
    assert on_device == pytest.approx(fitted.confidence(scores, labels).tolist(), rel=1e-12)
    assert device.cut == fitted.cut_


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"method": "other"}, "method 'other'"),
        ({"version": 2}, "version 2"),
        ({"cut": 1.5}, "cut must be 0..1"),
    ],
)
def test_a_malformed_entry_is_refused(fitted: SetConfidence, change: dict[str, object], message: str) -> None:
    entry = fitted.manifest_entry(NAMES) | change
    with pytest.raises(ValueError, match=message):
        read_set_calibration(entry, NAMES)


def test_tables_out_of_order_or_not_increasing_are_refused(fitted: SetConfidence) -> None:
    entry = fitted.manifest_entry(NAMES)
    with pytest.raises(ValueError, match="not the bundle's locations"):
        read_set_calibration(entry | {"locations": entry["locations"][::-1]}, NAMES)
    tables = [dict(table) for table in entry["locations"]]
    tables[0]["scores"] = tables[0]["scores"][::-1]
    with pytest.raises(ValueError, match="location 0: scores must increase"):
        read_set_calibration(entry | {"locations": tables}, NAMES)
    with pytest.raises(ValueError, match="malformed"):
        read_set_calibration({k: v for k, v in entry.items() if k != "cut"}, NAMES)


def test_a_certain_probability_is_refused() -> None:
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        SetCalibration((np.array([0.0, 1.0]),), (np.array([0.0, 0.5]),), 0.5)


def test_a_share_outside_0_to_1_is_refused() -> None:
    scores, y = calibrated_data(n=100)
    with pytest.raises(ValueError, match="share must be between 0 and 1"):
        SetConfidence(share=1.2).fit(scores, y, THRESHOLDS)


def test_it_follows_scikit_learn_conventions() -> None:
    from sklearn.base import clone

    model = SetConfidence(share=0.3, clip=0.01)
    assert clone(model).get_params() == {"share": 0.3, "clip": 0.01}
    with pytest.raises(Exception, match="not fitted"):
        model.manifest_entry(NAMES)


# The set-risk model ------------------------------------------------------------------------
def hidden_second_location(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Calibrated scores, except for a middling score of location 1 (0.2-0.45, under its
    threshold): beside a clear location 0 it hides location 1 nine times in ten, elsewhere
    never. Alone, such a score means about what it says, so no per-location calibration can
    tell the two apart; the pair of scores can."""
    scores, y = calibrated_data(n, seed)
    rng = np.random.default_rng(seed + 1)
    middling = (scores[:, 1] > 0.2) & (scores[:, 1] < 0.45)
    beside = middling & (scores[:, 0] > 0.8)
    y[middling & ~beside, 1] = 0
    y[beside, 1] = rng.uniform(size=int(beside.sum())) < 0.9
    return scores, y


@pytest.fixture(scope="module")
def risk_model() -> tuple[SetRiskModel, SetConfidence]:
    scores, y = hidden_second_location(3000, 0)
    confidence = SetConfidence(share=0.35).fit(scores, y, THRESHOLDS, AVAILABLE)
    risk = SetRiskModel(share=0.35, jobs=1).fit(scores, y, THRESHOLDS, confidence.confidence_)
    return risk, confidence


def test_the_set_risk_finds_the_wrong_sets_the_set_confidence_misses(
    risk_model: tuple[SetRiskModel, SetConfidence],
) -> None:
    risk, confidence = risk_model
    scores, y = hidden_second_location(3000, 1)  # new stacks
    labels = scores >= THRESHOLDS
    by_confidence = confidence.confidence(scores, labels) < confidence.cut_
    chances = risk.predict_proba(risk_inputs(scores, labels, confidence.confidence(scores, labels)))[:, 1]
    by_risk = chances > risk.cut_
    assert abs(by_risk.mean() - by_confidence.mean()) < 0.05  # about the same share flagged
    middling = (scores[:, 1] > 0.2) & (scores[:, 1] < 0.45)
    hidden = middling & (scores[:, 0] > 0.8) & (y[:, 1] > 0)  # wrong: location 1 missed
    harmless = middling & (scores[:, 0] <= 0.8)  # location 1 rightly left out
    assert by_risk[hidden].mean() > 0.9
    assert by_confidence[hidden].mean() < 0.5
    assert by_risk[harmless].mean() < by_confidence[harmless].mean()


def test_the_risk_cut_flags_the_wanted_share_of_the_fitting_stacks_out_of_fold(
    risk_model: tuple[SetRiskModel, SetConfidence],
) -> None:
    risk, _ = risk_model
    assert risk.flagged_share_ == pytest.approx(0.35, abs=0.005)
    assert np.mean(risk.risk_ > risk.cut_) == pytest.approx(risk.uncertain_share_)


def test_the_set_risk_manifest_entry_reads_back_with_its_inputs_and_cut(
    risk_model: tuple[SetRiskModel, SetConfidence],
) -> None:
    risk, _ = risk_model
    entry = json.loads(json.dumps(risk.manifest_entry()))
    assert entry["inputs"] == L + 2
    assert entry["cut"] == risk.cut_


def test_the_device_rule_from_the_fitted_trees_gives_their_risk_and_cut(
    risk_model: tuple[SetRiskModel, SetConfidence],
) -> None:
    risk, confidence = risk_model
    scores, _ = hidden_second_location(20, 2)
    labels = scores >= THRESHOLDS
    chances = confidence.confidence(scores, labels)
    expected = risk.predict_proba(risk_inputs(scores, labels, chances))[:, 1]
    device = risk.for_device()
    assert device.cut == risk.cut_
    by_stack = [device.risk(s, lab, c) for s, lab, c in zip(scores, labels, chances, strict=True)]
    assert by_stack == pytest.approx(expected)


def test_without_enough_wrong_training_sets_no_set_risk_model_is_fitted() -> None:
    scores, y = calibrated_data(n=200)
    y = (scores >= THRESHOLDS).astype(np.uint8)  # every set right
    y[:3, 0] = 1 - y[:3, 0]  # three wrong
    with pytest.raises(ValueError, match="3 wrong and 197 right"):
        SetRiskModel().fit(scores, y, THRESHOLDS, np.full(200, 0.5))


def test_the_set_risk_model_follows_scikit_learn_conventions() -> None:
    from sklearn.base import clone

    model = SetRiskModel(share=0.3, trees=10)
    assert clone(model).get_params()["trees"] == 10
    with pytest.raises(Exception, match="not fitted"):
        model.manifest_entry()
