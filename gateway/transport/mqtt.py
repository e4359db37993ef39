"""The MQTT link: one persistent MQTT 5 session to the broker, on aiomqtt (over paho).

What aiomqtt gives us: connecting (in an executor), the paho socket driven by the event loop,
SUBACK futures. What it does not (aiomqtt issue 345): manual acknowledgement. So, hidden in this
one adapter, we switch paho to ``manual_ack_set(True)`` and PUBACK with ``ack(mid, qos)`` only
when the pipeline says the request's effect is committed or its error reply is queued; and we
take messages from paho's ``on_message`` directly and publish with paho's non-blocking
``publish`` (aiomqtt's awaits each PUBACK and scans all pending publishes).

Every connection attempt uses a fresh aiomqtt client. A message's PUBACK is only sent on the
connection it arrived on; after a reconnect the broker redelivers what was not acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from gateway.config import Settings

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.2
BACKOFF_MAX_S = 10.0


@dataclass(slots=True, eq=False)
class Inbound:
    """A request as it arrived, plus what the pipeline needs to answer and acknowledge it."""

    topic: str
    payload: bytes
    qos: int
    mid: int
    response_topic: str | None
    correlation: bytes | None
    authorization: str | None
    received_at: datetime
    epoch: int
    done: bool = field(default=False)


class PublishError(Exception):
    """A publish could not be queued (not connected); the caller decides whether to retry."""


class MqttLink:
    """A persistent MQTT 5 session with manual PUBACK, reconnecting forever with backoff."""

    def __init__(
        self,
        settings: Settings,
        *,
        subscriptions: list[str],
        status_topic: str,
        online_payload: Callable[[], bytes],
        offline_payload: bytes,
    ) -> None:
        self._settings = settings
        self._subscriptions = subscriptions
        self.on_message: Callable[[Inbound], None] = lambda _m: None
        self.on_connected: Callable[[bool], None] | None = None
        self.on_disconnected: Callable[[], None] | None = None
        self._status_topic = status_topic
        self._online_payload = online_payload
        self._offline_payload = offline_payload
        self._client: aiomqtt.Client | None = None
        self._paho: paho.Client | None = None
        self._epoch = 0
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._low_water: int | None = None
        self._capacity = asyncio.Event()
        self._stopping = asyncio.Event()
        self._connected_event = asyncio.Event()
        self.session_present = False

    # state --------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected_event.is_set()

    @property
    def epoch(self) -> int:
        return self._epoch

    async def wait_connected(self) -> None:
        await self._connected_event.wait()

    @property
    def unconfirmed_publishes(self) -> int:
        return len(self._pending)

    async def confirmations_below(self, low_water: int) -> None:
        """Wait until at most ``low_water`` publishes await their PUBACK (or the link drops)."""
        while len(self._pending) > low_water and self.connected:
            self._low_water = low_water
            self._capacity.clear()
            await self._capacity.wait()
        self._low_water = None

    # run ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, subscribe and stay connected until ``stop()``; reconnect with backoff."""
        delay = BACKOFF_INITIAL_S
        while not self._stopping.is_set():
            try:
                await self._session()
                delay = BACKOFF_INITIAL_S
            except (aiomqtt.MqttError, OSError, ssl.SSLError) as exc:
                log.warning(
                    "mqtt connection to %s failed: %s; retrying in %.1f s",
                    self._settings.mqtt_url,
                    exc,
                    delay,
                )
            finally:
                self._lost()
            if self._stopping.is_set():
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, BACKOFF_MAX_S)

    async def _session(self) -> None:
        client = self._make_client()
        async with client:
            self._client = client
            self._paho = client._client
            self._set_nodelay()
            self._epoch += 1
            log.info(
                "mqtt connected to %s as %s (session present: %s)",
                self._settings.mqtt_url,
                self._settings.mqtt_client_id,
                self.session_present,
            )
            options = SubscribeOptions(qos=1)
            await client.subscribe([(f, options) for f in self._subscriptions])
            self.publish(self._status_topic, self._online_payload(), retain=True)
            self._connected_event.set()
            if self.on_connected:
                self.on_connected(self.session_present)
            stop = asyncio.ensure_future(self._stopping.wait())
            try:
                waits: list[asyncio.Future[Any]] = [stop, client._disconnected]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop.cancel()
            if self._stopping.is_set() and not client._disconnected.done():
                await self._say_goodbye()
            elif client._disconnected.done() and client._disconnected.exception():
                raise aiomqtt.MqttError(f"connection lost: {client._disconnected.exception()}")

    async def _say_goodbye(self) -> None:
        """Publish ``offline`` (retained) and wait, briefly, for it and pending PUBACKs."""
        with contextlib.suppress(PublishError):
            fut = self.publish(self._status_topic, self._offline_payload, retain=True)
            pending = [fut, *self._pending.values()]
            await asyncio.wait(pending, timeout=2.0)

    def _lost(self) -> None:
        was_connected = self._connected_event.is_set()
        self._connected_event.clear()
        self._client = None
        self._paho = None
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(PublishError("connection lost before PUBACK"))
                fut.exception()  # mark retrieved: callers may have stopped caring
        self._pending.clear()
        self._capacity.set()
        if was_connected:
            if self._stopping.is_set():
                log.info("mqtt disconnected from %s", self._settings.mqtt_url)
            else:
                log.warning("mqtt connection to %s lost", self._settings.mqtt_url)
            if self.on_disconnected:
                self.on_disconnected()

    def stop(self) -> None:
        self._stopping.set()

    # client construction ------------------------------------------------------------------

    def _make_client(self) -> aiomqtt.Client:
        s = self._settings
        ep = s.mqtt
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = s.mqtt_session_expiry_s
        props.ReceiveMaximum = min(s.max_inflight, 65_535)
        tls_context = None
        if ep.tls:
            tls_context = ssl.create_default_context(cafile=s.mqtt_ca_file)
            if s.mqtt_tls_insecure:
                tls_context.check_hostname = False
                tls_context.verify_mode = ssl.CERT_NONE
        client = aiomqtt.Client(
            ep.host,
            ep.port,
            identifier=s.mqtt_client_id,
            username=s.mqtt_username,
            password=s.mqtt_password,
            protocol=aiomqtt.ProtocolVersion.V5,
            transport="websockets" if ep.websocket else "tcp",
            websocket_path=ep.path if ep.websocket else None,
            clean_start=False,
            properties=props,
            keepalive=s.mqtt_keepalive_s,
            tls_context=tls_context,
            will=aiomqtt.Will(self._status_topic, self._offline_payload, qos=1, retain=True),
            timeout=10,
        )
        raw: paho.Client = client._client
        raw.manual_ack_set(True)
        raw.max_inflight_messages_set(0)  # we bound our own publishes; paho's 20 would reorder
        raw.max_queued_messages_set(0)
        aiomqtt_on_connect: Any = raw.on_connect

        def on_connect(
            c: paho.Client, userdata: Any, flags: Any, rc: Any, props: Any = None
        ) -> None:
            self.session_present = bool(getattr(flags, "session_present", False))
            if aiomqtt_on_connect is not None:
                aiomqtt_on_connect(c, userdata, flags, rc, props)

        raw.on_connect = on_connect
        raw.on_message = self._paho_message
        raw.on_publish = self._paho_published
        return client

    def _set_nodelay(self) -> None:
        """paho leaves Nagle on; small replies would wait tens of milliseconds."""
        sock: Any = self._paho.socket() if self._paho else None
        sock = getattr(sock, "_socket", sock)  # paho wraps websocket connections
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # paho callbacks (run in the event loop thread, inside paho's read handler) -------------

    def _paho_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        try:
            props = msg.properties
            response_topic = correlation = authorization = None
            if props is not None:
                response_topic = getattr(props, "ResponseTopic", None)
                correlation = getattr(props, "CorrelationData", None)
                for key, value in getattr(props, "UserProperty", ()) or ():
                    if key.lower() == "authorization":
                        authorization = value
            inbound = Inbound(
                topic=msg.topic,
                payload=bytes(msg.payload),
                qos=msg.qos,
                mid=msg.mid,
                response_topic=response_topic,
                correlation=correlation,
                authorization=authorization,
                received_at=datetime.now(UTC),
                epoch=self._epoch,
            )
        except Exception:  # a message paho could not hand us whole: acknowledge, drop, log
            log.exception("undecodable MQTT message (mid %s) dropped", getattr(msg, "mid", "?"))
            if msg.qos and self._paho is not None:
                self._paho.ack(msg.mid, msg.qos)
            return
        self.on_message(inbound)

    def _paho_published(self, _c: paho.Client, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        fut = self._pending.pop(mid, None)
        if self._low_water is not None and len(self._pending) <= self._low_water:
            self._capacity.set()
        if fut is not None and not fut.done():
            if getattr(rc, "is_failure", False):
                fut.set_exception(PublishError(f"broker refused publish: {rc}"))
            else:
                fut.set_result(None)

    # publish and acknowledge --------------------------------------------------------------

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
        expiry_s: int | None = None,
    ) -> asyncio.Future[None]:
        """Queue a publish now; the future resolves at PUBACK (at once for QoS 0)."""
        raw = self._paho
        if raw is None:
            raise PublishError("not connected to the broker")
        props = None
        if correlation is not None or expiry_s is not None:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if correlation is not None:
                props.CorrelationData = correlation
            if expiry_s is not None:
                props.MessageExpiryInterval = expiry_s
        info = raw.publish(topic, payload, qos=qos, retain=retain, properties=props)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if info.rc != paho.MQTT_ERR_SUCCESS:
            raise PublishError(f"publish to {topic} failed: {paho.error_string(info.rc)}")
        if qos == 0 or info.is_published():
            fut.set_result(None)
        else:
            self._pending[info.mid] = fut
        return fut

    def ack(self, msg: Inbound) -> None:
        """PUBACK ``msg`` if it came on the current connection (else the broker redelivers it)."""
        raw = self._paho
        if msg.qos == 0 or raw is None or msg.epoch != self._epoch:
            return
        raw.ack(msg.mid, msg.qos)
