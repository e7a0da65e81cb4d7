"""The README and docs/ stay true to the code and to each other.

The README is a short page: what hpa-edge is, the quick start, the commands table, the data
path, links. The reference lives in docs/, one file per audience or topic. These tests keep
that shape honest: every command and configuration key documented, every link and path
pointing at something that exists, every package on disk described, examples that parse.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from agent.cli import COMMANDS
from agent.service.config import all_keys
from agent.service.lifecycle import Phase

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
README = REPO / "README.md"
SCHEMA = json.loads((REPO / "agent" / "model" / "messages.schema.json").read_text())
README_MAX_LINES = 150

# Every Markdown file of the project's own documentation (not the demo bundle's notes).
MARKDOWN = [README, *sorted(DOCS.glob("*.md")), REPO / "models" / "README.md", REPO / "systemd" / "README.md"]


def code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), re.S)


def prose(text: str) -> str:
    """The text without fenced code blocks (a '# comment' in a shell block is not a heading)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def section(text: str, heading: str) -> str:
    """From `heading` (a whole line) to the next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    start = text.index(f"\n{heading}\n") + 1
    following = re.compile(rf"^#{{1,{level}}} ", re.M).search(text, start + len(heading))
    return text[start : following.start() if following else len(text)]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in `text`, header and separator rows left out."""
    lines = [line.strip() for line in text.splitlines()]
    separator = re.compile(r"\|[\s:|-]+\|")
    rows = []
    for i, line in enumerate(lines):
        next_line = lines[i + 1] if i + 1 < len(lines) else ""
        if line.startswith("|") and not separator.fullmatch(line) and not separator.fullmatch(next_line):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose(path.read_text()), re.M)}


def links(path: Path) -> list[str]:
    """The targets of inline Markdown links and images, outside code blocks."""
    return re.findall(r"\]\(([^)\s]+)\)", prose(path.read_text()))


def test_every_configuration_key_is_in_the_operators_reference() -> None:
    text = (DOCS / "operators.md").read_text()
    missing = [key for key in all_keys() if f"| `{key}` |" not in text]
    assert not missing


def test_the_readme_commands_table_is_the_command_table() -> None:
    rows = table_rows(section(README.read_text(), "## Commands"))
    documented = {}
    for row in rows:
        name = re.match(r"`hpa-edge ([a-z-]+)", row[0])
        assert name, f"not a command: {row[0]}"
        documented[name.group(1)] = row[1]
    assert set(documented) == set(COMMANDS), "README commands table and agent.cli.COMMANDS differ"
    wrong_extra = {name: extra for name, extra in documented.items() if extra != COMMANDS[name].extra}
    assert not wrong_extra, "install extra in the README differs from agent.cli.COMMANDS"


def test_the_readme_links_every_doc() -> None:
    linked = {(README.parent / target.split("#")[0]).resolve() for target in links(README)}
    orphans = [path.name for path in DOCS.glob("*.md") if path.resolve() not in linked]
    assert not orphans, f"docs not linked from the README: {orphans}"


def test_the_readme_stays_a_five_minute_read() -> None:
    lines = len(README.read_text().splitlines())
    assert lines < README_MAX_LINES, f"README has {lines} lines; move reference material to docs/"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_files_and_headings_that_exist(path: Path) -> None:
    broken = []
    for target in links(path):
        if re.match(r"[a-z]+:", target):  # https:, mailto:, file:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{path.name}: links to nothing: {broken}"


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_repository_paths_named_in_the_docs_exist(path: Path) -> None:
    named = re.findall(r"`((?:agent|export|models|systemd|tests|docs)/[\w./-]*)`", path.read_text())
    missing = sorted({name for name in named if not (REPO / name).exists()})
    assert not missing, f"{path.name} names paths that do not exist: {missing}"


def test_the_architecture_describes_every_package_on_disk() -> None:
    text = (DOCS / "architecture.md").read_text()
    packages = sorted(
        init.parent.relative_to(REPO).as_posix()
        for top in ("agent", "export")
        for init in (REPO / top).rglob("__init__.py")
        if init.parent != REPO / top
    )
    assert packages
    undescribed = [package for package in packages if f"`{package}/`" not in text]
    assert not undescribed, f"docs/architecture.md does not describe {undescribed}"


def test_the_architecture_lists_the_phases_of_a_stack_in_order() -> None:
    life = section((DOCS / "architecture.md").read_text(), "### The life of a stack")
    documented = [row[0] for row in table_rows(life)]
    assert documented == [phase.name for phase in Phase]


def test_the_data_path_picture_is_well_formed_svg() -> None:
    root = ET.parse(DOCS / "data-path.svg").getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert "docs/data-path.svg" in links(README)


def test_the_node_red_flow_parses_and_reads_fields_the_results_carry() -> None:
    (block,) = code_blocks(DOCS / "dashboards.md", "json")
    flow = json.loads(block)
    mqtt_in = next(node for node in flow if node["type"] == "mqtt in")
    assert mqtt_in["topic"] == "hpa-edge/+/results"
    assert mqtt_in["datatype"] == "json"
    function = next(node for node in flow if node["type"] == "function")
    used = set(re.findall(r"\b(?:msg\.payload|r)\.([a-z_]+)", function["func"]))
    assert used <= set(SCHEMA["$defs"]["result"]["properties"])
    ids = {node["id"] for node in flow}
    assert all(target in ids for node in flow for wire in node.get("wires", []) for target in wire)
    # a flows file (headless Node-RED) runs only nodes on a tab; the editor imports the tab with them
    (tab,) = [node for node in flow if node["type"] == "tab"]
    assert all(node.get("z") == tab["id"] for node in flow if node["type"] not in ("tab", "mqtt-broker"))
    # nothing lost while Node-RED is down: a persistent session that outlives a restart
    (broker,) = [node for node in flow if node["type"] == "mqtt-broker"]
    assert broker["clientid"]
    assert broker["cleansession"] is False
    assert broker["autoUnsubscribe"] is False
    assert int(broker["sessionExpiry"]) >= 3600
    assert mqtt_in["qos"] == "1"
    # de-duplication survives a restart, and the structured result stays the payload
    assert "'file')" in function["func"]
    assert "msg.payload =" not in function["func"]
    (settings,) = code_blocks(DOCS / "dashboards.md", "js")
    assert 'file: { module: "localfilesystem"' in settings


def test_the_home_assistant_example_parses_and_reads_published_fields() -> None:
    (block,) = [b for b in code_blocks(DOCS / "dashboards.md", "yaml") if b.startswith("mqtt:")]
    config = yaml.safe_load(block)["mqtt"]
    fields = set(SCHEMA["$defs"]["result"]["properties"]) | set(SCHEMA["$defs"]["stats"]["properties"])
    for sensor in config["sensor"]:
        assert sensor["state_topic"].rsplit("/", 1)[-1] in ("latest", "stats")
        used = set(re.findall(r"value_json\.([a-z_]+)", json.dumps(sensor)))
        assert used <= fields, used - fields
    status = config["binary_sensor"][0]
    states = SCHEMA["$defs"]["status"]["enum"]
    assert (status["payload_on"], status["payload_off"]) == ("online", "offline")
    assert set(states) == {"online", "degraded", "offline"}  # every state the template must map
    assert "'offline'" in status["value_template"]


def test_grafana_fields_named_in_the_docs_exist() -> None:
    text = (DOCS / "dashboards.md").read_text()
    grafana = text[text.index("## Grafana") : text.index("### Telegraf")]
    named = set(re.findall(r"`([a-z]+_[a-z0-9_]+|processed|failed|quarantined)`", grafana))
    fields = set(SCHEMA["$defs"]["result"]["properties"]) | set(SCHEMA["$defs"]["stats"]["properties"])
    assert (
        named - {"json_string_fields", "data_format", "stack_id", "mqtt_consumer", "stats_interval"} <= fields
    )


def test_the_prometheus_section_names_every_metric_the_dashboard_serves() -> None:
    from agent.tools.dashboard import State

    state = State()
    prefix = "hpa-edge/scope1"
    state.handle(f"{prefix}/status", b"online")
    state.handle(
        f"{prefix}/stats", json.dumps({"kind": "stats", "instrument": "scope1", "processed": 1}).encode()
    )
    served = set(re.findall(r"^# TYPE (\w+) ", state.metrics(), re.M))
    text = section((DOCS / "dashboards.md").read_text(), "## Prometheus")
    documented = set(re.findall(r"`(hpa_edge_\w+)`", text))
    assert served == documented
    (scrape,) = [b for b in code_blocks(DOCS / "dashboards.md", "yaml") if "scrape_configs" in b]
    assert yaml.safe_load(scrape)["scrape_configs"][0]["static_configs"][0]["targets"] == ["localhost:8088"]


def test_the_dashboard_options_in_the_docs_are_its_options() -> None:
    import argparse

    from agent.tools.dashboard import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    options = {o for action in parser._actions for o in action.option_strings} - {"-h", "--help"}
    text = section((DOCS / "dashboards.md").read_text(), "## The live web page: `hpa-edge dashboard`")
    table = " ".join(row[0] for row in table_rows(text))
    documented = set(re.findall(r"`(--[a-z-]+)", table))
    assert options == documented


def test_the_telegraf_example_parses_and_keeps_labels_msg_id_and_time() -> None:
    import tomllib

    text = (DOCS / "dashboards.md").read_text()
    assert "### Telegraf (not tested here)" in text  # no claim without a test behind it
    (block,) = code_blocks(DOCS / "dashboards.md", "toml")
    consumer = tomllib.loads(block)["inputs"]["mqtt_consumer"][0]
    assert consumer["data_format"] == "json_v2"
    assert consumer["persistent_session"] is True
    assert consumer["client_id"]
    (parser,) = consumer["json_v2"]
    assert parser["timestamp_path"] == "time"
    fields = {field.get("rename", field["path"]): field for field in parser["field"]}
    assert {"msg_id", "labels", "stack_id"} <= set(fields)
    assert fields["labels"]["type"] == "string"  # one value: an array would become one metric per label
    paths = {field["path"].split("|")[0] for field in parser["field"] + parser["tag"]}
    assert paths <= set(SCHEMA["$defs"]["result"]["properties"])
