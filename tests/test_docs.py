"""The operator and dashboard docs stay true to the code: every key documented, examples that parse."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from agent.service.config import all_keys

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SCHEMA = json.loads((REPO / "agent" / "model" / "messages.schema.json").read_text())


def code_blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), re.S)


def test_every_configuration_key_is_in_the_operators_reference() -> None:
    text = (DOCS / "operators.md").read_text()
    missing = [key for key in all_keys() if f"| `{key}` |" not in text]
    assert not missing


def test_the_readme_links_the_docs() -> None:
    readme = (REPO / "README.md").read_text()
    for name in ("operators.md", "dashboards.md", "data-scientists.md", "benchmark.md"):
        assert f"docs/{name}" in readme


def test_the_node_red_flow_parses_and_reads_fields_the_results_carry() -> None:
    (block,) = code_blocks(DOCS / "dashboards.md", "json")
    flow = json.loads(block)
    mqtt_in = next(node for node in flow if node["type"] == "mqtt in")
    assert mqtt_in["topic"] == "hpa-edge/+/results"
    assert mqtt_in["datatype"] == "json"
    function = next(node for node in flow if node["type"] == "function")
    used = set(re.findall(r"(?:msg\.payload|r)\.([a-z_]+)", function["func"]))
    assert used <= set(SCHEMA["$defs"]["result"]["properties"])
    ids = {node["id"] for node in flow}
    assert all(target in ids for node in flow for wire in node.get("wires", []) for target in wire)


def test_the_home_assistant_example_parses_and_reads_published_fields() -> None:
    (block,) = code_blocks(DOCS / "dashboards.md", "yaml")
    config = yaml.safe_load(block)["mqtt"]
    fields = set(SCHEMA["$defs"]["result"]["properties"]) | set(SCHEMA["$defs"]["stats"]["properties"])
    for sensor in config["sensor"]:
        assert sensor["state_topic"].rsplit("/", 1)[-1] in ("latest", "stats")
        used = set(re.findall(r"value_json\.([a-z_]+)", json.dumps(sensor)))
        assert used <= fields, used - fields
    status = config["binary_sensor"][0]
    assert (status["payload_on"], status["payload_off"]) == tuple(SCHEMA["$defs"]["status"]["enum"])


def test_grafana_fields_named_in_the_docs_exist() -> None:
    text = (DOCS / "dashboards.md").read_text()
    section = text[text.index("## Grafana") : text.index("## Home Assistant")]
    named = set(re.findall(r"`([a-z]+_[a-z0-9_]+|processed|failed|quarantined)`", section))
    fields = set(SCHEMA["$defs"]["result"]["properties"]) | set(SCHEMA["$defs"]["stats"]["properties"])
    assert (
        named - {"json_string_fields", "data_format", "stack_id", "mqtt_consumer", "stats_interval"} <= fields
    )
