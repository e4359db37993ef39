"""A fast echo on the gateway's own MQTT link (no validation, no database): how far the
broker and the load generator go on this machine. ``python -m bench.fastecho URL PREFIX``."""

from __future__ import annotations

import asyncio
import sys

from gateway.config import load_settings
from gateway.transport.mqtt import Inbound, MqttLink

REPLY = b'{"status":"success","data":{"idempotent":false}}'


async def main(url: str, prefix: str) -> None:
    settings = load_settings(mqtt_url=url, mqtt_client_id="bench-fastecho", max_inflight=5000)
    link = MqttLink(
        settings,
        subscriptions=[f"$share/bench-fastecho/{prefix}/sessions/+/records"],
        status_topic=f"{prefix}/bench/fastecho",
        online_payload=lambda: b"online",
        offline_payload=lambda: b"offline",
    )

    def answer(msg: Inbound) -> None:
        link.publish(msg.response_topic or msg.topic + "/reply", REPLY, correlation=msg.correlation)
        link.ack(msg)

    link.on_message = answer
    link.on_connected = lambda _present: print("ready", flush=True)
    await link.run()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
