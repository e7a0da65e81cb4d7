"""The `hpa-edge` command: one explicit table of subcommands, each loaded only when called.

A device install lacks the workstation's TensorFlow and scikit-learn, so a subcommand's
module is imported only when that subcommand runs; `hpa-edge --help` imports none of them.
Each subcommand module offers `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NamedTuple

from agent import __version__


class Command(NamedTuple):
    module: str
    summary: str
    extra: str  # the install extra the command needs


COMMANDS: dict[str, Command] = {
    "synth": Command("export.data.synth", "write synthetic HPA stacks and a train.csv", "core"),
    "check-stack": Command("agent.tools.check_stack", "read stacks and report each as OK or why not", "core"),
    "baseline": Command(
        "export.training.baseline", "score a simple hand-feature baseline on a labelled data set", "export"
    ),
    "convert": Command(
        "export.conversion.make_embedder",
        "convert the backbone to the TFLite file the device runs, before training on its features",
        "export",
    ),
    "embed": Command(
        "export.features.embed", "compute and cache backbone embeddings of a labelled data set", "export"
    ),
    "auc": Command("export.training.auc", "compare embedding caches by cross-validated ROC AUC", "export"),
    "features-compare": Command(
        "export.training.features_compare",
        "compare candidate feature recipes by cross-validated ROC AUC on a small labelled set",
        "export",
    ),
    "export": Command(
        "export.conversion.make_bundle", "turn a trained model into a verified model bundle", "export"
    ),
    "quant-probe": Command(
        "export.conversion.quant_probe",
        "how a backbone survives each TFLite quantization, on real stacks",
        "export",
    ),
    "verify": Command("agent.tools.verify", "check a model bundle with the device runtimes", "agent"),
    "predict": Command(
        "agent.tools.predict", "classify stack files once and print JSON results (no broker)", "agent"
    ),
    "agreement": Command(
        "export.training.agreement",
        "compare results with known labels: label counts, F1, the review flag",
        "core",
    ),
    "listen": Command(
        "agent.tools.listen", "print results arriving from devices over MQTT, as a table", "agent"
    ),
    "dashboard": Command(
        "agent.tools.dashboard",
        "a live web page of every instrument's results, status and errors, with Prometheus metrics",
        "agent",
    ),
    "collect": Command(
        "agent.tools.collect",
        "store every instrument's results, errors and status from MQTT in SQLite or PostgreSQL",
        "collector",
    ),
    "query": Command(
        "agent.tools.query", "the facility's canned questions over the collector's database", "collector"
    ),
    "reanalyse": Command(
        "agent.tools.reanalyse",
        "run a bundle over an archive of stacks on a Dask cluster, into the collector's database",
        "reanalyse",
    ),
    "collect-bench": Command(
        "agent.tools.collect_bench",
        "results per second into the collector's database from a simulated fleet of instruments",
        "collector",
    ),
    "bench": Command(
        "agent.tools.bench", "latency and throughput of the device pipeline on this machine", "agent"
    ),
    "compare": Command(
        "export.conversion.compare",
        "time the device pipeline and the float reference (Keras + scikit-learn) on the same stacks",
        "export",
    ),
    "demo": Command(
        "agent.tools.demo", "the device side end to end on synthetic stacks (broker, agent, results)", "agent"
    ),
    "run": Command(
        "agent.service.run", "the agent service: watch a folder, classify stacks, publish over MQTT", "agent"
    ),
    "outbox": Command(
        "agent.tools.outbox",
        "list the agent's unsent and rejected messages; send them again or drop them",
        "core",
    ),
    "train": Command(
        "export.training.train", "fit the 28 location classifiers on embeddings and evaluate them", "export"
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpa-edge",
        description="Protein-location analysis of HPA fluorescence stacks, on the microscope's computer.",
        epilog="Run 'hpa-edge COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"hpa-edge {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.summary, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not args or args[0] not in COMMANDS:
        parsed = parser.parse_args(args)  # handles --help, --version and unknown commands
        parser.print_help()
        return 2 if parsed.command is None else 0
    name = args[0]
    command = COMMANDS[name]
    try:
        module = importlib.import_module(command.module)
    except ImportError as exc:
        hint = (
            "the installation is incomplete; reinstall hpa-edge"
            if command.extra == "core"
            else f"needs the '{command.extra}' install extra (pip install 'hpa-edge[{command.extra}]')"
        )
        print(f"hpa-edge {name}: {hint}: {exc}", file=sys.stderr)
        return 3
    sub = argparse.ArgumentParser(
        prog=f"hpa-edge {name}",
        description=module.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    module.add_arguments(sub)
    return int(module.run(sub.parse_args(args[1:])))


if __name__ == "__main__":
    raise SystemExit(main())
