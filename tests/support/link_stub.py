"""A real ``MqttLink`` on a stand-in wire that keeps the bytes written, so that what goes out
(replies, PUBACKs) can be decoded with ``core.mqtt5``: for unit tests of the link and the
pipeline without a broker."""

from __future__ import annotations

import asyncio
import secrets

from gateway.config import load_settings
from gateway.core import mqtt5
from gateway.transport.mqtt import MqttLink


class Wire:
    """Keeps what the link writes."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...

    def packets(self) -> list[mqtt5.Packet]:
        return mqtt5.PacketReader().feed(bytes(self.data))


def connected_link() -> tuple[MqttLink, Wire]:
    """A real MqttLink in the state ``_session`` leaves it in after a CONNACK."""
    settings = load_settings(mqtt_client_id=f"gw-unit-{secrets.token_hex(3)}", jwt_secret="x" * 40)
    link = MqttLink(
        settings,
        subscriptions=[],
        status_topic=None,
        online_payload=lambda: b"",
        offline_payload=lambda: b"",
    )
    wire = Wire()
    link._wire = wire
    link._lost = asyncio.get_running_loop().create_future()
    link._epoch = 1
    link._connected_event.set()
    return link, wire
