"""The broker's keepalive cap (MQTT 5 Server Keep Alive) is what the link pings by."""

from __future__ import annotations

import asyncio
import contextlib
import secrets

from gateway.config import load_settings
from gateway.transport.mqtt import MqttLink
from tests.support.servers import Servers
from tests.support.tenants import JWT_SECRET


def tcp_link(servers: Servers, keepalive_s: int) -> MqttLink:
    settings = load_settings(
        mqtt_url=servers.mqtt_url,
        mqtt_client_id=f"gw-ka-{secrets.token_hex(3)}",
        mqtt_keepalive_s=keepalive_s,
        jwt_secret=JWT_SECRET,
    )
    return MqttLink(
        settings,
        subscriptions=[f"$share/g/hb-ka-{secrets.token_hex(3)}/v2/sessions/open"],
        status_topic=None,
        online_payload=lambda: b"",
        offline_payload=lambda: b"",
    )


async def granted_keepalive(servers: Servers, asked_s: int) -> int:
    link = tcp_link(servers, asked_s)
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(link.wait_connected(), 10)
        return link.keepalive_s
    finally:
        link.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        task.cancel()


async def test_the_link_pings_within_the_brokers_keepalive_cap(servers: Servers) -> None:
    """The project's mosquitto caps keepalive at 300 s (max_keepalive): asked for 600
    (GATEWAY_MQTT_KEEPALIVE_S allows up to 3600), the broker answers 300 and the link uses it
    (at 600 it pinged too rarely and was dropped for silence); below the cap, its own."""
    assert await granted_keepalive(servers, 600) == 300
    assert await granted_keepalive(servers, 30) == 30
