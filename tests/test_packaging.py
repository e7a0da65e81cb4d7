"""The install split and the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent.cli import COMMANDS, main
from agent.stacks.labels import KAGGLE_LOCATION_COUNTS, LOCATIONS, N_LOCATIONS, parse_target
from tests.conftest import REPO


def test_importing_every_agent_module_loads_neither_tensorflow_nor_sklearn() -> None:
    code = (
        "import importlib, pkgutil, sys, agent\n"
        "names = [m.name for m in pkgutil.walk_packages(agent.__path__, 'agent.')]\n"
        "for name in names: importlib.import_module(name)\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras', 'sklearn', 'torch', 'export'))\n"
        "print(len(names), heavy)\n"
        "sys.exit(1 if heavy or len(names) < 5 else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_there_are_28_distinct_locations_in_kaggle_order() -> None:
    assert N_LOCATIONS == 28 == len(set(LOCATIONS)) == len(KAGGLE_LOCATION_COUNTS)
    assert LOCATIONS[0] == "Nucleoplasm"
    assert LOCATIONS[25] == "Cytosol"
    assert LOCATIONS[27] == "Rods & rings"


def test_parse_target_sorts_labels() -> None:
    assert parse_target("25 3 0") == (0, 3, 25)


@pytest.mark.parametrize(
    ("bad", "words"),
    [("", "empty"), ("28", "outside"), ("-1", "outside"), ("x", "integer"), ("3 3", "twice")],
)
def test_parse_target_rejects_bad_values(bad: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_target(bad)


def test_help_lists_every_subcommand(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_no_command_prints_help_and_fails(capsys) -> None:
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_console_script_is_installed_and_runs() -> None:
    result = subprocess.run(
        [str(REPO / ".venv" / "bin" / "hpa-edge"), "synth", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "--seed" in result.stdout
