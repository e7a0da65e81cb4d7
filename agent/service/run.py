"""`hpa-edge run --config FILE`: the agent service (watch folder -> inference -> MQTT).

Start-up checks everything before touching a stack: the configuration (every key, with
HPA_EDGE_* environment overrides), the acquisition folder, the model bundle (hashes,
labels, golden vectors on this machine) and the state database. The broker may be down:
results wait in the database until it is back. SIGTERM or SIGINT finishes the current
batch, delivers what the broker takes within mqtt.flush_seconds, publishes "offline" and
exits 0.

Exit codes: 0 clean stop; 1 cannot start (folder, bundle, database) or crashed;
2 bad configuration (--check-config: 0 when the file is good).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from types import FrameType

from agent.service import log
from agent.service.config import ConfigError, describe, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = os.environ.get("HPA_EDGE_CONFIG")
    parser.add_argument(
        "--config",
        type=Path,
        default=Path(default) if default else None,
        required=default is None,
        help="TOML configuration file (default: $HPA_EDGE_CONFIG); see agent/service/agent.example.toml",
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration (with environment overrides), print every key and exit",
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"hpa-edge run: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.check_config:
        for line in describe(config):
            print(line)
        print(f"configuration OK: {args.config}", file=sys.stderr)
        return 0

    from agent.service.agent import Agent, StartError

    log.setup(config.log_level)
    agent = Agent(config)

    def on_signal(number: int, frame: FrameType | None) -> None:
        log.event("stop_requested", signal=signal.Signals(number).name)
        agent.request_stop()

    # Before start-up, so a signal during it stops the agent cleanly instead of killing it.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
    except StartError as exc:
        log.event("start_failed", "error", reason=str(exc))
        agent.close(flush_seconds=0)
        return 1
    try:
        agent.run()
    except Exception as exc:
        log.event("agent_crashed", "error", error=repr(exc))
        agent.close(flush_seconds=0)
        return 1
    agent.close()
    return 0
