"""Simulated field devices for end-to-end tests: they speak MQTT over WebSocket, as handhelds do."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
from collections.abc import AsyncIterator
from typing import Any, Self

import aiomqtt
import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPLY_TIMEOUT_S = 15.0


def _props(**values: Any) -> Properties:
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    for key, value in values.items():
        setattr(props, key, value)
    return props


class ReadingClient:
    """An aiomqtt client plus a task that hands every message it receives to ``_take``."""

    _client: aiomqtt.Client
    _reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        await self._client.__aenter__()
        await self._connected()
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        with contextlib.suppress(Exception):
            await self._client.__aexit__(None, None, None)

    async def _connected(self) -> None:
        """Runs once connected, before messages are read (subscriptions go here)."""

    async def _read(self) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for msg in self._client.messages:
                self._take(msg)

    def _take(self, msg: aiomqtt.Message) -> None:
        raise NotImplementedError


class Device(ReadingClient):
    """An MQTT 5 handheld over WebSocket: requests carry a Response Topic and Correlation Data."""

    def __init__(
        self,
        host: str,
        ws_port: int,
        prefix: str,
        *,
        token: str | None = None,
        client_id: str | None = None,
        transport: str = "websockets",
        port: int | None = None,
    ) -> None:
        self.prefix = prefix
        self.token = token
        self.client_id = client_id or f"dev-{secrets.token_hex(4)}"
        self.reply_topic = f"{prefix}/clients/{self.client_id}/replies"
        self._client = aiomqtt.Client(
            host,
            port if port is not None else ws_port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V5,
            transport="websockets" if transport == "websockets" else "tcp",
            websocket_path="/mqtt" if transport == "websockets" else None,
            timeout=10,
        )
        self._waiting: dict[bytes, asyncio.Future[dict[str, Any]]] = {}
        self._inboxes: dict[str, asyncio.Queue[aiomqtt.Message]] = {}
        self._seq = itertools.count(1)

    async def _connected(self) -> None:
        await self._client.subscribe(f"{self.prefix}/clients/{self.client_id}/#", qos=1)

    def _take(self, msg: aiomqtt.Message) -> None:
        corr = getattr(msg.properties, "CorrelationData", None) if msg.properties else None
        if corr is not None and corr in self._waiting:
            fut = self._waiting.pop(corr)
            if not fut.done():
                fut.set_result(orjson.loads(msg.payload))
            return
        topic = str(msg.topic)
        for pattern, queue in self._inboxes.items():
            if aiomqtt.Topic(topic).matches(pattern):
                queue.put_nowait(msg)

    def topic(self, suffix: str) -> str:
        return f"{self.prefix}/{suffix}"

    async def send(
        self,
        suffix: str,
        payload: dict[str, Any] | bytes,
        *,
        token: str | bool | None = True,
        response_topic: str | None = None,
        qos: int = 1,
    ) -> bytes:
        """Publish a request; returns its correlation data."""
        corr = f"c{next(self._seq)}-{secrets.token_hex(4)}".encode()
        props = _props(ResponseTopic=response_topic or self.reply_topic, CorrelationData=corr)
        bearer = self.token if token is True else token
        if bearer:
            props.UserProperty = [("authorization", f"Bearer {bearer}")]
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        await self._client.publish(self.topic(suffix), body, qos=qos, properties=props)
        return corr

    async def request(
        self,
        suffix: str,
        payload: dict[str, Any] | bytes,
        *,
        token: str | bool | None = True,
        timeout: float = REPLY_TIMEOUT_S,
        more_tokens: tuple[str, ...] = (),
        scheme: str = "Bearer ",
        retain: bool = False,
    ) -> dict[str, Any]:
        """Publish a request and wait for its reply (matched by Correlation Data); each of
        ``more_tokens`` goes in one more authorization user property, after ``scheme``."""
        loop = asyncio.get_running_loop()
        corr = f"c{next(self._seq)}-{secrets.token_hex(4)}".encode()
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._waiting[corr] = fut
        props = _props(ResponseTopic=self.reply_topic, CorrelationData=corr)
        bearer = self.token if token is True else token
        tokens = [bearer, *more_tokens] if bearer else list(more_tokens)
        if tokens:
            props.UserProperty = [("authorization", f"{scheme}{t}") for t in tokens]
        body = payload if isinstance(payload, bytes) else orjson.dumps(payload)
        await self._client.publish(self.topic(suffix), body, qos=1, retain=retain, properties=props)
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(corr, None)

    @contextlib.asynccontextmanager
    async def watch(self, topic_filter: str) -> AsyncIterator[asyncio.Queue[aiomqtt.Message]]:
        """Messages on ``topic_filter`` (retained ones included) while the block runs."""
        queue: asyncio.Queue[aiomqtt.Message] = asyncio.Queue()
        self._inboxes[topic_filter] = queue
        await self._client.subscribe(topic_filter, qos=1)
        try:
            yield queue
        finally:
            self._inboxes.pop(topic_filter, None)
            with contextlib.suppress(aiomqtt.MqttError):
                await self._client.unsubscribe(topic_filter)


class LegacyDevice(ReadingClient):
    """An MQTT 3.1.1 device: the token and ``replyTo`` travel in the payload."""

    def __init__(self, host: str, port: int, prefix: str, *, token: str, ws: bool = True) -> None:
        self.prefix = prefix
        self.token = token
        self.client_id = f"legacy-{secrets.token_hex(4)}"
        self._client = aiomqtt.Client(
            host,
            port,
            identifier=self.client_id,
            protocol=aiomqtt.ProtocolVersion.V311,
            transport="websockets" if ws else "tcp",
            websocket_path="/mqtt" if ws else None,
            timeout=10,
        )
        self._replies: dict[str, asyncio.Future[dict[str, Any]]] = {}

    async def _connected(self) -> None:
        await self._client.subscribe(f"{self.prefix}/clients/{self.client_id}/#", qos=1)

    def _take(self, msg: aiomqtt.Message) -> None:
        fut = self._replies.pop(str(msg.topic), None)
        if fut is not None and not fut.done():
            fut.set_result(orjson.loads(msg.payload))

    async def request(
        self, suffix: str, payload: dict[str, Any], timeout: float = REPLY_TIMEOUT_S
    ) -> dict[str, Any]:
        reply_to = f"{self.prefix}/clients/{self.client_id}/r/{secrets.token_hex(6)}"
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[reply_to] = fut
        body = {**payload, "authorization": f"Bearer {self.token}", "replyTo": reply_to}
        await self._client.publish(f"{self.prefix}/{suffix}", orjson.dumps(body), qos=1)
        return await asyncio.wait_for(fut, timeout)
