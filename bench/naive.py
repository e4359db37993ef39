"""The naive baseline: one INSERT and one awaited reply per message, on aiomqtt and asyncpg,
the way a first version of a gateway is usually written. ``python -m bench.naive HOST PORT
PREFIX DSN``."""

from __future__ import annotations

import asyncio
import socket
import sys

import aiomqtt
import asyncpg
import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

SCHEMA = """CREATE TABLE IF NOT EXISTS bench_naive_records (
    session_id text, worker_id text, client_event_id text, worker_name text, units numeric,
    recorded_at timestamptz, PRIMARY KEY (session_id, worker_id, client_event_id))"""
INSERT = """INSERT INTO bench_naive_records VALUES ($1, $2, $3, $4, $5, $6)
            ON CONFLICT DO NOTHING RETURNING 1"""


async def main(host: str, port: int, prefix: str, dsn: str) -> None:
    from datetime import datetime

    conn = await asyncpg.connect(dsn)
    await conn.execute(SCHEMA)
    nodelay = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    async with aiomqtt.Client(
        host,
        port,
        identifier="bench-naive",
        protocol=aiomqtt.ProtocolVersion.V5,
        socket_options=[nodelay],
    ) as client:
        await client.subscribe(f"$share/bench-naive/{prefix}/sessions/+/records", qos=1)
        print("ready", flush=True)
        async for msg in client.messages:
            body = orjson.loads(msg.payload)
            session_id = str(msg.topic).split("/")[-2]
            new = await conn.fetchval(
                INSERT,
                session_id,
                body["workerId"],
                body["clientEventId"],
                body["worker_name"],
                body.get("units", 1),
                datetime.fromisoformat(body["recordedAtUtc"]),
            )
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            corr = getattr(msg.properties, "CorrelationData", None)
            if corr is not None:
                props.CorrelationData = corr
            reply = {"status": "success", "data": {"idempotent": new is None}}
            topic = getattr(msg.properties, "ResponseTopic", None) or f"{msg.topic}/reply"
            await client.publish(topic, orjson.dumps(reply), qos=1, properties=props)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]))
