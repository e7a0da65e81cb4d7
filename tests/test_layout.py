"""The rooms of the house and the directions of their doors, read from every import in the code.

agent/stacks (reading) < agent/model (bundle, runtimes, analysis) < agent/service (the agent)
< agent/collector (the facility's database) < agent/tools (commands): a room imports only
rooms below it and itself, and the collector takes only the MQTT client factory from the
agent's service room. The device side (`agent`) never imports `export`, TensorFlow, Keras or
scikit-learn; `export` may import `agent`. On the workstation side, export/reports < data <
features < training < conversion in the same way. Imports inside functions count too: a lazy
import is still a door.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ROOMS = ("agent.stacks", "agent.model", "agent.service", "agent.collector", "agent.tools")
EXPORT_ROOMS = (
    "export.reports",
    "export.data",
    "export.features",
    "export.training",
    "export.conversion",
)
WORKSTATION_ONLY = ("export", "tensorflow", "keras", "sklearn", "skl2onnx", "onnx", "torch")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import statement, at any depth."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                # `from agent.service import log` imports agent.service.log
                yield node.lineno, f"{node.module}.{alias.name}"


def room_of(module: str, rooms: tuple[str, ...] = ROOMS) -> int | None:
    for rank, room in enumerate(rooms):
        if module == room or module.startswith(room + "."):
            return rank
    return None


def device_files() -> list[Path]:
    return sorted((REPO / "agent").rglob("*.py"))


def workstation_files() -> list[Path]:
    return sorted((REPO / "export").rglob("*.py"))


def test_every_agent_module_lives_in_a_room() -> None:
    loose = [
        module_name(p)
        for p in device_files()
        if room_of(module_name(p)) is None and p.parent != REPO / "agent"
    ]
    top = sorted(p.name for p in (REPO / "agent").glob("*.py"))
    assert loose == []
    assert top == ["__init__.py", "cli.py"]  # the package and the command table, nothing else


def test_every_room_says_what_it_owns_and_what_it_may_import() -> None:
    for room in ROOMS:
        docstring = ast.get_docstring(ast.parse((REPO / room.replace(".", "/") / "__init__.py").read_text()))
        assert docstring, room
        assert "import" in docstring, room


@pytest.mark.parametrize("path", device_files(), ids=lambda p: module_name(p))
def test_a_room_imports_only_rooms_below_it(path: Path) -> None:
    here = room_of(module_name(path))
    if here is None:
        return  # agent/__init__.py and agent/cli.py: above the rooms
    upward = [
        f"line {line}: {module}"
        for line, module in imports(path)
        if (there := room_of(module)) is not None and there > here
    ]
    assert upward == []


@pytest.mark.parametrize("path", device_files(), ids=lambda p: module_name(p))
def test_the_device_side_never_imports_the_workstation(path: Path) -> None:
    found = [
        f"line {line}: {module}" for line, module in imports(path) if module.split(".")[0] in WORKSTATION_ONLY
    ]
    assert found == []


def test_every_export_module_lives_in_a_room() -> None:
    nested = [p for p in workstation_files() if p.parent != REPO / "export"]
    loose = [
        module_name(p) for p in nested if room_of(module_name(p), (*EXPORT_ROOMS, "export.reference")) is None
    ]
    assert loose == []


@pytest.mark.parametrize("path", workstation_files(), ids=lambda p: module_name(p))
def test_an_export_room_imports_only_rooms_before_it(path: Path) -> None:
    here = room_of(module_name(path), EXPORT_ROOMS)
    if here is None:
        return
    upward = [
        f"line {line}: {module}"
        for line, module in imports(path)
        if (there := room_of(module, EXPORT_ROOMS)) is not None and there > here
    ]
    assert upward == []


def test_the_layout_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The checker itself: a lazy import of a higher room inside a function is found."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from agent.service.config import Config\n    import export.data\n")
    found = list(imports(sample))
    assert [(line, module) for line, module in found] == [
        (2, "agent.service.config.Config"),
        (3, "export.data"),
    ]
    assert room_of(found[0][1]) == ROOMS.index("agent.service")


def test_the_collector_takes_only_the_mqtt_client_from_the_agents_service() -> None:
    found = [
        f"{module_name(path)} line {line}: {module}"
        for path in sorted((REPO / "agent" / "collector").rglob("*.py"))
        for line, module in imports(path)
        if module.startswith("agent.service") and not module.startswith("agent.service.mqtt_client")
    ]
    assert found == []
