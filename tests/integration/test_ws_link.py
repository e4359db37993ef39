"""The MQTT link over WebSocket (``ws://``): it reconnects whenever its connection ends, also
when the link closed it itself, and a clean stop sends its DISCONNECT before the WebSocket
closes. The broker here is a small websockets server speaking just enough MQTT 5."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from gateway.config import load_settings
from gateway.core import mqtt5
from gateway.transport.mqtt import MqttLink
from tests.support.tenants import JWT_SECRET


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class FakeWsBroker:
    """Accepts MQTT 5 over WebSocket: CONNACK to each CONNECT, then ``suback`` reason codes to
    SUBSCRIBE, UNSUBACK to UNSUBSCRIBE, PUBACK to QoS 1 publishes, PINGRESP to PINGREQ; with
    ``silent_after_connack`` nothing after the CONNACK (a half-open connection)."""

    def __init__(self, *, suback: int = 0x01, silent_after_connack: bool = False) -> None:
        self.suback = suback
        self.silent = silent_after_connack
        self.connections = 0
        self.packets: list[tuple[int, bytes]] = []  # (first byte, body) of every packet seen
        self.second_connection = asyncio.Event()
        self.closed = asyncio.Event()

    @property
    def disconnects(self) -> list[bytes]:
        """The bodies of the DISCONNECT packets received."""
        return [body for first, body in self.packets if first == mqtt5.DISCONNECT]

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        if self.connections >= 2:
            self.second_connection.set()
        buf = b""
        try:
            async for message in ws:
                assert isinstance(message, bytes)
                buf += message
                while len(buf) >= 2:
                    vi = mqtt5.read_varint(buf, 1)
                    if vi is None:
                        break
                    length, start = vi
                    if len(buf) < start + length:
                        break
                    first, body, buf = buf[0], buf[start : start + length], buf[start + length :]
                    self.packets.append((first, body))
                    kind = first & 0xF0
                    if kind == mqtt5.CONNECT:
                        await ws.send(b"\x20\x03\x00\x00\x00")  # CONNACK, success, no props
                    elif self.silent:
                        continue  # a half-open link: nothing comes back any more
                    elif first == mqtt5.SUBSCRIBE:
                        pid = body[:2]
                        n = body.count(b"$share/")  # one reason code per filter
                        await ws.send(
                            bytes((0x90, 3 + n)) + pid + b"\x00" + bytes([self.suback]) * n
                        )
                    elif first == 0xA2:  # UNSUBSCRIBE: one "success" per filter
                        pid = body[:2]
                        n = body.count(b"$share/")
                        await ws.send(bytes((0xB0, 3 + n)) + pid + b"\x00" + b"\x00" * n)
                    elif kind == mqtt5.PUBLISH and (first >> 1) & 3:
                        topic_len = (body[0] << 8) | body[1]
                        pid = body[2 + topic_len : 4 + topic_len]
                        await ws.send(mqtt5.PUBACK_HEAD + pid)
                    elif kind == 0xC0:
                        await ws.send(b"\xd0\x00")
        except Exception:
            pass
        finally:
            self.closed.set()


@contextlib.asynccontextmanager
async def fake_ws_broker(broker: FakeWsBroker) -> AsyncIterator[int]:
    port = _free_port()
    async with serve(broker.handler, "127.0.0.1", port, subprotocols=["mqtt"]):  # type: ignore[list-item]
        yield port


def ws_link(port: int, **overrides: Any) -> MqttLink:
    settings = load_settings(
        mqtt_url=f"ws://127.0.0.1:{port}/mqtt",
        mqtt_client_id=f"gw-ws-{secrets.token_hex(3)}",
        jwt_secret=JWT_SECRET,
        **overrides,
    )
    return MqttLink(
        settings,
        subscriptions=["$share/g/hb-ws/v2/sessions/open"],
        status_topic="hb-ws/v2/gateway/status",
        online_payload=lambda: b'{"status":"online"}',
        offline_payload=lambda: b'{"status":"offline"}',
    )


@contextlib.asynccontextmanager
async def running_link(link: MqttLink) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(link.wait_connected(), 10)
        yield task
    finally:
        link.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
        task.cancel()


async def test_ws_link_reconnects_after_the_broker_refuses_its_subscription() -> None:
    """A refused shared subscription (SUBACK 0x87) makes the link close the connection itself
    and connect again, over a WebSocket as over TCP: the closing wire tells the link it is
    gone, so the session ends instead of staying "connected" on a dead socket."""
    broker = FakeWsBroker(suback=0x87)
    async with fake_ws_broker(broker) as port, running_link(ws_link(port)):
        try:
            await asyncio.wait_for(broker.second_connection.wait(), 15)
        except TimeoutError:
            raise AssertionError(
                "the ws link closed its connection after the refused SUBACK and never "
                f"reconnected (connections seen: {broker.connections})"
            ) from None


async def test_ws_link_reconnects_when_the_broker_goes_silent() -> None:
    """A half-open connection (the broker no longer answers PINGREQ): the keepalive gives up,
    closes the WebSocket and the link connects again."""
    broker = FakeWsBroker(silent_after_connack=True)
    async with (
        fake_ws_broker(broker) as port,
        running_link(ws_link(port, mqtt_keepalive_s=5)),
    ):
        try:
            await asyncio.wait_for(broker.second_connection.wait(), 30)
        except TimeoutError:
            raise AssertionError(
                "the keepalive gave up on a silent broker but the ws link never reconnected"
            ) from None


@pytest.mark.parametrize("retiring", [False, True], ids=["stop", "retire"])
async def test_ws_link_sends_its_disconnect_before_closing_on_a_clean_stop(
    retiring: bool,
) -> None:
    """On stop the link queues a DISCONNECT (Session Expiry 0 when retiring, which ends the
    broker session) and closes the wire; over a WebSocket what was queued before the close
    still goes out first, and only then does the link report the session ended (else the
    broker keeps the session, and fires the will on an ordinary stop)."""
    broker = FakeWsBroker()
    async with fake_ws_broker(broker) as port:
        link = ws_link(port)
        link.retiring = retiring
        async with running_link(link):
            if retiring:
                await asyncio.wait_for(link.wait_unsubscribed(), 10)
                link.end_session_on_stop = True  # as Gateway.retire does once all is answered
            else:
                await asyncio.sleep(0.3)  # SUBACK and the status PUBACK come back
        await asyncio.wait_for(broker.closed.wait(), 10)
    seen = [hex(first) for first, _ in broker.packets]
    assert len(broker.disconnects) == 1, seen
    if retiring:
        assert broker.disconnects[0] == mqtt5.encode_disconnect(session_expiry=0)[2:]
        assert link.session_ended
    else:
        assert broker.disconnects[0] == b""
