"""The Node-RED flow of docs/dashboards.md, run by a real Node-RED 4 against mosquitto and the agent.

Node-RED is installed once with npm into a cache folder outside the repository
(~/.cache/hpa-edge/node-red, or $HPA_EDGE_CACHE/node-red); the test skips, saying why, where
node or npm is missing or the install fails. The flow and the settings.js are the documented
ones, verbatim but for the broker's address and the output file's path.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from agent.tools.demo import free_port
from tests.agent_harness import config_for, drop, running, stack_files

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("HPA_EDGE_CACHE", Path.home() / ".cache" / "hpa-edge")) / "node-red"
NODE_RED = "node-red@4"


def documented(language: str) -> str:
    (block,) = re.findall(rf"```{language}\n(.*?)```", (REPO / "docs" / "dashboards.md").read_text(), re.S)
    return block


@pytest.fixture(scope="session")
def node_red() -> Path:
    """red.js of Node-RED 4, installed into the cache folder the first time (about 20 s)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not installed (sudo apt-get install -y nodejs npm)")
    major = int(
        subprocess.run([node, "--version"], capture_output=True, text=True).stdout.strip("v\n").split(".")[0]
    )
    if major < 18:
        pytest.skip(f"Node-RED 4 needs node >= 18, this is node {major}")
    red = CACHE / "node_modules" / "node-red" / "red.js"
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test session may be installing it right now
        if not red.exists():
            install = subprocess.run(
                [npm, "install", "--no-audit", "--no-fund", "--omit=dev", "--prefix", str(CACHE), NODE_RED],
                capture_output=True, text=True, timeout=900,
            )  # fmt: skip
            if install.returncode != 0 or not red.exists():
                pytest.skip(f"npm install {NODE_RED} into {CACHE} failed: {install.stderr[-1500:]}")
    return red


class NodeRed:
    """Node-RED on a user folder: the documented settings.js and flow, started and stopped at will."""

    def __init__(self, red: Path, folder: Path, broker_port: int, output: Path, editor: bool = False) -> None:
        self.red = red
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "settings.js").write_text(documented("js"))  # verbatim
        overrides = {
            "uiHost": "127.0.0.1",
            "uiPort": free_port(),
            "httpNodeRoot": False,
            "telemetry": {"enabled": False},
            "diagnostics": {"enabled": False},
            "logging": {"console": {"level": "info", "metrics": False, "audit": False}},
        }
        if editor:  # the editor as a person opens it, minus the welcome tour
            overrides["editorTheme"] = {"tours": False}
        else:
            overrides["httpAdminRoot"] = False  # headless
        (folder / "test-settings.js").write_text(
            f'module.exports = Object.assign({{}}, require("./settings.js"), {json.dumps(overrides)});\n'
        )
        self.flow = json.loads(documented("json"))
        for node in self.flow:
            if node["type"] == "mqtt-broker":
                node["broker"], node["port"] = "127.0.0.1", str(broker_port)
            if node["type"] == "file":
                node["filename"] = str(output)
        if not editor:  # the flow as its flows file; in the editor it is imported instead
            (folder / "flows.json").write_text(json.dumps(self.flow, indent=1))
        self.url = f"http://127.0.0.1:{overrides['uiPort']}/"
        self.process: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def log(self) -> Path:
        return self.folder / f"node-red-{self.runs}.log"

    def start(self, ready: str = "Connected to broker") -> None:
        self.runs += 1
        node = shutil.which("node")
        assert node is not None
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [node, str(self.red), "--userDir", str(self.folder),
                 "--settings", str(self.folder / "test-settings.js")],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
            )  # fmt: skip
        deadline = time.monotonic() + 60
        while ready not in self.log.read_text():
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, self.log.read_text()[-3000:]
            time.sleep(0.1)

    def stop(self) -> None:
        """As systemd or Ctrl-C stops it: SIGINT, Node-RED closes its nodes and flushes context."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.process = None


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(condition: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return bool(condition())


def test_the_documented_flow_as_a_flows_file_keeps_every_result_once_across_a_restart(
    tmp_path, broker, subscriber, demo_bundle, stack_source, node_red
):
    output = tmp_path / "out" / "hpa-edge-results.jsonl"
    red = NodeRed(node_red, tmp_path / "node-red", broker.port, output)
    config = config_for(tmp_path, broker.port)
    try:
        red.start()
        with running(config, demo_bundle):
            for i in range(3):
                drop(stack_files(stack_source, i), config.watch.folder, f"before-{i}")
            assert wait_for(lambda: len(lines(output)) == 3), red.log.read_text()[-3000:]

            red.stop()  # Node-RED is down; the agent goes on
            for i in range(3, 6):
                drop(stack_files(stack_source, i), config.watch.folder, f"while-down-{i}")
            assert subscriber.wait_for(lambda: len(subscriber.on("results")) == 6)
            first = subscriber.on("results")[0].payload
            subscriber.client.publish("hpa-edge/scope/results", first, qos=1).wait_for_publish(
                10
            )  # a re-send

            red.start()
            drop(stack_files(stack_source, 6), config.watch.folder, "after")  # queued after the re-send
            assert wait_for(lambda: len(lines(output)) >= 7), red.log.read_text()[-3000:]
            time.sleep(0.5)
        published = {json.loads(m.payload)["msg_id"]: json.loads(m.payload) for m in subscriber.on("results")}
        written = lines(output)
        assert [row["msg_id"] for row in written] == list(published)  # each once, none lost, in order
        assert written == list(published.values())  # the whole structured result: scores, labels, msg_id
        assert all(len(row["scores"]) == 28 for row in written)
        assert "Unknown context store" not in red.log.read_text()  # settings.js has the 'file' store
        stored = list((red.folder / "context").rglob("*.json"))
        assert stored, "the seen msg_ids were not written to the file context store"
    finally:
        red.stop()


def test_the_documented_flow_imported_in_the_editor_and_deployed_passes_the_structured_result(
    tmp_path, broker, subscriber, node_red
):
    from tests.test_dashboard import Chromium

    output = tmp_path / "out" / "hpa-edge-results.jsonl"
    red = NodeRed(node_red, tmp_path / "node-red", broker.port, output, editor=True)
    chromium = Chromium(tmp_path / "chromium")
    try:
        red.start(ready="Started flows")
        chromium.call("Page.navigate", url=red.url)
        assert chromium.wait_for(
            "typeof RED !== 'undefined' && !!RED.nodes && !!RED.nodes.getType('mqtt in')"
            " && RED.workspaces.count() > 0 && !!document.querySelector('#red-ui-workspace-chart')",
            60,
        ), "the editor did not load"
        # menu > Import: paste the flow into the dialog, press Import, then Deploy
        chromium.evaluate("RED.clipboard.import(), true")
        text = json.dumps(json.dumps(red.flow, indent=2))
        chromium.evaluate(f"$('#red-ui-clipboard-dialog-import-text').val({text}).trigger('keyup'), true")
        assert chromium.wait_for("!$('#red-ui-clipboard-dialog-ok').button('option', 'disabled')")
        chromium.evaluate("$('#red-ui-clipboard-dialog-ok').click(), true")
        assert chromium.wait_for(
            "RED.nodes.node('hpa-once') !== null && RED.nodes.node('hpa-once') !== undefined"
        )
        chromium.evaluate("RED.actions.invoke('core:deploy-flows'), true")
        deadline = time.monotonic() + 30
        while red.log.read_text().count("Connected to broker") < 1:
            assert time.monotonic() < deadline, red.log.read_text()[-3000:]
            time.sleep(0.1)
        deployed = json.loads((red.folder / "flows.json").read_text())
        (tab,) = [n for n in deployed if n["type"] == "tab" and n["label"] == "hpa-edge results"]
        ours = {
            n["id"]: n
            for n in deployed
            if n["id"].startswith("hpa-") and n["type"] not in ("tab", "mqtt-broker")
        }
        assert set(ours) == {"hpa-results", "hpa-once", "hpa-debug", "hpa-file"}
        assert {n["z"] for n in ours.values()} == {tab["id"]}

        doc = {
            "schema_version": 1, "kind": "result", "msg_id": "0123456789abcdef0123456789abcdef",
            "instrument": "scope1", "stack_id": "s1", "time": "2026-01-01T10:00:00.000Z",
            "labels": ["Nucleoplasm", "Cytosol"], "n_labels": 2,
            "scores": {"Nucleoplasm": 0.9, "Cytosol": 0.5}, "near_threshold": ["Cytosol"],
            "review": True, "review_reasons": ["near_threshold"], "purpose": "demo",
        }  # fmt: skip
        for _ in range(2):  # at-least-once: the same result twice
            subscriber.client.publish("hpa-edge/scope1/results", json.dumps(doc), qos=1).wait_for_publish(10)
        assert wait_for(lambda: len(lines(output)) >= 1), red.log.read_text()[-3000:]
        time.sleep(0.5)
        assert lines(output) == [doc]
    finally:
        chromium.close()
        red.stop()
