"""The service: the long-running agent behind `hpa-edge run`.

Owns the configuration (`config`), the folder (`watcher`, `tracker`), a stack's life from
seen to published (`lifecycle`, the one owner of that state), the loop and its collaborators
(`agent`, `decoding`, `recorder`, `disposal`, `stats`), durable state (`state`, `outbox`),
the output side (`drainer`, `sinks/`, `mqtt_client`), systemd (`notify`) and logs (`log`).
May import `agent.stacks` and `agent.model`; never the tools or `export`.
"""
