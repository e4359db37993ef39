"""The ceiling: a paho MQTT 5 responder that answers every record at once (no validation, no
database), subscribed like the gateway (shared, QoS 1).

    python -m bench.echo HOST PORT PREFIX
"""

from __future__ import annotations

import socket
import sys
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPLY = b'{"status":"success","data":{"idempotent":false}}'


def main(host: str, port: int, prefix: str) -> None:
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id="bench-echo",
        protocol=mqtt.MQTTv5,
    )
    client.max_inflight_messages_set(0)

    def on_connect(c: mqtt.Client, _u: Any, _f: Any, _rc: Any, _p: Any = None) -> None:
        sock = c.socket()
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.subscribe(f"$share/bench-echo/{prefix}/sessions/+/records", qos=1)

    def on_subscribe(*_a: Any) -> None:
        print("ready", flush=True)

    def on_message(c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        props = msg.properties
        topic = getattr(props, "ResponseTopic", None) or f"{msg.topic}/reply"
        out = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        corr = getattr(props, "CorrelationData", None)
        if corr is not None:
            out.CorrelationData = corr
        c.publish(topic, REPLY, qos=1, properties=out)

    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.connect(host, port, keepalive=60)
    client.loop_forever()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
