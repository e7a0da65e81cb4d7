"""Running the real agent in tests: a config file, the agent in a thread, stacks to drop in."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from agent.model.bundle import Bundle
from agent.service import log
from agent.service.agent import Agent
from agent.service.config import Config, load_config
from agent.service.outbox import Outbox
from agent.stacks.labels import CHANNELS

FAST = {
    "watch": {
        "settle_seconds": 0.3,
        "poll_interval": 0.1,
        "incomplete_timeout": 30.0,
        "rescan_interval": 2.0,
    },
    "mqtt": {"reconnect_min": 0.2, "reconnect_max": 1.0, "stats_interval": 0.0, "flush_seconds": 3.0},
}


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {toml_value(v)}' for k, v in value.items()) + " }"
    return "'" + str(value) + "'"


def write_config(tmp: Path, port: int, sections: Mapping[str, Mapping[str, Any]] | None = None) -> Path:
    """An agent.toml for a test: its own folder, database and broker port, fast timings."""
    merged: dict[str, dict[str, Any]] = {name: dict(values) for name, values in FAST.items()}
    merged.setdefault("watch", {})["folder"] = str(tmp / "incoming")
    merged["state"] = {"database": str(tmp / "state" / "state.db")}
    merged["bundle"] = {"path": str(Path(__file__).resolve().parent.parent / "models" / "demo")}
    merged.setdefault("mqtt", {})["port"] = port
    top = {"instrument": "scope"}
    for name, values in (sections or {}).items():
        if isinstance(values, Mapping):
            merged.setdefault(name, {}).update(values)
        else:
            top[name] = values
    lines = [f"{key} = {toml_value(value)}" for key, value in top.items()]
    for name, values in merged.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    (tmp / "incoming").mkdir(parents=True, exist_ok=True)
    path = tmp / "agent.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def config_for(tmp: Path, port: int, sections: Mapping[str, Any] | None = None) -> Config:
    return load_config(write_config(tmp, port, sections), environ={})


@contextmanager
def running(config: Config, bundle: Bundle) -> Iterator[Agent]:
    """The agent started and looping in a thread; stopped, flushed and joined afterwards."""
    log.setup("debug")  # to stdout, which pytest shows for a failing test
    agent = Agent(config, bundle=bundle)
    agent.start()
    failure: list[BaseException] = []

    def loop() -> None:
        try:
            agent.run()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=loop, name="agent-loop")
    thread.start()
    try:
        yield agent
    finally:
        agent.request_stop()
        thread.join(20)
        agent.close(flush_seconds=2.0)
    assert not thread.is_alive(), "agent loop did not stop"
    assert not failure, f"agent loop failed: {failure[0]!r}"
    assert not agent_threads(), f"threads left running: {agent_threads()}"


def agent_threads() -> list[str]:
    """The agent's own threads still alive: the drainer, its connect, the inotify reader, the
    systemd watchdog pinger and the decode threads."""
    return [
        t.name
        for t in threading.enumerate()
        if t.name in ("mqtt-drainer", "mqtt-connect", "inotify", "systemd-watchdog")
        or t.name.startswith("decode")
    ]


def stack_ids(source: Path) -> list[str]:
    """The ids of the stacks in `source`/stacks (the `stack_source` fixture's folder), sorted."""
    return sorted({p.name.rsplit("_", 1)[0] for p in (source / "stacks").glob("*_red.png")})


def stack_files(source: Path, index: int = 0) -> dict[str, Path]:
    """The four channel files of one stack of `source` (the `stack_source` fixture), by channel.

    The index counts round the set (101 real stacks, or 24 synthetic ones): any index gives a
    stack, and indices that differ by less than 24 give different stacks.
    """
    ids = stack_ids(source)
    stack_id = ids[index % len(ids)]
    return {c: source / "stacks" / f"{stack_id}_{c}.png" for c in CHANNELS}


def drop(files: Mapping[str, Path], folder: Path, stack_id: str, order: tuple[str, ...] = CHANNELS) -> None:
    """Copy a stack into the folder under a new id, channel by channel in `order`."""
    for channel in order:
        shutil.copyfile(files[channel], folder / f"{stack_id}_{channel}.png")


def outbox_depth(database: Path) -> dict[str, int]:
    """Pending and rejected rows, read through the agent's own outbox module."""
    outbox = Outbox(database)
    try:
        return outbox.depth()
    finally:
        outbox.close()
