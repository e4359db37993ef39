"""MQTT 5 packets, sans-I/O: bytes in, packets out; packets in, bytes out.

Just what the gateway's client needs (CONNECT/CONNACK, PUBLISH/PUBACK, SUBSCRIBE/SUBACK,
PINGREQ/PINGRESP, DISCONNECT), written for the hot path: an inbound PUBLISH is decoded with a
handful of slices, and a reply is encoded with one join. Pure: no sockets, no asyncio; anything
malformed raises ``ProtocolError``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from gateway.core.auth import AMBIGUOUS_AUTHORIZATION

CONNECT, CONNACK, PUBLISH, PUBACK = 0x10, 0x20, 0x30, 0x40
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 0x82, 0x90, 0xC0, 0xD0, 0xE0
UNSUBSCRIBE, UNSUBACK = 0xA2, 0xB0

# property identifiers (MQTT 5 §2.2.2.2)
P_PAYLOAD_FORMAT = 0x01
P_MESSAGE_EXPIRY = 0x02
P_CONTENT_TYPE = 0x03
P_RESPONSE_TOPIC = 0x08
P_CORRELATION = 0x09
P_SUBSCRIPTION_ID = 0x0B
P_SESSION_EXPIRY = 0x11
P_SERVER_KEEPALIVE = 0x13
P_REASON_STRING = 0x1F
P_RECEIVE_MAXIMUM = 0x21
P_TOPIC_ALIAS_MAXIMUM = 0x22
P_TOPIC_ALIAS = 0x23
P_USER_PROPERTY = 0x26
P_MAXIMUM_PACKET_SIZE = 0x27

_U8 = frozenset({0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A})
_U16 = frozenset({0x13, 0x21, 0x22, 0x23})
_U32 = frozenset({0x02, 0x11, 0x18, 0x27})
_STR = frozenset({0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F})
_BIN = frozenset({0x09, 0x16})
MAX_REMAINING = 268_435_455
_INLINE = frozenset({P_RESPONSE_TOPIC, P_CORRELATION, P_USER_PROPERTY})

_pack_h = struct.Struct("!H").pack
_unpack_h = struct.Struct("!H").unpack_from
_pack_i = struct.Struct("!I").pack
_unpack_i = struct.Struct("!I").unpack_from

PUBACK_HEAD = b"\x40\x02"
PINGREQ_PACKET = b"\xc0\x00"


class ProtocolError(Exception):
    """The peer sent something that is not MQTT 5 as we speak it."""


def varint(n: int) -> bytes:
    if n < 128:
        return bytes((n,))
    if not 0 <= n <= MAX_REMAINING:
        raise ProtocolError(f"variable byte integer out of range: {n}")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    """(value, next position), or None if ``buf`` ends first."""
    value = 0
    shift = 0
    for i in range(4):
        if pos + i >= len(buf):
            return None
        byte = buf[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise ProtocolError("variable byte integer longer than 4 bytes")


def utf8(text: str) -> bytes:
    data = text.encode()
    if len(data) > 65_535:
        raise ProtocolError("string longer than 65535 bytes")
    return _pack_h(len(data)) + data


def binary(data: bytes) -> bytes:
    if len(data) > 65_535:
        raise ProtocolError("binary data longer than 65535 bytes")
    return _pack_h(len(data)) + data


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + varint(len(body)) + body


# --- properties ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Properties:
    """Decoded properties: scalar ones by id, user properties in order."""

    values: dict[int, int | str | bytes] = field(default_factory=dict)
    user: list[tuple[str, str]] = field(default_factory=list)

    def get_int(self, pid: int, default: int) -> int:
        value = self.values.get(pid, default)
        return value if isinstance(value, int) else default

    def get_str(self, pid: int) -> str | None:
        value = self.values.get(pid)
        return value if isinstance(value, str) else None


def _string(buf: bytes, pos: int, end: int) -> tuple[str, int]:
    if pos + 2 > end:
        raise ProtocolError("truncated string")
    n = _unpack_h(buf, pos)[0]
    stop = pos + 2 + n
    if stop > end:
        raise ProtocolError("truncated string")
    try:
        return buf[pos + 2 : stop].decode(), stop
    except UnicodeDecodeError:
        raise ProtocolError("string is not UTF-8") from None


def decode_properties(buf: bytes, pos: int, end: int) -> tuple[Properties, int]:
    """Properties at ``pos`` (length prefix included) within ``buf[:end]``."""
    vi = read_varint(buf, pos)
    if vi is None:
        raise ProtocolError("truncated properties length")
    length, pos = vi
    stop = pos + length
    if stop > end:
        raise ProtocolError("properties run past the packet")
    props = Properties()
    while pos < stop:
        pid = buf[pos]
        pos += 1
        if pid in _U8:
            if pos + 1 > stop:
                raise ProtocolError("truncated property")
            props.values[pid] = buf[pos]
            pos += 1
        elif pid in _U16:
            if pos + 2 > stop:
                raise ProtocolError("truncated property")
            props.values[pid] = _unpack_h(buf, pos)[0]
            pos += 2
        elif pid in _U32:
            if pos + 4 > stop:
                raise ProtocolError("truncated property")
            props.values[pid] = _unpack_i(buf, pos)[0]
            pos += 4
        elif pid in _STR:
            props.values[pid], pos = _string(buf, pos, stop)
        elif pid in _BIN:
            if pos + 2 > stop:
                raise ProtocolError("truncated property")
            n = _unpack_h(buf, pos)[0]
            if pos + 2 + n > stop:
                raise ProtocolError("truncated property")
            props.values[pid] = bytes(buf[pos + 2 : pos + 2 + n])
            pos += 2 + n
        elif pid == P_SUBSCRIPTION_ID:
            vi = read_varint(buf, pos)
            if vi is None or vi[1] > stop:
                raise ProtocolError("truncated property")
            props.values[pid], pos = vi
        elif pid == P_USER_PROPERTY:
            key, pos = _string(buf, pos, stop)
            value, pos = _string(buf, pos, stop)
            props.user.append((key, value))
        else:
            raise ProtocolError(f"unknown property 0x{pid:02x}")
    return props, stop


def encode_properties(values: dict[int, int | str | bytes], user: list[tuple[str, str]]) -> bytes:
    out = bytearray()
    for pid, value in values.items():
        out.append(pid)
        if pid in _U8 and isinstance(value, int):
            out.append(value)
        elif pid in _U16 and isinstance(value, int):
            out += _pack_h(value)
        elif pid in _U32 and isinstance(value, int):
            out += _pack_i(value)
        elif pid in _STR and isinstance(value, str):
            out += utf8(value)
        elif pid in _BIN and isinstance(value, bytes):
            out += binary(value)
        elif pid == P_SUBSCRIPTION_ID and isinstance(value, int):
            out += varint(value)
        else:
            raise ProtocolError(f"cannot encode property 0x{pid:02x}={value!r}")
    for key, value in user:
        out.append(P_USER_PROPERTY)
        out += utf8(key) + utf8(value)
    return varint(len(out)) + bytes(out)


# --- packets we send ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True
    json: bool = True  # Payload Format Indicator and Content Type, as every other publish of ours


def encode_connect(
    client_id: str,
    *,
    keepalive: int,
    clean_start: bool,
    session_expiry: int,
    receive_maximum: int,
    username: str | None = None,
    password: str | None = None,
    will: Will | None = None,
) -> bytes:
    flags = 0x02 if clean_start else 0
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if password is not None:
        flags |= 0x40
    if username is not None:
        flags |= 0x80
    props = encode_properties(
        {P_SESSION_EXPIRY: session_expiry, P_RECEIVE_MAXIMUM: receive_maximum}, []
    )
    body = utf8("MQTT") + bytes((5, flags)) + _pack_h(keepalive) + props + utf8(client_id)
    if will is not None:
        body += (_JSON_ONLY if will.json else varint(0)) + utf8(will.topic) + binary(will.payload)
    if username is not None:
        body += utf8(username)
    if password is not None:
        body += binary(password.encode())
    return _packet(CONNECT, body)


RETAIN_HANDLING_NONE = 0x20  # subscription option: send no retained messages on subscribe
RETAIN_AS_PUBLISHED = 0x08  # subscription option: keep the publisher's retain flag


def encode_subscribe(packet_id: int, filters: list[str], qos: int = 1) -> bytes:
    """SUBSCRIBE at ``qos``, with Retain Handling 2 (a request a device published retained is
    not handed to us again each time we subscribe) and Retain As Published (so that we see
    that it was, and clear the broker's copy, which holds the device's token)."""
    body = _pack_h(packet_id) + varint(0)
    options = bytes((qos | RETAIN_HANDLING_NONE | RETAIN_AS_PUBLISHED,))
    for f in filters:
        body += utf8(f) + options
    return _packet(SUBSCRIBE, body)


def encode_unsubscribe(packet_id: int, filters: list[str]) -> bytes:
    body = _pack_h(packet_id) + varint(0)
    for f in filters:
        body += utf8(f)
    return _packet(UNSUBSCRIBE, body)


def topic_header(topic: str) -> bytes:
    """The length-prefixed topic of a PUBLISH (callers cache it per topic)."""
    return utf8(topic)


# Payload Format Indicator 1 (UTF-8) and Content Type application/json: what the gateway
# publishes (replies, events, state, status) says what it is, for MQTT 5 clients that look
JSON_PROPERTIES = b"\x01\x01" + b"\x03" + utf8("application/json")
_JSON_ONLY = varint(len(JSON_PROPERTIES)) + JSON_PROPERTIES


def encode_publish(
    topic: bytes,
    payload: bytes,
    *,
    packet_id: int = 0,
    qos: int = 1,
    retain: bool = False,
    correlation: bytes | None = None,
    expiry_s: int | None = None,
    json: bool = True,
) -> bytes:
    """A PUBLISH; ``topic`` is the ``topic_header`` (callers cache it); ``json``: the payload
    is JSON text (marked so), else bytes without properties."""
    if correlation is None and expiry_s is None:
        props = _JSON_ONLY if json else b"\x00"
    else:
        p = JSON_PROPERTIES if json else b""
        if expiry_s is not None:
            p += b"\x02" + _pack_i(expiry_s)
        if correlation is not None:
            p += b"\x09" + binary(correlation)
        props = varint(len(p)) + p
    head = topic + _pack_h(packet_id) if qos else topic
    body_len = len(head) + len(props) + len(payload)
    first = PUBLISH | (qos << 1) | (1 if retain else 0)
    return b"".join((bytes((first,)), varint(body_len), head, props, payload))


def encode_puback(packet_id: int) -> bytes:
    return PUBACK_HEAD + _pack_h(packet_id)


def encode_disconnect(reason: int = 0, *, session_expiry: int | None = None) -> bytes:
    """DISCONNECT; ``session_expiry=0`` ends the session (and its subscriptions) at once."""
    if session_expiry is not None:
        props = bytes((P_SESSION_EXPIRY,)) + _pack_i(session_expiry)
        return _packet(DISCONNECT, bytes((reason,)) + varint(len(props)) + props)
    return b"\xe0\x00" if reason == 0 else _packet(DISCONNECT, bytes((reason,)) + b"\x00")


# --- packets we receive -------------------------------------------------------------------------


@dataclass(slots=True)
class Connack:
    session_present: bool
    reason: int
    properties: Properties


class Publish(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    packet_id: int
    retain: bool
    dup: bool
    response_topic: str | None
    correlation: bytes | None
    authorization: str | None


@dataclass(slots=True)
class Ack:
    """PUBACK, SUBACK or UNSUBACK: the packet id and the reason code(s)."""

    kind: int
    packet_id: int
    reasons: bytes


@dataclass(slots=True)
class Disconnect:
    reason: int
    reason_string: str | None


class PingResp:
    __slots__ = ()


Packet = Connack | Publish | Ack | Disconnect | PingResp
PINGRESP_SINGLETON = PingResp()


# A device repeats its topic, reply topic and token in every request: one str object each,
# shared, instead of a copy per request held (a backlog read while waiting for PUBACKs kept
# ~1 KB of repeated text per request), and a token's hash is computed once. Bounded: only
# short texts, and the table starts afresh when full.
_SHARED: dict[bytes, str] = {}
_SHARED_MAX = 2_048
_SHARED_TEXT_MAX = 2_048


def _shared_text(raw: bytes) -> str:
    """``raw`` decoded (UTF-8), the same object for the same bytes while remembered."""
    text = _SHARED.get(raw)
    if text is None:
        text = raw.decode()
        if len(raw) <= _SHARED_TEXT_MAX:
            if len(_SHARED) >= _SHARED_MAX:
                _SHARED.clear()
            _SHARED[raw] = text
    return text


def decode_publish(first: int, buf: bytes, pos: int, end: int) -> Publish:
    """A PUBLISH body at ``buf[pos:end]``: the hot path, so the common properties (Response
    Topic, Correlation Data, one user property) are read inline, the rest generically."""
    qos = (first >> 1) & 0x03
    if qos == 3:
        raise ProtocolError("PUBLISH with QoS 3")
    if pos + 2 > end:
        raise ProtocolError("truncated PUBLISH")
    stop = pos + 2 + ((buf[pos] << 8) | buf[pos + 1])
    if stop > end:
        raise ProtocolError("truncated PUBLISH topic")
    try:
        topic = _shared_text(buf[pos + 2 : stop])
    except UnicodeDecodeError:
        raise ProtocolError("topic is not UTF-8") from None
    pos = stop
    packet_id = 0
    if qos:
        if pos + 2 > end:
            raise ProtocolError("truncated PUBLISH")
        packet_id = (buf[pos] << 8) | buf[pos + 1]
        pos += 2
    if pos >= end:
        raise ProtocolError("PUBLISH without properties")
    plen = buf[pos]
    if plen < 0x80:
        pos += 1
    elif pos + 1 < end and buf[pos + 1] < 0x80:
        plen = (plen & 0x7F) | (buf[pos + 1] << 7)
        pos += 2
    else:
        vi = read_varint(buf, pos)
        if vi is None:
            raise ProtocolError("truncated properties length")
        plen, pos = vi
    pend = pos + plen
    if pend > end:
        raise ProtocolError("properties run past the packet")
    response_topic, correlation, authorization = _publish_properties(buf, pos, pend)
    return Publish(
        topic,
        buf[pend:end],
        qos,
        packet_id,
        bool(first & 0x01),
        bool(first & 0x08),
        response_topic,
        correlation,
        authorization,
    )


def _publish_properties(
    buf: bytes, pos: int, pend: int
) -> tuple[str | None, bytes | None, str | None]:
    """(Response Topic, Correlation Data, authorization user property) of a PUBLISH."""
    response_topic = correlation = authorization = None
    while pos < pend:
        pid = buf[pos]
        if pid in _INLINE:
            if pos + 3 > pend:
                raise ProtocolError("truncated property")
            n = (buf[pos + 1] << 8) | buf[pos + 2]
            a, b = pos + 3, pos + 3 + n
            if b > pend:
                raise ProtocolError("truncated property")
            if pid == P_CORRELATION:
                correlation = buf[a:b]
                pos = b
                continue
            try:
                if pid == P_RESPONSE_TOPIC:
                    response_topic = _shared_text(buf[a:b])
                    pos = b
                    continue
                if b + 2 > pend:
                    raise ProtocolError("truncated property")
                c = b + 2 + ((buf[b] << 8) | buf[b + 1])
                if c > pend:
                    raise ProtocolError("truncated property")
                if buf[a:b].decode().lower() == "authorization":
                    value = _shared_text(buf[b + 2 : c])
                    if authorization is None:
                        authorization = value
                    elif value != authorization:
                        authorization = AMBIGUOUS_AUTHORIZATION
                pos = c
            except UnicodeDecodeError:
                raise ProtocolError("property is not UTF-8") from None
        else:  # anything else: the general decoder, one property at a time
            pos = _skip_property(buf, pos, pend)
    return response_topic, correlation, authorization


def _skip_property(buf: bytes, pos: int, stop: int) -> int:
    """Skip (validating) one property at ``pos``."""
    pid = buf[pos]
    pos += 1
    if pid in _U8:
        pos += 1
    elif pid in _U16:
        pos += 2
    elif pid in _U32:
        pos += 4
    elif pid in _STR:
        _text, pos = _string(buf, pos, stop)
    elif pid in _BIN:
        if pos + 2 > stop:
            raise ProtocolError("truncated property")
        pos += 2 + _unpack_h(buf, pos)[0]
    elif pid == P_SUBSCRIPTION_ID:
        vi = read_varint(buf, pos)
        if vi is None:
            raise ProtocolError("truncated property")
        pos = vi[1]
    else:
        raise ProtocolError(f"unknown property 0x{pid:02x}")
    if pos > stop:
        raise ProtocolError("truncated property")
    return pos


class PacketReader:
    """Feed bytes in any chunking; take whole packets out."""

    __slots__ = ("_rest", "max_packet")

    def __init__(self, max_packet: int = MAX_REMAINING) -> None:
        self._rest = b""
        self.max_packet = max_packet

    def feed(self, data: bytes) -> list[Packet]:
        if self._rest:
            data = self._rest + data
        out: list[Packet] = []
        pos = 0
        n = len(data)
        try:
            while n - pos >= 2:
                first = data[pos]
                length = data[pos + 1]
                if length < 0x80:
                    start = pos + 2
                elif n - pos > 2 and data[pos + 2] < 0x80:  # two-byte length: most requests
                    length = (length & 0x7F) | (data[pos + 2] << 7)
                    start = pos + 3
                else:
                    vi = read_varint(data, pos + 1)
                    if vi is None:
                        break
                    length, start = vi
                    if length > self.max_packet:
                        raise ProtocolError(f"packet of {length} bytes over the limit")
                end = start + length
                if end > n:
                    break
                if first & 0xF0 == PUBLISH:
                    out.append(decode_publish(first, data, start, end))
                else:
                    out.append(self._decode(first, data, start, end))
                pos = end
        finally:
            self._rest = data[pos:] if pos < n else b""
        return out

    @staticmethod
    def _decode(first: int, data: bytes, start: int, end: int) -> Packet:
        kind = first & 0xF0
        body = data[start:end]
        if kind in (PUBACK, SUBACK, UNSUBACK):
            if len(body) < 2:
                raise ProtocolError("truncated acknowledgement")
            packet_id = _unpack_h(body, 0)[0]
            if kind != PUBACK:
                _props, pos = decode_properties(body, 2, len(body))
                return Ack(kind, packet_id, body[pos:])
            return Ack(kind, packet_id, body[2:3])
        if kind == CONNACK:
            if len(body) < 2:
                raise ProtocolError("truncated CONNACK")
            props = decode_properties(body, 2, len(body))[0] if len(body) > 2 else Properties()
            return Connack(bool(body[0] & 0x01), body[1], props)
        if kind == PINGRESP:
            return PINGRESP_SINGLETON
        if kind == DISCONNECT:
            reason = body[0] if body else 0
            reason_string = None
            if len(body) > 1:
                props = decode_properties(body, 1, len(body))[0]
                reason_string = props.get_str(P_REASON_STRING)
            return Disconnect(reason, reason_string)
        raise ProtocolError(f"unexpected packet type 0x{first:02x}")
