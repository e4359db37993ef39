"""A handheld streaming records through failures, as real ones do: QoS 1, its replies under
``P/clients/<id>/replies``, and re-sending (same clientEventId) whatever was never answered,
reconnecting when the broker goes away."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any

import aiomqtt
import orjson
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support.tenants import record


class RecordStream:
    def __init__(
        self,
        host: str,
        ws_port: int,
        prefix: str,
        token: str,
        session_id: str,
        count: int,
        *,
        worker: str = "W1",
    ) -> None:
        self.host = host
        self.ws_port = ws_port
        self.prefix = prefix
        self.token = token
        self.session_id = session_id
        self.client_id = f"stream-{secrets.token_hex(4)}"
        self.reply_topic = f"{prefix}/clients/{self.client_id}/replies"
        tag = secrets.token_hex(3)
        self.records = [
            record(worker=worker, event=f"ev-{tag}-{i:05d}", units=1 + i % 3) for i in range(count)
        ]
        self.replies: dict[str, dict[str, Any]] = {}
        self.sent = 0
        self._client: aiomqtt.Client | None = None
        self._reader: asyncio.Task[None] | None = None
        self.reconnects = 0

    @property
    def units(self) -> int:
        return sum(int(r["units"]) for r in self.records)

    @property
    def answered(self) -> int:
        return len(self.replies)

    async def connect(self) -> None:
        for _ in range(100):
            client = aiomqtt.Client(
                self.host,
                self.ws_port,
                identifier=self.client_id,
                protocol=aiomqtt.ProtocolVersion.V5,
                transport="websockets",
                websocket_path="/mqtt",
                timeout=5,
            )
            try:
                await client.__aenter__()
                await client.subscribe(self.reply_topic, qos=1)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.2)
                continue
            self._client = client
            self._reader = asyncio.create_task(self._read(client))
            return
        raise RuntimeError("the broker did not come back")

    async def _read(self, client: aiomqtt.Client) -> None:
        with contextlib.suppress(aiomqtt.MqttError):
            async for msg in client.messages:
                reply = orjson.loads(msg.payload)
                event = reply.get("clientEventId")
                if isinstance(event, str):
                    self.replies[event] = reply

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.__aexit__(None, None, None)
        self._client = None

    async def _reconnect(self) -> None:
        await self.close()
        self.reconnects += 1
        await self.connect()

    async def _publish(self, rec: dict[str, Any]) -> None:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = rec["clientEventId"].encode()
        props.UserProperty = [("authorization", f"Bearer {self.token}")]
        topic = f"{self.prefix}/sessions/{self.session_id}/records"
        for _ in range(3):
            try:
                assert self._client is not None
                await self._client.publish(topic, orjson.dumps(rec), qos=1, properties=props)
                return
            except (aiomqtt.MqttError, AssertionError):
                await self._reconnect()
        raise RuntimeError("could not publish after reconnecting")

    async def send(self, start: int, stop: int, *, pause_every: int = 0) -> None:
        """Publish records[start:stop] (QoS 1), optionally yielding now and then."""
        for i in range(start, min(stop, len(self.records))):
            await self._publish(self.records[i])
            self.sent = max(self.sent, i + 1)
            if pause_every and i % pause_every == 0:
                await asyncio.sleep(0.01)

    async def wait_for_replies(self, n: int, timeout: float = 30) -> None:
        for _ in range(int(timeout / 0.05)):
            if self.answered >= n:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"only {self.answered} of {n} replies within {timeout} s")

    async def settle(self, *, timeout: float = 90, resend_every: float = 3) -> None:
        """Until every record is answered, re-sending (same ids) what was not, now and then."""
        waited = 0.0
        since_resend = 0.0
        while self.answered < len(self.records):
            if waited > timeout:
                raise AssertionError(
                    f"{len(self.records) - self.answered} records never answered "
                    f"({self.reconnects} reconnects)"
                )
            if since_resend >= resend_every:
                since_resend = 0.0
                if self._client is None:
                    await self._reconnect()
                for rec in self.records[: self.sent]:
                    if rec["clientEventId"] not in self.replies:
                        await self._publish(rec)
            await asyncio.sleep(0.1)
            waited += 0.1
            since_resend += 0.1

    def failures(self) -> list[dict[str, Any]]:
        return [r for r in self.replies.values() if r.get("status") != "success"]
