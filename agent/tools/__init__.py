"""The tools: commands people run by hand beside the service.

`predict` (one-shot JSON results), `verify` (check a bundle), `check-stack` (will these
files read?), `listen` (watch results arrive), `bench` (how fast, per stage), `demo` (the
device side end to end), `outbox` (refused messages), `dashboard` (a local web page and
Prometheus metrics from the broker), `collect` / `query` (the facility's database). The top
room: may import any room of `agent`; never `export`
(the workstation's commands live there and are called by name through `agent.cli`).
"""
