"""The MQTT link: one persistent MQTT 5 session to the broker, on our own small client.

Why not aiomqtt/paho (the first version of this module used them): measured on the project
machine, paho spent about 350 us of CPU per request (three recv() calls per packet, property
objects, one send() per packet), more than everything else the gateway does. This client
decodes packets with ``gateway.core.mqtt5`` straight from asyncio's buffers and writes whatever a
batch produced (replies, then PUBACKs) with one write, in order.

What it promises the pipeline:
- a persistent session: clean start off and a Session Expiry Interval on CONNECT, a stable
  client id, the shared subscriptions, reconnecting forever with backoff;
- manual PUBACK: ``ack(msg)`` only when the pipeline says so, and only on the connection the
  message came on (after a reconnect the broker redelivers what was not acknowledged);
- wire order: packets leave in the order they were queued, so a request's PUBACK never
  overtakes its reply, even when the broker's Receive Maximum holds publishes back;
- flow control: ``pause_reading()`` stops reading the socket (the broker keeps the backlog);
- TCP_NODELAY on the socket, so small replies are not held back by Nagle's algorithm.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal, Protocol

from gateway.config import Settings
from gateway.core import mqtt5
from gateway.core.mqtt5 import (
    Ack,
    Connack,
    Disconnect,
    PacketReader,
    PingResp,
    ProtocolError,
    Publish,
    Will,
)
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.errors import RequestError

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.2
# A broker that is down is tried again at least this often: until we are back and subscribed,
# mosquitto answers the devices' requests "no matching subscribers" (0x10) and drops them (it
# does not restore shared subscriptions of persisted sessions), so the gap must stay short.
BACKOFF_DOWN_MAX_S = 2.0
# A connection dropped as soon as it was made (another process taking our client id back and
# forth, a broker closing on us) backs off further.
BACKOFF_MAX_S = 10.0
STABLE_S = 10.0  # connected this long, a drop starts the backoff over
CONNECT_TIMEOUT_S = 10.0
SUBACK_PATIENCE_S = 120.0
# over a WebSocket, what was queued before a close (DISCONNECT, last PUBACKs) gets this long
WS_DRAIN_S = 1.0
# only topics of a sane length get their encoded header remembered (as ``core.topics`` does
# for parsed topics): 20,000 of at most this many characters, ~5 MB, not ~1.3 GB of 64 KiB ones
CACHEABLE_TOPIC = 256
TOPIC_HEADER_CACHE = 20_000


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
    # (reply body, error) once applied, kept should the rest of its batch be retried
    settled: tuple[dict[str, Any] | None, RequestError | None] | None = field(default=None)
    retained: bool = field(default=False)  # published with the retain flag
    # the rate limit's decision (True: admitted, else the refusal), kept should its batch be
    # retried after a database outage: a retry is not a second request to charge
    admission: RequestError | Literal[True] | None = field(default=None)
    seq: int = field(default=0)  # the pipeline's count of arrivals: order across its shards


class PublishError(Exception):
    """A publish could not be queued (not connected); the caller decides whether to retry."""


class PublishRefused(PublishError):
    """The broker answered a publish with a refusal (MQTT 5 PUBACK reason >= 0x80)."""

    def __init__(self, reason: int) -> None:
        super().__init__(f"broker refused publish: 0x{reason:02x}")
        self.reason = reason

    @property
    def too_large(self) -> bool:
        """0x95 Packet too large: past the broker's message_size_limit, refused however often
        it is sent again."""
        return self.reason == 0x95


class ConnectionFailed(Exception):
    """The broker refused us or the connection broke; the link reconnects."""


class LoginRefused(ConnectionFailed):
    """CONNACK refused who we are: wrong credentials, not authorized, a bad client id."""

    def __init__(self, reason: int) -> None:
        super().__init__(
            f"broker refused the connection (reason 0x{reason:02x} "
            f"{_REFUSALS.get(reason, 'refused')})"
        )
        self.reason = reason


_REFUSALS = {
    0x85: "client identifier not valid",
    0x86: "bad user name or password",
    0x87: "not authorized",
    0x8C: "bad authentication method",
}


class _Wire(Protocol):
    """The byte pipe under the MQTT session: TCP (optionally TLS) or a WebSocket."""

    def write(self, data: bytes) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...


def _nodelay(sock: Any) -> None:
    if isinstance(sock, socket.socket) and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _TcpWire(asyncio.Protocol):
    def __init__(self, link: MqttLink) -> None:
        self._link = link
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        _nodelay(transport.get_extra_info("socket"))

    def data_received(self, data: bytes) -> None:
        self._link._received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._link._wire_lost(exc)

    def write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def pause_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.pause_reading()

    def resume_reading(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class _WsWire:
    """MQTT over WebSocket (``ws://``, ``wss://``) with the websockets library.

    Like a TCP transport: ``close()`` stops reading at once, lets what was queued before it go
    out (the DISCONNECT, the last PUBACKs; at most ``WS_DRAIN_S``), then closes the WebSocket;
    and the link learns, exactly once, that the wire is gone, whether the broker closed it or
    the link did (keepalive, refused SUBACK, malformed data, stop).
    """

    def __init__(self, link: MqttLink, ws: Any) -> None:
        self._link = link
        self._ws = ws
        self._outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._reading = asyncio.Event()
        self._reading.set()
        self._closing = False
        self._lost_reported = False
        self._drained = False  # everything queued before close() was handed to the socket
        self._closed: asyncio.Task[None] | None = None
        transport = getattr(ws, "transport", None)
        if transport is not None:
            _nodelay(transport.get_extra_info("socket"))
        self._reader = asyncio.create_task(self._read(), name="mqtt-ws-read")
        self._writer = asyncio.create_task(self._write(), name="mqtt-ws-write")

    def _report_lost(self, exc: Exception | None) -> None:
        # once: after that this wire is no longer the link's (a later session has its own)
        if not self._lost_reported:
            self._lost_reported = True
            self._link._wire_lost(exc)

    async def _read(self) -> None:
        exc: Exception | None = None
        try:
            while not self._closing:
                await self._reading.wait()
                message = await self._ws.recv()
                if isinstance(message, bytes) and not self._closing:
                    self._link._received(message)
        except Exception as e:  # closed or broken: the session ends
            exc = e
        finally:  # also when close() cancelled us (CancelledError is no Exception)
            self._report_lost(exc)

    async def _write(self) -> None:
        with contextlib.suppress(Exception):
            while (data := await self._outbox.get()) is not None:
                await self._ws.send(data)
            self._drained = True

    async def _close(self) -> None:
        """Let the writer send what was queued before the close (briefly), then close."""
        with contextlib.suppress(Exception):
            _, late = await asyncio.wait([self._writer], timeout=WS_DRAIN_S)
            if late:
                self._writer.cancel()
            await self._ws.close()

    def write(self, data: bytes) -> None:
        if not self._closing:
            self._outbox.put_nowait(data)

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._outbox.put_nowait(None)  # the writer stops after what is already queued
        if self._reader is not asyncio.current_task():
            self._reader.cancel()
        # reported here too: a reader cancelled before it ever ran does not run its finally
        self._report_lost(None)
        self._closed = asyncio.create_task(self._close(), name="mqtt-ws-close")

    async def finish(self) -> bool:
        """After ``close()``: wait (a little longer than the drain) for the WebSocket to
        close; whether everything queued before the close went out."""
        if self._closed is not None:
            await asyncio.wait([self._closed], timeout=WS_DRAIN_S + 1.0)
        return self._drained


class MqttLink:
    """A persistent MQTT 5 session with manual PUBACK, reconnecting forever with backoff."""

    def __init__(
        self,
        settings: Settings,
        *,
        subscriptions: list[str],
        status_topic: str | None,
        online_payload: Callable[[], bytes],
        offline_payload: Callable[[], bytes],
    ) -> None:
        self._settings = settings
        self._subscriptions = subscriptions
        self._status_topic = status_topic
        self._online_payload = online_payload
        self._offline_payload = offline_payload
        self.on_message: Callable[[Inbound], None] = lambda _m: None
        self.on_connected: Callable[[bool], None] | None = None
        self.on_disconnected: Callable[[], None] | None = None
        self.session_present = False
        self._epoch = 0
        self._connected_at = 0.0
        self._wire: _Wire | None = None
        self._reader = PacketReader()
        self._stopping = asyncio.Event()
        self._connected_event = asyncio.Event()
        self._lost: asyncio.Future[Exception | None] | None = None
        self._connack: asyncio.Future[Connack] | None = None
        self._suback: asyncio.Future[Ack] | None = None
        self._unsuback: asyncio.Future[Ack] | None = None
        # retiring: unsubscribe instead of subscribing; and once what was queued is answered,
        # end the broker session with the connection (Session Expiry 0 on DISCONNECT). A stop
        # before then (a signal, a request of another prefix) keeps the session.
        self.retiring = False
        self.end_session_on_stop = False
        self.session_ended = False  # the DISCONNECT that ends the session went out
        # retiring: which topics this configuration subscribes to. A queued request on any
        # other came through another configuration's subscription (the replica's own prefix):
        # it and all after it are left to the broker, unacknowledged, the session is kept,
        # and on_foreign says so.
        self.subscribed: Callable[[str], bool] | None = None
        self.on_foreign: Callable[[str], None] = lambda _topic: None
        self.foreign_topic: str | None = None
        # outgoing: packets in wire order; a QoS 1 publish waits for send quota, and
        # everything queued behind it waits too (so a PUBACK never overtakes its reply)
        self._out: deque[tuple[bytes, int]] = deque()
        self._flush_scheduled = False
        # packet id -> the future of whoever awaits its PUBACK (None: nobody, a reply)
        self._pending: dict[int, asyncio.Future[None] | None] = {}
        self._inflight = 0
        self._send_quota = 65_535
        self.keepalive_s = settings.mqtt_keepalive_s  # as the broker granted it (CONNACK)
        self._next_id = 0
        self._low_water: int | None = None
        self._capacity = asyncio.Event()
        self._last_rx = self._last_tx = time.monotonic()
        self._reading_paused = False  # what the wire is doing
        self._want_pause = False  # what flow control asked for
        self._awaiting_pubacks = False
        self._topic_headers: dict[str, bytes] = {}

    # state --------------------------------------------------------------------------------

    @property
    def client_id(self) -> str:
        return self._settings.mqtt_client_id

    @property
    def connected_for(self) -> float:
        """Seconds the current connection has lasted (0 when not connected)."""
        return time.monotonic() - self._connected_at if self.connected else 0.0

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
        """Wait until at most ``low_water`` publishes await their PUBACK (or the link drops).

        PUBACKs arrive on the same stream as requests: while waiting we must read, even if
        flow control asked us not to (a paused reader would wait for ever).
        """
        self._awaiting_pubacks = True
        self._apply_reading()
        try:
            while len(self._pending) > low_water and self.connected:
                self._low_water = low_water
                self._capacity.clear()
                await self._capacity.wait()
        finally:
            self._low_water = None
            self._awaiting_pubacks = False
            self._apply_reading()

    def pause_reading(self) -> None:
        self._want_pause = True
        self._apply_reading()

    def resume_reading(self) -> None:
        self._want_pause = False
        self._apply_reading()

    def _apply_reading(self) -> None:
        paused = self._want_pause and not self._awaiting_pubacks
        if paused == self._reading_paused:
            return
        self._reading_paused = paused
        if not paused:
            self._last_rx = time.monotonic()
        if self._wire is not None:
            if paused:
                self._wire.pause_reading()
            else:
                self._wire.resume_reading()

    def stop(self) -> None:
        self._stopping.set()

    # run ----------------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, subscribe and stay connected until ``stop()``; reconnect with backoff."""
        delay = BACKOFF_INITIAL_S
        flapping = False
        url = self._settings.mqtt_display
        while not self._stopping.is_set():
            epoch = self._epoch
            try:
                await self._session()
                failure: object = "connection ended"
            except LoginRefused as exc:
                if self._epoch == 0:  # never got in: a setting to fix, not an outage to wait out
                    raise ConfigError(
                        f"{exc} at {url}: check GATEWAY_MQTT_USERNAME, GATEWAY_MQTT_PASSWORD "
                        "(or the user:password in GATEWAY_MQTT_URL) and GATEWAY_MQTT_CLIENT_ID "
                        "against the broker's password file and ACL"
                    ) from None
                failure = exc
            except ssl.SSLCertVerificationError as exc:
                if self._epoch == 0:
                    raise ConfigError(
                        f"the broker at {url} has a certificate this gateway does not trust "
                        f"({exc.verify_message}): set GATEWAY_MQTT_CA_FILE to the CA that signed it"
                    ) from None
                failure = exc
            except (ConnectionFailed, ProtocolError, OSError, TimeoutError, ssl.SSLError) as exc:
                failure = exc or type(exc).__name__
            except Exception as exc:  # websockets' handshake errors and the like
                failure = repr(exc)
            finally:
                self._reset()
            if self._stopping.is_set():
                break
            # A connection that lasted is a fresh drop: retry soon. One dropped at once (another
            # process with our client id takes the session back and forth) keeps backing off.
            if self._epoch != epoch:  # we got in this time
                if time.monotonic() - self._connected_at >= STABLE_S:
                    delay = BACKOFF_INITIAL_S
                flapping = True
            elif delay <= BACKOFF_DOWN_MAX_S:
                flapping = False
            log.warning("mqtt connection to %s failed: %s; retrying in %.1f s", url, failure, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            delay = min(delay * 2, BACKOFF_MAX_S if flapping else BACKOFF_DOWN_MAX_S)

    async def _open_wire(self) -> _Wire:
        s = self._settings
        ep = s.mqtt
        loop = asyncio.get_running_loop()
        tls: ssl.SSLContext | None = None
        if ep.tls:
            tls = ssl.create_default_context(cafile=s.mqtt_ca_file)
            if s.mqtt_tls_insecure:
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
        if ep.websocket:
            from websockets.asyncio.client import connect

            scheme = "wss" if ep.tls else "ws"
            ws = await connect(
                f"{scheme}://{ep.host}:{ep.port}{ep.path}",
                subprotocols=["mqtt"],  # type: ignore[list-item]
                compression=None,
                max_size=None,
                ping_interval=None,
                ssl=tls,
                open_timeout=CONNECT_TIMEOUT_S,
            )
            return _WsWire(self, ws)
        _transport, protocol = await asyncio.wait_for(
            loop.create_connection(lambda: _TcpWire(self), ep.host, ep.port, ssl=tls),
            CONNECT_TIMEOUT_S,
        )
        return protocol

    async def _session(self) -> None:
        s = self._settings
        loop = asyncio.get_running_loop()
        self._reader = PacketReader()
        self._lost = loop.create_future()
        self._connack = loop.create_future()
        self._wire = await self._open_wire()
        self._write(
            mqtt5.encode_connect(
                s.mqtt_client_id,
                keepalive=s.mqtt_keepalive_s,
                clean_start=False,
                session_expiry=s.mqtt_session_expiry_s,
                # no limit asked of the broker (2.0.11 miscounts it): we pause reading instead
                receive_maximum=65_535,
                username=s.broker_username,
                password=s.broker_password,
                will=(
                    Will(self._status_topic, self._offline_payload(), qos=1, retain=True)
                    if self._status_topic is not None
                    else None
                ),
            )
        )
        connack = await self._await(self._connack, "CONNACK")
        if connack.reason in _REFUSALS:
            raise LoginRefused(connack.reason)
        if connack.reason >= 0x80:
            raise ConnectionFailed(f"broker refused the connection (reason 0x{connack.reason:02x})")
        self.session_present = connack.session_present
        self._send_quota = connack.properties.get_int(mqtt5.P_RECEIVE_MAXIMUM, 65_535)
        # MQTT 5 §3.2.2.3.14: a broker that caps keepalive (mosquitto's max_keepalive) says so
        # here, and the client must use its value: pinging at our own, longer interval got us
        # dropped for silence every 1.5 x its cap.
        self.keepalive_s = (
            connack.properties.get_int(mqtt5.P_SERVER_KEEPALIVE, 0) or s.mqtt_keepalive_s
        )
        self._connected_at = time.monotonic()  # (the epoch moved on when the CONNACK was read)
        log.info(
            "mqtt connected to %s as %s (session present: %s)",
            s.mqtt_display,
            s.mqtt_client_id,
            self.session_present,
        )
        # Subscribe without waiting: with a session present the broker may send a backlog of
        # queued requests first, and the SUBACK arrives behind them (we may even have paused
        # reading). The SUBACK is checked when it comes.
        self._suback = loop.create_future()
        if self.retiring:
            # retiring: no new requests; those already queued for this session still arrive
            self._unsuback = loop.create_future()
            self._write(mqtt5.encode_unsubscribe(self._packet_id(), self._subscriptions))
        else:
            self._write(mqtt5.encode_subscribe(self._packet_id(), self._subscriptions))
        if self._status_topic is not None:
            status = self.publish(self._status_topic, self._online_payload(), retain=True)
            status.add_done_callback(self._check_status_publish)
        self._connected_event.set()
        if self.on_connected:
            self.on_connected(self.session_present)
        keepalive = asyncio.create_task(self._keepalive(), name="mqtt-keepalive")
        suback = asyncio.create_task(
            asyncio.sleep(0) if self.retiring else self._check_suback(self._suback),
            name="mqtt-suback",
        )
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            waits: list[asyncio.Future[Any]] = [stop, self._lost]
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            keepalive.cancel()
            suback.cancel()
        if self._lost.done():
            raise ConnectionFailed(f"connection lost: {self._lost.result() or 'closed'}")
        await self._say_goodbye()

    async def wait_unsubscribed(self) -> None:
        """Retiring: until the broker has confirmed (UNSUBACK) that no new request comes here."""
        while True:
            await self.wait_connected()
            fut = self._unsuback
            if fut is not None:
                await asyncio.wait([fut], timeout=1.0)  # a new connection makes a new one
                if not fut.done():
                    continue
                unsuback = fut.result()
                refused = [r for r in unsuback.reasons if r >= 0x80]
                if refused:
                    raise ConnectionFailed(
                        f"broker refused to unsubscribe (reason 0x{refused[0]:02x})"
                    )
                return
            await asyncio.sleep(0.05)

    async def _check_suback(self, fut: asyncio.Future[Ack]) -> None:
        try:
            suback = await asyncio.wait_for(asyncio.shield(fut), SUBACK_PATIENCE_S)
        except TimeoutError:
            log.warning("no SUBACK after %.0f s; carrying on", SUBACK_PATIENCE_S)
            return
        refused = [r for r in suback.reasons if r >= 0x80]
        if refused:
            log.error(
                "broker refused %d subscription(s) (reason 0x%02x): check the ACL and that "
                "shared subscriptions are allowed; reconnecting",
                len(refused),
                refused[0],
            )
            if self._wire is not None:
                self._wire.close()

    async def _await(self, fut: asyncio.Future[Any], what: str) -> Any:
        assert self._lost is not None
        done, _ = await asyncio.wait(
            [fut, self._lost], timeout=CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
        )
        if fut in done:
            return fut.result()
        if self._lost.done():
            raise ConnectionFailed(f"connection closed before {what}: {self._lost.result()}")
        raise TimeoutError(f"no {what} from the broker within {CONNECT_TIMEOUT_S:.0f} s")

    async def _say_goodbye(self) -> None:
        """Publish ``offline`` (retained), wait briefly for pending PUBACKs, DISCONNECT."""
        with contextlib.suppress(PublishError):
            waits: list[asyncio.Future[Any]] = [f for f in self._pending.values() if f is not None]
            if self._status_topic is not None:
                waits.append(self.publish(self._status_topic, self._offline_payload(), retain=True))
            if waits:
                await asyncio.wait(waits, timeout=2.0)
        wire = self._wire
        ending = self.end_session_on_stop and self.foreign_topic is None  # (never both)
        if ending:
            self._write(mqtt5.encode_disconnect(session_expiry=0))
        else:
            self._write(mqtt5.encode_disconnect())
        # still queued: held behind publishes waiting for the broker's Receive Maximum
        sent = wire is not None and not self._out
        if wire is not None:
            wire.close()
            if isinstance(wire, _WsWire):  # its writer sends the DISCONNECT after this
                sent = await wire.finish()
        if ending:
            self.session_ended = sent
            if sent:
                log.info("mqtt session %s ended", self._settings.mqtt_client_id)
            else:
                log.warning(
                    "the DISCONNECT ending mqtt session %s did not go out",
                    self._settings.mqtt_client_id,
                )
        log.info("mqtt disconnected from %s", self._settings.mqtt_display)

    async def _keepalive(self) -> None:
        interval = self.keepalive_s
        while True:
            await asyncio.sleep(interval / 2)
            now = time.monotonic()
            if not self._reading_paused and now - self._last_rx > interval * 1.5:
                log.warning("broker silent for %.0f s; reconnecting", now - self._last_rx)
                if self._wire is not None:
                    self._wire.close()
                return
            if now - self._last_tx >= interval / 2:
                self._write(mqtt5.PINGREQ_PACKET)

    def _reset(self) -> None:
        was_connected = self._connected_event.is_set()
        self._connected_event.clear()
        if self._wire is not None:
            self._wire.close()
        self._wire = None
        self._reading_paused = self._want_pause = False
        self._out.clear()
        self._inflight = 0
        for fut in self._pending.values():
            if fut is not None and not fut.done():
                fut.set_exception(PublishError("connection lost before PUBACK"))
                fut.exception()  # retrieved: callers may have stopped caring
        self._pending.clear()
        self._capacity.set()
        if was_connected and not self._stopping.is_set():
            log.warning("mqtt connection to %s lost", self._settings.mqtt_display)
        if was_connected and self.on_disconnected:
            self.on_disconnected()

    # bytes in -----------------------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        self._last_rx = time.monotonic()
        try:
            packets = self._reader.feed(data)
        except ProtocolError as exc:
            log.error("malformed MQTT from the broker (%s); reconnecting", exc)
            if self._wire is not None:
                self._wire.close()
            return
        now = datetime.now(UTC)  # one arrival time per read: they arrived together
        for pkt in packets:
            if isinstance(pkt, Publish):
                self._publish_received(pkt, now)
            elif isinstance(pkt, Ack):
                if pkt.kind == mqtt5.PUBACK:
                    self._puback(pkt)
                elif pkt.kind == mqtt5.UNSUBACK:
                    if self._unsuback is not None and not self._unsuback.done():
                        self._unsuback.set_result(pkt)
                elif self._suback is not None and not self._suback.done():
                    self._suback.set_result(pkt)
            elif isinstance(pkt, Connack):
                if self._connack is not None and not self._connack.done():
                    if pkt.reason < 0x80:
                        # A new connection from here on, before the next packet of this read:
                        # mosquitto sends a resumed session's unacknowledged requests in the
                        # same write as the CONNACK. Stamped with the old epoch, their PUBACKs
                        # were dropped, and every reconnect applied them again.
                        self._epoch += 1
                    self._connack.set_result(pkt)
            elif isinstance(pkt, Disconnect):
                log.warning(
                    "broker disconnected us: reason 0x%02x %s", pkt.reason, pkt.reason_string or ""
                )
            elif isinstance(pkt, PingResp):
                pass

    def _publish_received(self, pkt: Publish, now: datetime) -> None:
        if self.foreign_topic is not None:
            return  # halted: the broker keeps it (unacknowledged) for a retire set up right
        if self.subscribed is not None and not self.subscribed(pkt.topic):
            self.foreign_topic = pkt.topic
            log.error(
                "a request queued for %s came on %s, which none of this configuration's "
                "subscriptions match: not answering it or anything after it",
                self._settings.mqtt_client_id,
                pkt.topic,
            )
            self.on_foreign(pkt.topic)
            return
        self.on_message(
            Inbound(
                pkt.topic,
                pkt.payload,
                pkt.qos,
                pkt.packet_id,
                pkt.response_topic,
                pkt.correlation,
                pkt.authorization,
                now,
                self._epoch,
                retained=pkt.retain,
            )
        )

    def _check_status_publish(self, fut: asyncio.Future[None]) -> None:
        """The first publish of a connection: refused, it points at an ACL or prefix mistake."""
        if not fut.cancelled() and isinstance(exc := fut.exception(), PublishRefused):
            log.warning(
                "%s on %s: does the broker's ACL give this user (GATEWAY_MQTT_USERNAME) the "
                "topic prefix GATEWAY_TOPIC_PREFIX? Requests under it would not reach us either",
                exc,
                self._status_topic,
            )

    def _puback(self, pkt: Ack) -> None:
        if pkt.packet_id not in self._pending:
            return
        fut = self._pending.pop(pkt.packet_id)
        self._inflight -= 1
        if fut is not None and not fut.done():
            if pkt.reasons and pkt.reasons[0] >= 0x80:
                fut.set_exception(PublishRefused(pkt.reasons[0]))
                fut.exception()
            else:
                fut.set_result(None)
        if self._low_water is not None and len(self._pending) <= self._low_water:
            self._capacity.set()
        if self._out:
            self._schedule_flush()

    def _wire_lost(self, exc: Exception | None) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(exc)

    # bytes out ----------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Straight to the wire (session setup), behind anything already queued."""
        self._out.append((data, 0))
        self._flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        wire = self._wire
        if wire is None:
            return
        out = self._out
        chunks: list[bytes] = []
        while out:
            data, quota = out[0]
            if quota and self._inflight >= self._send_quota:
                break  # the broker's Receive Maximum: wait for a PUBACK
            out.popleft()
            self._inflight += quota
            chunks.append(data)
        if chunks:
            wire.write(b"".join(chunks))
            self._last_tx = time.monotonic()

    def _packet_id(self) -> int:
        for _ in range(65_535):
            self._next_id = self._next_id % 65_535 + 1
            if self._next_id not in self._pending:
                return self._next_id
        raise PublishError("65535 publishes await their PUBACK; slow down")

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        correlation: bytes | None = None,
        expiry_s: int | None = None,
        json: bool = True,
    ) -> asyncio.Future[None]:
        """Queue a publish now; the future resolves at PUBACK (at once for QoS 0)."""
        if self._wire is None or self._lost is None or self._lost.done():
            raise PublishError("not connected to the broker")
        # encoded before a packet id is taken: a topic or correlation data too long to encode
        # (ProtocolError, the caller's to handle) leaves no id behind
        header = self._topic_header(topic)
        packet_id = self._packet_id() if qos else 0
        packet = mqtt5.encode_publish(
            header,
            payload,
            packet_id=packet_id,
            qos=qos,
            retain=retain,
            correlation=correlation,
            expiry_s=expiry_s,
            json=json,
        )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if qos:
            self._pending[packet_id] = fut
        else:
            fut.set_result(None)
        self._out.append((packet, 1 if qos else 0))
        self._schedule_flush()
        return fut

    def reply(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        """A QoS 1 reply nobody awaits: like ``publish`` without a future (the hot path)."""
        if self._wire is None or self._lost is None or self._lost.done():
            raise PublishError("not connected to the broker")
        # the packet first, then its id: should encoding raise (a topic or correlation data
        # over 65,535 bytes: ProtocolError, the caller's to handle) no id stays taken
        header = self._topic_header(topic)
        packet_id = self._packet_id()
        packet = mqtt5.encode_publish(header, payload, packet_id=packet_id, correlation=correlation)
        self._pending[packet_id] = None
        self._out.append((packet, 1))
        if not self._flush_scheduled:
            self._schedule_flush()

    def _topic_header(self, topic: str) -> bytes:
        header = self._topic_headers.get(topic)
        if header is None:
            header = mqtt5.topic_header(topic)
            if len(topic) <= CACHEABLE_TOPIC:  # a long one is encoded each time
                if len(self._topic_headers) >= TOPIC_HEADER_CACHE:
                    self._topic_headers.clear()
                self._topic_headers[topic] = header
        return header

    def ack(self, msg: Inbound) -> None:
        """PUBACK ``msg`` if it came on the current connection (else the broker redelivers it)."""
        if msg.qos == 0 or self._wire is None or msg.epoch != self._epoch:
            return
        self._out.append((mqtt5.encode_puback(msg.mid), 0))
        self._schedule_flush()
