"""The `agent-legacy` install (tflite-runtime 2.14, numpy 1.x) in its own virtual environment.

Measured here (2-core x86, 101 real stacks): with a float32 bundle, tflite-runtime and LiteRT
give identical pixels and identical label sets on every stack (embedding cosine >= 0.9999997).
With an int8 bundle they do not compute the same thing: LiteRT runs int8 through XNNPACK,
tflite-runtime 2.14 through its built-in kernels (both agree exactly when LiteRT's default
delegate is switched off); embeddings differ at cosine ~0.999, enough to move scores by a few
hundredths and flip labels that sit on a threshold. Hence the advice in docs/operators.md: devices on
tflite-runtime get a float32 bundle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent_harness import stack_ids
from tests.conftest import REPO, export_args

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.version_info >= (3, 12), reason="tflite-runtime has no wheels past Python 3.11"),
]


@pytest.fixture(scope="module")
def legacy_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with `pip install .[agent-legacy]` and nothing else."""
    venv = tmp_path_factory.mktemp("legacy") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            f"{REPO}[agent-legacy]",
        ],
        check=True,
        env={**os.environ, "PIP_NO_WARN_SCRIPT_LOCATION": "1"},
    )
    return python


def predict(python: Path, bundle: Path, stacks: Path) -> dict[str, dict[str, object]]:
    done = subprocess.run(
        [str(python), "-m", "agent.cli", "predict", "--bundle", str(bundle), str(stacks)],
        capture_output=True, text=True, cwd="/", check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    documents = [json.loads(line) for line in done.stdout.splitlines()]
    return {str(d["stack_id"]): d for d in documents}


def test_the_legacy_environment_has_tflite_runtime_numpy_1_and_no_litert(legacy_python: Path) -> None:
    code = (
        "import importlib.util as u, numpy, agent.model.runtimes as r;"
        "print(numpy.__version__, r.embedder_runtime(), u.find_spec('ai_edge_litert') is None,"
        " u.find_spec('tensorflow') is None)"
    )
    out = subprocess.run(
        [str(legacy_python), "-c", code], capture_output=True, text=True, cwd="/", check=True
    )
    version, runtime, no_litert, no_tf = out.stdout.split()
    assert version.startswith("1.")
    assert runtime == "tflite_runtime.interpreter"
    assert no_litert == "True"
    assert no_tf == "True"


def test_the_legacy_runtime_accepts_the_demo_bundle_golden_vectors(legacy_python: Path) -> None:
    done = subprocess.run(
        [str(legacy_python), "-m", "agent.cli", "verify", str(REPO / "models" / "demo")],
        capture_output=True, text=True, cwd="/",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "runtime tflite_runtime.interpreter" in done.stdout


def test_a_float32_bundle_gives_the_same_labels_on_every_stack_as_litert(
    legacy_python: Path, small_model: Path, synthetic_set: Path, stack_source: Path, tmp_path: Path
) -> None:
    from export.conversion.make_bundle import export

    bundle = tmp_path / "float32"
    assert export(export_args(model=small_model, data=synthetic_set, out=bundle, quantization="float32")) == 0
    legacy = predict(legacy_python, bundle, stack_source / "stacks")
    current = predict(Path(sys.executable), bundle, stack_source / "stacks")
    assert len(current) == len(stack_ids(stack_source))
    assert legacy.keys() == current.keys()
    assert all(legacy[s]["labels"] == current[s]["labels"] for s in current)
    worst = max(
        abs(float(legacy[s]["scores"][k]) - float(current[s]["scores"][k]))  # type: ignore[index]
        for s in current
        for k in current[s]["scores"]  # type: ignore[attr-defined]
    )
    assert worst <= 1e-5


def test_an_int8_bundle_stays_within_its_golden_tolerance_under_the_legacy_runtime(
    legacy_python: Path, stack_source: Path
) -> None:
    """Int8 kernels differ between the runtimes (see the module docstring): scores stay close."""
    manifest = json.loads((REPO / "models" / "demo" / "manifest.json").read_text())
    legacy = predict(legacy_python, REPO / "models" / "demo", stack_source / "stacks")
    current = predict(Path(sys.executable), REPO / "models" / "demo", stack_source / "stacks")
    worst = max(
        abs(float(legacy[s]["scores"][k]) - float(current[s]["scores"][k]))  # type: ignore[index]
        for s in current
        for k in current[s]["scores"]  # type: ignore[attr-defined]
    )
    same = sum(legacy[s]["labels"] == current[s]["labels"] for s in current)
    print(f"int8 demo bundle, tflite-runtime vs LiteRT: {same}/{len(current)} identical label sets, "
          f"largest score difference {worst:.4f}")  # fmt: skip
    assert worst <= 0.1
    assert manifest["quantization"] == "int8"
