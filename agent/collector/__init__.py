"""The facility's collector: results, errors and status from every instrument into one database.

Owns the other end of the agents' MQTT stream: `ingest` (a message on the wire to rows, or to
an `invalid` row with the reason), `database` (SQLite or PostgreSQL behind one small
interface), `schema` (the tables and their numbered migrations), `store` (rows written exactly
once per msg_id), `collector` (the MQTT 5 loop: shared subscription, persistent session,
acknowledgement only after the commit), `queries` (the canned queries of `hpa-edge query`) and
`fleet` (a simulated fleet of instruments, for measuring and testing).

May import `agent.model.messages` (the documents' contract), `agent.stacks.labels`,
`agent.service.mqtt_client` (the one MQTT client factory), paho-mqtt, sqlite3 and psycopg 3
(lazily, only for a postgresql:// URL). The device's agent never imports this room: it sits
above `agent.service` and below `agent.tools`.
"""
