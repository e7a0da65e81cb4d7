"""Training: 28 capped, class-weighted forests, thresholds out-of-fold, an honest comparison.

Embeddings here are small synthetic vectors (64-d, label directions plus noise), so forests
fit in a second; the command tests write a real cache and read it back.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from agent.stacks.labels import N_LOCATIONS
from agent.stacks.preprocess import Preprocessing
from export.features.backbones import BackboneSpec
from export.features.embed import EmbeddingCache, cache_key
from export.training.auc import roc_auc
from export.training.forests import ForestSettings, fit_forests, out_of_fold_scores, predict_scores
from export.training.train import TrainSettings, train

SMALL = ForestSettings(trees=20, max_leaf_nodes=16, jobs=1)
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


def test_a_location_without_positives_gets_no_forest_and_scores_zero() -> None:
    x, y = _data()
    forests = fit_forests(x, y, SMALL)
    assert forests[27] is None
    assert all(f is not None for f in forests[:27])
    assert (predict_scores(forests, x)[:, 27] == 0).all()


def test_no_tree_grows_past_the_leaf_cap() -> None:
    x, y = _data()
    forests = fit_forests(x, y, ForestSettings(trees=5, max_leaf_nodes=8, jobs=1))
    assert max(t.get_n_leaves() for f in forests if f is not None for t in f.estimators_) <= 8


def test_fixed_seeds_give_identical_forests() -> None:
    x, y = _data()
    first = predict_scores(fit_forests(x, y, SMALL), x)
    np.testing.assert_array_equal(first, predict_scores(fit_forests(x, y, SMALL), x))


def test_out_of_fold_scores_never_come_from_a_forest_that_saw_the_stack() -> None:
    """On labels that are pure noise, in-sample scores look perfect; out-of-fold ones look like chance."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 16)).astype(np.float32)
    y = (rng.random((200, 1)) < 0.5).astype(np.uint8)
    settings = ForestSettings(trees=30, max_leaf_nodes=None, jobs=1)
    in_sample = predict_scores(fit_forests(x, y, settings), x)[:, 0]
    oof = out_of_fold_scores(x, y, np.arange(200) % 4, settings)[:, 0]
    assert roc_auc(y[:, 0], in_sample) > 0.95
    assert 0.35 < roc_auc(y[:, 0], oof) < 0.65


@pytest.mark.integration
def test_our_method_beats_the_original_on_synthetic_stacks(
    synthetic_embeddings: Path, synthetic_set: Path
) -> None:
    """The issue's claim, on real Lite0 embeddings of the session's 300 synthetic stacks."""
    from export.data.dataset import read_labels
    from export.training.train import join, label_matrix

    embeddings = EmbeddingCache(synthetic_embeddings).load()
    labels = {r.stack_id: r.labels for r in read_labels(synthetic_set / "train.csv")}
    ids, _ = join(embeddings, labels, None)
    settings = TrainSettings(forest=ForestSettings(trees=60, jobs=2), bootstrap=300, original_trees=60)
    model = train(embeddings.rows(ids), label_matrix(ids, labels), ids, settings, "synthetic")
    methods = model.evaluation["split"]["methods"]
    assert methods["ours"]["macro_f1"] > methods["original_method"]["macro_f1"]
    # 60 held-out stacks are too few for the paired interval to exclude 0 here; 3,000 are (README).
    assert model.evaluation["original_balanced_test_f1"] > methods["original_method"]["macro_f1"]


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
    assert len(model.thresholds) == N_LOCATIONS
    assert model.thresholds[27] == 1.0


def test_the_joint_model_experiment_reports_both_and_a_decision() -> None:
    x, y = _data()
    settings = TrainSettings(forest=SMALL, bootstrap=100, original_trees=20, try_joint=True)
    experiment = train(x, y, [f"s{i}" for i in range(len(y))], settings, "v").evaluation["experiments"]
    joint = experiment["joint_nucleoplasm_cytosol"]
    assert len(joint["binary_f1"]) == len(joint["joint_f1"]) == 2
    assert isinstance(joint["helps"], bool)


def _cache(folder: Path, x: np.ndarray, ids: list[str]) -> None:
    cache = EmbeddingCache(folder)
    cache.open(cache_key(BackboneSpec("b0", "random"), Preprocessing(size=64)))
    cache.append(ids, ["f"] * len(ids), x)


def _labels(path: Path, ids: list[str], y: np.ndarray) -> None:
    rows = [f"{sid},{' '.join(str(j) for j in np.flatnonzero(r))}" for sid, r in zip(ids, y, strict=True)]
    path.write_text("Id,Target\n" + "\n".join(r for r in rows if not r.endswith(",")) + "\n")


def test_train_command_writes_the_model_and_its_report(tmp_path: Path) -> None:
    from agent.cli import main

    x, y = _data(200)
    ids = [f"s{i:03d}" for i in range(len(y))]
    _cache(tmp_path / "cache", x, ids)
    _labels(tmp_path / "train.csv", ids, y)
    out = tmp_path / "model"
    code = main(["train", "--embeddings", str(tmp_path / "cache"), "--labels", str(tmp_path / "train.csv"),
                 "--out", str(out), *FAST_ARGS])  # fmt: skip
    assert code == 0
    meta = json.loads((out / "model.json").read_text())
    assert len(meta["thresholds"]) == N_LOCATIONS
    assert meta["embedding"]["backbone"]["name"] == "b0"
    assert meta["settings"]["forest"]["max_leaf_nodes"] == ForestSettings().max_leaf_nodes
    forests = pickle.loads((out / "classifiers.pkl").read_bytes())
    assert len(forests) == N_LOCATIONS
    assert (out / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Paired difference ours - original" in (out / "summary.md").read_text()
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
