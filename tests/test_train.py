"""Training: 28 capped, class-weighted, cross-fitted forests, thresholds out-of-fold only where
there is evidence, an honest comparison.

Embeddings here are small synthetic vectors (64-d, label directions plus noise), so forests
fit in a second; the command tests write a real cache and read it back. The estimator
(`LocationForests`) and the one out-of-fold loop are specified first, then the command and
the model folder it writes, which `hpa-edge export` reads.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from agent.model.thresholds import apply
from agent.stacks.labels import N_LOCATIONS
from agent.stacks.preprocess import Preprocessing
from export.conversion.make_bundle import ExportError, read_model
from export.features.backbones import BackboneSpec
from export.features.embed import EmbeddingCache, cache_key
from export.training.auc import roc_auc
from export.training.folds import out_of_fold
from export.training.forests import (
    ForestSettings,
    LocationForests,
    fit_forests,
    merge_forests,
    predict_scores,
)
from export.training.metrics import NOT_PREDICTED, NOT_TRAINED, TRAINED, choose_thresholds
from export.training.train import TrainSettings, train

SMALL = ForestSettings(trees=20, max_leaf_nodes=16, jobs=1)
PARAMS: dict[str, Any] = {"trees": 20, "max_leaf_nodes": 16, "jobs": 1}  # SMALL, as estimator parameters
Fitted = tuple[LocationForests, np.ndarray, np.ndarray]
FAST = TrainSettings(forest=SMALL, bootstrap=100, original_trees=20)
FAST_ARGS = ["--trees", "10", "--original-trees", "10", "--bootstrap", "50", "--jobs", "1"]


def _data(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels at skewed prevalences (location 27 never occurs) and vectors that carry them."""
    rng = np.random.default_rng(seed)
    prevalence = np.linspace(0.4, 0.03, N_LOCATIONS)
    prevalence[27] = 0.0
    y = (rng.random((n, N_LOCATIONS)) < prevalence).astype(np.uint8)
    directions = rng.normal(size=(N_LOCATIONS, 64))
    x = rng.normal(size=(n, 64)) + 1.5 * y @ directions / np.sqrt(N_LOCATIONS) * 3
    return x.astype(np.float32), y


# The one out-of-fold loop ----------------------------------------------------------------
def test_out_of_fold_scores_each_row_with_a_model_fitted_without_it() -> None:
    """The stand-in model answers, for each row it scores, whether it was fitted on that row."""
    x = np.arange(40, dtype=np.float64)[:, None]  # the row's own number as its only feature
    fitted_on: list[set[float]] = []

    def fit_predict(x_fit: np.ndarray, y_fit: np.ndarray, x_held: np.ndarray) -> np.ndarray:
        seen = set(x_fit[:, 0].tolist())
        fitted_on.append(seen)
        return np.array([[float(v in seen)] for v in x_held[:, 0]])

    scores = out_of_fold(fit_predict, x, np.zeros((40, 1)), np.arange(40) % 4)
    assert len(fitted_on) == 4
    assert (scores == 0).all()  # no row was scored by a model that had seen it
    assert all(len(seen) == 30 for seen in fitted_on)  # and each model saw all the other folds


def test_out_of_fold_keeps_the_width_the_model_answers_with() -> None:
    x, y = np.zeros((12, 3)), np.zeros((12, N_LOCATIONS))
    scores = out_of_fold(lambda xf, yf, xh: np.ones((len(xh), 2)), x, y, np.arange(12) % 3)
    assert scores.shape == (12, 2)
    assert scores.dtype == np.float64


def test_out_of_fold_refuses_a_single_fold() -> None:
    with pytest.raises(ValueError, match="at least 2 folds"):
        out_of_fold(lambda xf, yf, xh: xh, np.zeros((5, 1)), np.zeros((5, 1)), np.zeros(5))


# The estimator ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted() -> Fitted:
    """An estimator fitted on the first 200 of 300 vectors (read-only for tests), and the data."""
    x, y = _data()
    return LocationForests(**PARAMS).fit(x[:200], y[:200]), x, y


def test_fit_chooses_the_thresholds_on_out_of_fold_scores(fitted: Fitted) -> None:
    model, x, y = fitted
    assert model.oof_scores_.shape == (200, N_LOCATIONS)
    choice = choose_thresholds(y[:200], model.oof_scores_, min_positives=model.min_positives)
    np.testing.assert_array_equal(model.thresholds_, choice.thresholds)
    assert model.status_ == choice.status
    np.testing.assert_array_equal(model.margins_, choice.margins)
    in_sample = choose_thresholds(y[:200], model.predict_proba(x[:200]), min_positives=model.min_positives)
    assert not np.array_equal(model.thresholds_, in_sample.thresholds)  # not chosen on remembered answers


def test_the_forest_that_predicts_is_the_fold_forests_that_chose_the_threshold() -> None:
    """Cross-fitting: each fold's forest scored the rows it did not see; merged, they score new stacks."""
    x, y = _data(240)
    model = LocationForests(trees=21, max_leaf_nodes=16, jobs=1, folds=3, min_positives=3).fit(
        x[:180], y[:180]
    )
    trained = model.trained_locations
    assert trained
    for j in trained:
        forest = model.forests_[j]
        assert forest is not None
        assert len(forest.estimators_) == 21  # 3 folds x ceil(21 / 3) trees
    # Refit one fold forest the way fit did and check its rows' out-of-fold scores came from it.
    folds, j = model.oof_folds_, trained[0]
    settings = ForestSettings(trees=7, max_leaf_nodes=16, jobs=1, seed=1000)  # fold 1: seed + 1000
    held = folds == 1
    fold_forest = fit_forests(x[:180][~held], y[:180][~held], settings)[j]
    np.testing.assert_allclose(
        model.oof_scores_[held, j], fold_forest.predict_proba(x[:180][held])[:, 1], atol=1e-12
    )


def test_merged_forests_average_their_parts() -> None:
    x, y = _data(120)
    parts = [fit_forests(x, y, ForestSettings(trees=4, max_leaf_nodes=8, jobs=1, seed=s))[0] for s in (0, 9)]
    merged = merge_forests(parts)
    expected = np.mean([part.predict_proba(x[:10]) for part in parts], axis=0)
    np.testing.assert_allclose(merged.predict_proba(x[:10]), expected)
    assert len(parts[0].estimators_) == 4  # the parts are left as they were


def test_predict_is_predict_proba_against_the_thresholds_by_the_device_rule(fitted: Fitted) -> None:
    model, x, _ = fitted
    predicted = model.predict(x[200:])
    assert predicted.dtype == bool
    np.testing.assert_array_equal(predicted, apply(model.predict_proba(x[200:]), model.thresholds_))


def test_a_location_without_positives_gets_no_forest_and_is_never_predicted(fitted: Fitted) -> None:
    model, x, _ = fitted
    assert model.forests_[27] is None
    assert model.status_[27] == NOT_TRAINED
    assert model.positives_[27] == 0
    assert (model.predict_proba(x)[:, 27] == 0).all()
    assert model.thresholds_[27] == 1.0
    assert not model.predict(x)[:, 27].any()


def test_only_locations_with_evidence_get_a_forest(fitted: Fitted) -> None:
    model, x, y = fitted
    assert set(model.status_) <= {TRAINED, NOT_TRAINED, NOT_PREDICTED}
    for j, status in enumerate(model.status_):
        assert (model.forests_[j] is not None) == (status == TRAINED), j
        if status != TRAINED:
            assert model.thresholds_[j] == 1.0
            assert model.margins_[j] == 0.0
            assert model.reasons_[j]
            assert not model.predict(x)[:, j].any()
    assert model.trained_locations == [j for j, s in enumerate(model.status_) if s == TRAINED]
    np.testing.assert_array_equal(model.available_, [s == TRAINED for s in model.status_])
    assert len(model.trained_locations) >= 20  # the vectors carry most locations
    np.testing.assert_array_equal(model.positives_, y[:200].sum(axis=0))


def test_fewer_positives_than_the_minimum_give_no_forest() -> None:
    x, y = _data(300)
    y[:, 5] = 0
    y[:6, 5] = 1  # six positives, well separated
    x[:6] += 5.0
    few = LocationForests(**PARAMS, min_positives=10).fit(x, y)
    assert few.status_[5] == NOT_TRAINED
    assert few.forests_[5] is None
    assert "6 training positives, fewer than the 10 needed" in few.reasons_[5]
    assert LocationForests(**PARAMS, min_positives=3).fit(x, y).status_[5] != NOT_TRAINED


def test_labels_without_signal_are_not_predicted_rather_than_predicted_everywhere() -> None:
    """Before issue 16 a flat out-of-fold F1 put the threshold at the grid floor: every stack labelled."""
    rng = np.random.default_rng(8)
    x = rng.normal(size=(300, 16)).astype(np.float32)
    y = (rng.random((300, 2)) < [0.05, 0.3]).astype(np.uint8)  # noise labels
    model = LocationForests(trees=30, max_leaf_nodes=16, jobs=1).fit(x, y)
    assert model.status_ == [NOT_PREDICTED, NOT_PREDICTED]
    assert "no better than labelling every stack" in model.reasons_[0]
    assert not model.predict(rng.normal(size=(50, 16))).any()


def test_the_novelty_reference_is_fitted_on_the_training_features_with_an_out_of_fold_threshold(
    fitted: Fitted,
) -> None:
    model, x, _ = fitted
    novelty = model.novelty_
    assert novelty.mean.shape == (64,)
    assert len(novelty.scales) == model.novelty_components == 16
    in_sample = novelty.distance(x[:200])
    assert model.novelty_threshold_ > np.percentile(in_sample, 99.5) * 0.9  # out-of-fold: not smaller
    assert (novelty.distance(x[200:]) > model.novelty_threshold_).mean() < 0.1  # typical new stacks pass
    far = x[200:] + 10 * novelty.scales[0] * novelty.components[0]
    assert (novelty.distance(far) > model.novelty_threshold_).all()  # unlike anything seen


def test_location_rows_follow_the_bundle_contract(fitted: Fitted) -> None:
    from agent.stacks.labels import LOCATIONS

    model = fitted[0]
    rows = model.location_rows(LOCATIONS)
    assert [r["name"] for r in rows] == list(LOCATIONS)
    for row, threshold in zip(rows, model.thresholds_, strict=True):
        assert row["threshold"] == threshold
        assert row["margin"] >= 0
        assert isinstance(row["positives"], int)
        assert ("reason" in row) == (row["status"] != TRAINED)
    json.dumps(rows)  # plain JSON


def test_out_of_fold_scores_never_come_from_a_forest_that_saw_the_stack() -> None:
    """On labels that are pure noise, in-sample scores look perfect; out-of-fold ones look like chance."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    y = (rng.random((200, 1)) < 0.5).astype(np.uint8)
    model = LocationForests(trees=30, max_leaf_nodes=None, jobs=1, folds=4).fit(x, y)
    in_sample = predict_scores(fit_forests(x, y, ForestSettings(trees=30, max_leaf_nodes=None, jobs=1)), x)
    assert roc_auc(y[:, 0], in_sample[:, 0]) > 0.95
    assert 0.35 < roc_auc(y[:, 0], model.oof_scores_[:, 0]) < 0.65
    assert model.status_ == [NOT_PREDICTED]  # and chance is not published
    assert sorted(np.unique(model.oof_folds_).tolist()) == [0, 1, 2, 3]


def test_parameters_are_kept_as_given_and_a_clone_is_unfitted_with_the_same_ones() -> None:
    x, y = _data(60)
    model = LocationForests(trees=7, max_leaf_nodes=None, class_weight=None, folds=4)
    assert model.get_params() == {
        "trees": 7, "max_leaf_nodes": None, "min_samples_leaf": 1, "max_features": "sqrt",
        "class_weight": None, "seed": 0, "jobs": -1, "folds": 4, "min_positives": 10,
        "threshold_rule": "near-best-rate", "novelty_components": 16, "novelty_percentile": 99.5,
    }  # fmt: skip
    model.set_params(jobs=1).fit(x, y)
    copy = clone(model)
    assert copy.get_params() == model.get_params()
    assert not hasattr(copy, "forests_")


def test_bad_parameters_are_refused_when_fitting_not_when_constructing() -> None:
    x, y = _data(60)
    model = LocationForests(trees=0)  # scikit-learn's rule: no checks in __init__
    with pytest.raises(ValueError, match="trees must be at least 1"):
        model.fit(x, y)
    with pytest.raises(ValueError, match="threshold_rule must be one of"):
        LocationForests(threshold_rule="argmax").fit(x, y)
    with pytest.raises(ValueError, match="min_positives must be at least 1"):
        LocationForests(min_positives=0).fit(x, y)


def test_an_unfitted_estimator_refuses_to_predict() -> None:
    with pytest.raises(NotFittedError):
        LocationForests().predict(np.zeros((1, 64)))


def test_features_of_another_width_are_refused(fitted: Fitted) -> None:
    model = fitted[0]
    assert model.n_features_in_ == 64
    with pytest.raises(ValueError, match="expected N x 64 features"):
        model.predict_proba(np.zeros((2, 32)))


def test_a_pickled_estimator_answers_as_before(fitted: Fitted) -> None:
    model, x, _ = fitted
    again = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(again.predict_proba(x[200:]), model.predict_proba(x[200:]))
    np.testing.assert_array_equal(again.thresholds_, model.thresholds_)


def test_forests_fitted_elsewhere_answer_as_the_estimator_that_fitted_them(fitted: Fitted) -> None:
    model, x, _ = fitted
    wrapped = LocationForests.from_forests(model.forests_, model.thresholds_, SMALL)
    np.testing.assert_array_equal(wrapped.predict(x[200:]), model.predict(x[200:]))
    assert not hasattr(wrapped, "oof_scores_")


# The forests inside it --------------------------------------------------------------------
def test_no_tree_grows_past_the_leaf_cap() -> None:
    x, y = _data()
    forests = fit_forests(x, y, ForestSettings(trees=5, max_leaf_nodes=8, jobs=1))
    assert max(t.get_n_leaves() for f in forests if f is not None for t in f.estimators_) <= 8


def test_fixed_seeds_give_identical_forests() -> None:
    x, y = _data()
    first = predict_scores(fit_forests(x, y, SMALL), x)
    np.testing.assert_array_equal(first, predict_scores(fit_forests(x, y, SMALL), x))


# Training and its evaluation --------------------------------------------------------------
@pytest.mark.integration
def test_our_method_beats_the_original_on_synthetic_stacks(
    synthetic_embeddings: Path, synthetic_set: Path
) -> None:
    """The claim, on real Lite0 embeddings of the session's 300 synthetic stacks.

    With 240 training stacks most rare locations have too little evidence and ours abstains
    where the original method labels (F1 ~ 2 x prevalence each), so on macro F1 ours is only
    not measurably worse here (3,000 stacks: +0.09, docs/training.md); on what a user of the
    labels sees it is clearly better."""
    from export.data.dataset import read_labels
    from export.training.train import join, label_matrix

    embeddings = EmbeddingCache(synthetic_embeddings).load()
    labels = {r.stack_id: r.labels for r in read_labels(synthetic_set / "train.csv")}
    ids, _ = join(embeddings, labels, None)
    settings = TrainSettings(forest=ForestSettings(trees=60, jobs=2), bootstrap=300, original_trees=60)
    model = train(embeddings.rows(ids), label_matrix(ids, labels), ids, settings, "synthetic")
    methods = model.evaluation["split"]["methods"]
    ours, original = methods["ours"], methods["original_method"]
    assert ours["samples_f1"] > original["samples_f1"]
    assert ours["exact_label_sets"] > original["exact_label_sets"]
    assert ours["labels_per_stack_predicted"] <= 1.5 * ours["labels_per_stack_true"]
    assert original["labels_per_stack_predicted"] > 1.5 * ours["labels_per_stack_true"]
    high = model.evaluation["split"]["paired_macro_f1_difference"]["ours - original_method"]["ci95"][1]
    assert high > 0  # 60 held-out stacks: the paired interval cannot separate them either way
    assert model.evaluation["original_balanced_test_f1"] > original["macro_f1"]


def test_the_evaluation_reports_every_location_with_an_interval_and_support() -> None:
    x, y = _data()
    model = train(x, y, [f"s{i}" for i in range(len(y))], FAST, "vectors")
    rows = model.evaluation["split"]["methods"]["ours"]["per_location"]
    assert len(rows) == N_LOCATIONS
    assert sum(r["support"] for r in rows) == int(y[[int(s[1:]) for s in model.test_ids]].sum())
    for row in rows:
        if row["f1"] is not None:
            low, high = row["f1_ci95"]
            assert (low <= row["f1"] + 1e-9 and row["f1"] <= high + 1e-9) or row["support"] < 3
    assert set(model.train_ids).isdisjoint(model.test_ids)
    assert len(model.classifier.thresholds_) == N_LOCATIONS
    assert model.classifier.thresholds_[27] == 1.0


def test_the_evaluation_shows_what_a_user_of_the_labels_feels() -> None:
    x, y = _data()
    model = train(x, y, [f"s{i}" for i in range(len(y))], FAST, "vectors")
    evaluation = model.evaluation
    ours = evaluation["split"]["methods"]["ours"]
    test = y[[int(s[1:]) for s in model.test_ids]].astype(bool)
    predicted = model.classifier.predict(x[[int(s[1:]) for s in model.test_ids]])
    assert ours["labels_per_stack_true"] == pytest.approx(test.sum(axis=1).mean(), abs=1e-4)
    assert ours["labels_per_stack_predicted"] == pytest.approx(predicted.sum(axis=1).mean(), abs=1e-4)
    assert ours["exact_label_sets"] == pytest.approx((test == predicted).all(axis=1).mean(), abs=1e-4)
    assert 0 <= ours["samples_f1"] <= 1
    rows = ours["per_location"]
    assert [r["prevalence"] for r in rows] == pytest.approx(test.mean(axis=0), abs=1e-4)
    assert [r["predicted_rate"] for r in rows] == pytest.approx(predicted.mean(axis=0), abs=1e-4)
    locations = evaluation["locations"]
    assert [r["status"] for r in locations] == model.classifier.status_
    assert locations[27]["status"] == NOT_TRAINED
    assert evaluation["threshold_rule"] == "near-best-rate"
    assert evaluation["novelty"]["method"] == "pca-whitened-rms-or-residual"


def test_a_location_never_predicted_counts_zero_in_macro_f1_when_the_split_has_positives() -> None:
    x, y = _data()
    settings = TrainSettings(forest=SMALL, bootstrap=100, original_trees=20, min_positives=200)
    model = train(x, y, [f"s{i}" for i in range(len(y))], settings, "vectors")
    rows = model.evaluation["split"]["methods"]["ours"]["per_location"]
    for row, status in zip(rows, model.classifier.status_, strict=True):
        if status != TRAINED and row["support"] > 0:
            assert row["f1"] == 0.0
    assert model.classifier.status_.count(NOT_TRAINED) >= 26


def test_the_joint_model_experiment_reports_both_and_a_decision() -> None:
    x, y = _data()
    settings = TrainSettings(forest=SMALL, bootstrap=100, original_trees=20, try_joint=True)
    experiment = train(x, y, [f"s{i}" for i in range(len(y))], settings, "v").evaluation["experiments"]
    joint = experiment["joint_nucleoplasm_cytosol"]
    assert len(joint["binary_f1"]) == len(joint["joint_f1"]) == 2
    assert isinstance(joint["helps"], bool)


def _cache(folder: Path, x: np.ndarray, ids: list[str]) -> None:
    cache = EmbeddingCache(folder)
    cache.open(cache_key(BackboneSpec("b0", "random"), Preprocessing(size=64), dim=x.shape[1]))
    cache.append(ids, ["f"] * len(ids), x)


def _labels(path: Path, ids: list[str], y: np.ndarray) -> None:
    rows = [f"{sid},{' '.join(str(j) for j in np.flatnonzero(r))}" for sid, r in zip(ids, y, strict=True)]
    path.write_text("Id,Target\n" + "\n".join(r for r in rows if not r.endswith(",")) + "\n")


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model folder written by the train command from 200 small vectors (read-only for tests)."""
    from agent.cli import main

    work = tmp_path_factory.mktemp("train")
    x, y = _data(200)
    ids = [f"s{i:03d}" for i in range(len(y))]
    _cache(work / "cache", x, ids)
    _labels(work / "train.csv", ids, y)
    out = work / "model"
    code = main(["train", "--embeddings", str(work / "cache"), "--labels", str(work / "train.csv"),
                 "--out", str(out), *FAST_ARGS])  # fmt: skip
    assert code == 0
    return out


def test_train_command_writes_the_model_and_its_report(model_folder: Path) -> None:
    _, y = _data(200)
    out = model_folder
    meta = json.loads((out / "model.json").read_text())
    assert len(meta["thresholds"]) == N_LOCATIONS
    assert meta["embedding"]["backbone"]["name"] == "b0"
    assert meta["settings"]["forest"]["max_leaf_nodes"] == ForestSettings().max_leaf_nodes
    classifier = pickle.loads((out / "classifiers.pkl").read_bytes())
    assert isinstance(classifier, LocationForests)
    assert len(classifier.forests_) == N_LOCATIONS
    assert classifier.thresholds_.tolist() == meta["thresholds"]
    assert meta["trained_locations"] == classifier.trained_locations
    assert (out / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (out / "summary.md").read_text()
    assert "Paired difference ours - original" in summary
    assert "labels per stack (true / predicted)" in summary
    assert "| Rods & rings | not trained | 0 |" in summary
    assert [r["status"] for r in meta["locations"]] == classifier.status_
    assert meta["novelty"]["threshold"] == classifier.novelty_threshold_
    assert meta["settings"]["min_positives"] == 10
    assert meta["figures"]["labels_per_stack_predicted"] >= 0
    evaluation = json.loads((out / "evaluation.json").read_text())
    assert evaluation["data"]["n_stacks"] == sum(1 for r in y if r.any())


def test_include_ids_restricts_training_to_the_list(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    x, y = _data(200)
    ids = [f"s{i:03d}" for i in range(len(y))]
    _cache(tmp_path / "cache", x, ids)
    _labels(tmp_path / "train.csv", ids, y)
    (tmp_path / "curated.txt").write_text("# expert-labelled\n" + "\n".join(ids[:120]) + "\nnot-an-id\n")
    code = main(["train", "--embeddings", str(tmp_path / "cache"), "--labels", str(tmp_path / "train.csv"),
                 "--out", str(tmp_path / "m"), "--include-ids", str(tmp_path / "curated.txt"),
                 *FAST_ARGS])  # fmt: skip
    assert code == 0
    assert "1 id(s)" in capsys.readouterr().out
    evaluation = json.loads((tmp_path / "m" / "evaluation.json").read_text())
    assert evaluation["data"]["n_stacks"] == sum(1 for r in y[:120] if r.any())


def test_train_command_refuses_labels_that_share_no_ids_with_the_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.cli import main

    x, y = _data(50)
    _cache(tmp_path / "cache", x, [f"a{i}" for i in range(50)])
    _labels(tmp_path / "train.csv", [f"b{i}" for i in range(50)], y)
    code = main(["train", "--embeddings", str(tmp_path / "cache"), "--labels", str(tmp_path / "train.csv"),
                 "--out", str(tmp_path / "m")])  # fmt: skip
    assert code == 2
    assert "only 0 stacks have both a label and an embedding" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


# The model folder, as `hpa-edge export` and the float reference read it --------------------
def test_export_reads_the_estimator_train_wrote(model_folder: Path) -> None:
    trained = read_model(model_folder, None)
    assert isinstance(trained.classifier, LocationForests)
    meta = json.loads((model_folder / "model.json").read_text())
    assert trained.thresholds.tolist() == meta["thresholds"]
    assert trained.spec.name == "b0"


def test_export_still_reads_a_model_folder_whose_pickle_is_a_list_of_forests(
    model_folder: Path, tmp_path: Path
) -> None:
    """Model folders written before the estimator (model format 1) pickled the 28 forests alone."""
    old = tmp_path / "old"
    shutil.copytree(model_folder, old)
    current = pickle.loads((model_folder / "classifiers.pkl").read_bytes())
    (old / "classifiers.pkl").write_bytes(pickle.dumps(current.forests_))
    wrapped = read_model(old, None).classifier
    x = _data(20, seed=5)[0]
    np.testing.assert_array_equal(wrapped.predict(x), current.predict(x))


def test_export_refuses_a_model_json_whose_thresholds_differ_from_the_pickle(
    model_folder: Path, tmp_path: Path
) -> None:
    edited = tmp_path / "edited"
    shutil.copytree(model_folder, edited)
    meta = json.loads((edited / "model.json").read_text())
    meta["thresholds"][0] = 0.01
    (edited / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match=r"thresholds in model\.json differ"):
        read_model(edited, None)


def test_export_refuses_a_pickle_that_is_not_a_classifier(model_folder: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    shutil.copytree(model_folder, other)
    (other / "classifiers.pkl").write_bytes(pickle.dumps({"forests": []}))
    with pytest.raises(ExportError, match="holds a dict, not the classifier"):
        read_model(other, None)


@pytest.mark.integration
def test_default_forests_stay_under_12_mb_as_onnx_even_when_every_tree_is_full() -> None:
    """Worst case for size: noise labels make every tree grow to the leaf cap."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 1280)).astype(np.float32)
    y = (rng.random((600, N_LOCATIONS)) < 0.3).astype(np.uint8)
    settings = ForestSettings()
    forests = fit_forests(x, y, ForestSettings(jobs=2))
    leaves = [t.get_n_leaves() for f in forests for t in f.estimators_]
    assert min(leaves) == max(leaves) == settings.max_leaf_nodes
    size = sum(
        len(
            convert_sklearn(
                f, initial_types=[("x", FloatTensorType([None, 1280]))], options={id(f): {"zipmap": False}}
            ).SerializeToString()
        )
        for f in forests
    )
    assert size < 12_000_000


def test_the_evaluation_judges_the_review_flag_on_the_held_out_split() -> None:
    x, y = _data()
    model = train(x, y, [f"s{i}" for i in range(len(y))], FAST, "vectors")
    held_out = model.evaluation["review_flag"]["held_out"]
    rows = [int(s[1:]) for s in model.test_ids]
    test, predicted = y[rows].astype(bool), model.classifier.predict(x[rows])
    wrong = (test != predicted).any(axis=1)
    assert (~predicted.any(axis=1)).mean() <= held_out["flagged_share"] <= 1  # no label: flagged
    when_flagged, when_not = held_out["wrong_when_flagged"], held_out["wrong_when_not_flagged"]
    if when_flagged is not None and when_not is not None:
        flagged = held_out["flagged_share"]
        assert flagged * when_flagged + (1 - flagged) * when_not == pytest.approx(wrong.mean(), abs=1e-3)
