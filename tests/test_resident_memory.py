"""What keeps the agent's resident memory down: the classifiers' file handed to ONNX Runtime as
a path (same outputs as from bytes), and the systemd unit's malloc settings, which the bench's
agent gets too. The figures (RSS after 200 stacks) are `hpa-edge bench --startup`'s."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.model.runtimes import load_classifier
from agent.tools.bench_agent import UNIT, unit_environment

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"


def test_the_classifiers_give_the_same_probabilities_from_their_file_as_from_its_bytes() -> None:
    path = DEMO / "classifiers.onnx"
    from_path, from_bytes = load_classifier(path), load_classifier(path.read_bytes())
    x = np.random.default_rng(0).random((8, from_path.n_features), np.float32)
    assert np.array_equal(from_path(x), from_bytes(x))


def test_the_bench_starts_its_agent_with_the_units_environment(tmp_path: Path) -> None:
    assert UNIT.name == "hpa-edge.service"
    assert unit_environment()["MALLOC_ARENA_MAX"] == "2"
    unit = tmp_path / "x.service"
    unit.write_text('[Service]\nEnvironment=A=1 "B=two words"\nEnvironment=C=\nEnvironmentFile=-/x\n')
    assert unit_environment(unit) == {"A": "1", "B": "two words", "C": ""}
    assert unit_environment(tmp_path / "absent.service") == {}
