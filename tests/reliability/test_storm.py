"""A storm of 10,000 random payloads on every request topic (SPEC §2, §4, §5): every one is
answered with an error reply and dead-lettered, nothing is stored, memory stays flat, and the
gateway goes on serving good requests.

The storm is pushed by a bare MQTT 5 over WebSocket client on the test's event loop (pre-encoded
PUBLISH packets, many per WebSocket frame), so the gateway, which runs in this process too, does
the work rather than a full MQTT client library. Payloads come from a seeded generator; set
``HYDROBIT_STORM_SEED`` to replay a run (the seed is in every failure message).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import json
import os
import random
import secrets
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from gateway.app import Gateway
from gateway.core import mqtt5
from gateway.core.auth import mint_token
from gateway.deadletters import capped_topic, redact_tokens
from gateway.errors import ERROR_CODES
from gateway.simulate import connect_packet, publish_packet, subscribe_packet, ws_frame
from gateway.transport.mqtt import Inbound
from tests.conftest import PREFIX
from tests.support.devices import Device
from tests.support.extra_helpers import fetch, iso_ms, stored_for
from tests.support.servers import Servers
from tests.support.tenants import Tenant, record

STORM = 10_000
DEAD_LETTER_CAP = 4096  # GATEWAY_DEAD_LETTER_PAYLOAD_CAP's default
WINDOW = 400  # our unacknowledged QoS 1 publishes (below the broker's Receive Maximum)
PER_FRAME = 64  # MQTT packets per WebSocket frame
IDLE_S = 20.0  # give up waiting when no reply arrived for this long
MAX_WAIT_S = 150.0
RSS_SLACK_MIB = 150
NEVER_OVER_MQTT = {"INTERNAL", "UNAVAILABLE"}  # a bug, or a code only the REST mirror uses


# --- the payload generator ------------------------------------------------------------------


@dataclass(frozen=True)
class Shot:
    """One storm message: where it goes, with what token, and its bytes."""

    suffix: str
    token: str | None  # the authorization user property, "Bearer <jwt>" or garbage
    payload: bytes
    kind: str


ANY_VALUE: list[object] = [
    None,
    True,
    False,
    0,
    -1,
    1.5,
    -0.0,
    1e308,
    2**63 - 1,
    "",
    " ",
    "x" * 129,
    "\u0000",
    "a\u0000b",
    "é🙂\u202e",
    "2025-10-19T14:30:00.000Z",
    "2025-13-45T99:99:99Z",
    "yesterday",
    [],
    [1, "a", None],
    {},
    {"type": "percent"},
    {"type": "fixed", "value": -5},
    {"nested": {"deeper": [1, 2, {"x": None}]}},
]
FIELD_NAMES = [
    "sessionId",
    "projectId",
    "sectorId",
    "sector_name",
    "openedAt",
    "workerId",
    "worker_name",
    "units",
    "recordedAtUtc",
    "clientEventId",
    "idempotencyKey",
    "samplingUnit",
    "pricePerUnit",
    "bonus",
    "maxDurationHours",
    "notes",
    "reason",
    "key",
    "records",
    "recordId",
    "authorization",
    "replyTo",
    "requestId",
    "auth0Id",
]


class Storm:
    """Seeded random payloads; ``refused_anyway`` ones are refused on any topic by any token."""

    def __init__(self, seed: int, tenant: Tenant, session_id: str) -> None:
        self.rng = random.Random(seed)
        self.tenant = tenant
        self.session_id = session_id
        self.tag = f"storm{seed:x}"
        now = datetime.now(UTC)
        self.good_token = f"Bearer {tenant.token()}"
        self.bad_tokens = [
            "Bearer not-a-jwt",
            "Bearer ",
            "Basic dXNlcjpwYXNz",
            "bearer " + base64.urlsafe_b64encode(self.rng.randbytes(30)).decode(),
            f"Bearer {tenant.token(ttl_s=-3600)}",  # expired
            "Bearer "
            + mint_token("another-secret-0123456789abcdef0123456789", tenant.user, ttl_s=600),
            "Bearer " + _unsigned_token(tenant.user),
            "x" * 3000,
        ]
        self.now = iso_ms(now)
        self.future = iso_ms(now + timedelta(days=2))
        # refused whatever the topic and token: not JSON, not an object, too deep, bad envelope
        self.refused_anyway: list[tuple[str, Callable[[], bytes]]] = [
            ("garbage", self.garbage),
            ("bad-utf8", self.bad_utf8),
            ("not-json", self.not_json),
            ("non-object", self.non_object),
            ("too-deep", self.too_deep),
            ("bad-envelope", self.bad_envelope),
        ]
        # refused on a session of the caller's only because the content is wrong
        self.bad_records: list[tuple[str, Callable[[], bytes]]] = [
            ("bad-record", self.bad_record),
            ("huge", self.huge),
        ]
        # anything at all, for random ids (NOT_FOUND at worst): wrong types, big, valid-looking
        self.anything: list[tuple[str, Callable[[], bytes]]] = [
            *self.refused_anyway,
            *self.bad_records,
            ("wrong-types", self.wrong_types),
            ("valid-record", self.valid_record),
            ("big-request-id", lambda: self.obj(self.record(requestId=10**30))),
            ("valid-open", self.valid_open),
            ("empty-object", lambda: b"{}"),
        ]

    # ids and topics ----------------------------------------------------------------------------

    def random_id(self) -> str:
        r = self.rng.random()
        if r < 0.6:
            return f"{self.tag}-{self.rng.randbytes(6).hex()}"
        if r < 0.75:
            return "".join(self.rng.choice("aZ09._-:~é🙂 ") for _ in range(self.rng.randint(1, 40)))
        if r < 0.85:
            return "s" * self.rng.choice([128, 129, 500])  # 129+: not a request topic
        if r < 0.95:
            return self.rng.randbytes(12).hex()  # shaped like an ObjectId
        return self.rng.choice(["get", "open", "records", "bulk", "$x", "reply", "events"])

    def shot(self) -> Shot:
        rng = self.rng
        p = rng.random()
        token: str | None = self.good_token
        if p < 0.12:
            token = rng.choice(self.bad_tokens)
        elif p < 0.16:
            token = None
        kind = rng.choice(
            [
                "sessions/open",
                "sessions/{s}/get",
                "sessions/{s}/update",
                "sessions/{s}/close",
                "sessions/{s}/extend",
                "sessions/{s}/records",
                "records/bulk",
                "records/{r}/get",
                "records/{r}/void",
                "records/check-idempotency",
            ]
        )
        ours = "{s}" in kind and rng.random() < 0.35  # the tenant's real, open session
        suffix = kind.format(s=self.session_id if ours else self.random_id(), r=self.random_id())
        if token != self.good_token:
            name, make = rng.choice(self.anything)
        elif ours and kind.endswith("/records"):
            name, make = rng.choice(self.refused_anyway + self.bad_records * 3)
        elif ours:
            name, make = rng.choice(self.refused_anyway)
        elif kind in ("records/bulk", "records/check-idempotency", "sessions/open"):
            name, make = self.bad_request_for(kind)
        else:
            name, make = rng.choice(self.anything)
        return Shot(suffix, token, make(), f"{kind}:{name}")

    def bad_request_for(self, kind: str) -> tuple[str, Callable[[], bytes]]:
        """Topics without an id: with a good token only what is refused there may go."""
        rng = self.rng
        if rng.random() < 0.5:
            return rng.choice(self.refused_anyway)
        if kind == "records/bulk":
            return "bulk-not-a-list", lambda: self.obj(
                {"records": rng.choice([None, 1, "x", {}, {"0": self.record()}])}
            )
        if kind == "records/check-idempotency":
            return "check-bad-key", lambda: self.obj(
                {"key": rng.choice([None, 1, "", [], {}, True, "k" * 1025])}
            )
        return "open-unknown-project", self.valid_open

    # payload makers ------------------------------------------------------------------------------

    def obj(self, value: dict[str, Any]) -> bytes:
        value.setdefault("requestId", f"{self.tag}-{self.rng.randrange(10**9)}")
        return json.dumps(value, ensure_ascii=self.rng.random() < 0.5).encode()

    def record(self, **changes: Any) -> dict[str, Any]:
        rec = record(
            worker=f"W{self.rng.randrange(100):02d}",
            event=f"{self.tag}-{self.rng.randbytes(6).hex()}",
            recordedAtUtc=self.now,
        )
        rec.update(changes)
        return rec

    def garbage(self) -> bytes:
        n = self.rng.choice([0, 1, 2, 7, 64, 300, 2_000, 6_000])
        raw = self.rng.randbytes(n)
        with contextlib.suppress(orjson.JSONDecodeError):
            if isinstance(orjson.loads(raw), dict):  # a JSON object by chance: not garbage
                return b"\xff" + raw
        return raw

    def bad_utf8(self) -> bytes:
        bad = self.rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
        body = orjson.dumps(self.record(workerId="JS__BAD__"))
        return body.replace(b"__BAD__", bad)

    def not_json(self) -> bytes:
        good = orjson.dumps(self.record())
        return self.rng.choice(
            [
                good[: self.rng.randrange(1, len(good))],  # truncated
                good[:-1] + b",}",  # trailing comma
                good[:-1] + b',"x":NaN}',
                good[:-1] + b',"x":Infinity}',
                b"\xef\xbb\xbf" * 2 + good,  # one BOM is ignored (RFC 8259 §8.1), not two
                good.replace(b'"', b"'"),
                b"/* c */" + good,
                good + b"{}",
                b'{"workerId": "\\ud800"}',
                b"{" * 10,
            ]
        )

    def non_object(self) -> bytes:
        return self.rng.choice(
            [
                *(b"null", b"true", b"false", b"0", b"-1.5e3", b'"a string"', b"[]", b"[{}]"),
                orjson.dumps([self.record()]),
                orjson.dumps(self.tag),
            ]
        )

    def too_deep(self) -> bytes:
        levels = self.rng.choice([17, 20, 64, 500, 2_000])
        inner: Any = 1
        if self.rng.random() < 0.5:
            for _ in range(min(levels, 200)):  # orjson writes at most 254 levels
                inner = {"a": inner}
            return orjson.dumps(self.record(meta=inner))
        return b'{"a":' + b"[" * levels + b"]" * levels + b"}"

    def bad_envelope(self) -> bytes:
        name = self.rng.choice(["authorization", "replyTo", "auth0Id", "requestId"])
        value = self.rng.choice([1, 2.5, True, [], {}, ["Bearer x"]])
        if name == "requestId" and isinstance(value, int | float) and not isinstance(value, bool):
            value = [value]
        return self.obj(self.record(**{name: value}))

    def bad_record(self) -> bytes:
        rng = self.rng
        changes: dict[str, Any] = rng.choice(
            [
                {"units": -1},
                {"units": "5"},
                {"units": True},
                {"units": 1e9},
                {"units": None},
                {"units": [5]},
                {"recordedAtUtc": "yesterday"},
                {"recordedAtUtc": self.future},
                {"recordedAtUtc": 1_700_000_000},
                {"recordedAtUtc": "2025-10-19"},
                {"workerId": ""},
                {"workerId": 315},
                {"workerId": "w" * 129},
                {"worker_name": ""},
                {"worker_name": "n" * 257},
                {"clientEventId": None},
                {"clientEventId": ["e"]},
                {"idempotencyKey": ""},
                {"sessionId": f"{self.tag}-other"},
                {"sessionId": 5},
                {"auth0Id": f"{self.tag}-someone-else"},
                {"workerId": "JS\u0000315"},  # PostgreSQL text cannot hold NUL
                {"worker_name": "John\u0000Smith"},
            ]
        )
        rec = self.record(**changes)
        if rng.random() < 0.3:  # and a required field missing too
            del rec[rng.choice(["workerId", "worker_name", "recordedAtUtc", "clientEventId"])]
        return self.obj(rec)

    def wrong_types(self) -> bytes:
        rng = self.rng
        names = rng.sample(FIELD_NAMES, rng.randint(0, 6))
        value = {n: rng.choice(ANY_VALUE) for n in names}
        if rng.random() < 0.3:
            value["".join(rng.choice("abc.$ ") for _ in range(4))] = rng.choice(ANY_VALUE)
        return self.obj(value)

    def huge(self) -> bytes:
        size = self.rng.choice([1_000, 4_095, 4_096, 4_097, 8_000])
        return self.obj(self.record(notes="é" * (size // 2), worker_name="n" * size))

    def valid_record(self) -> bytes:
        return self.obj(self.record())

    def valid_open(self) -> bytes:
        value = self.tenant.open_payload(projectId=f"{self.tag}-proj-{self.rng.randbytes(4).hex()}")
        return self.obj(value)


def _unsigned_token(sub: str) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(b'{"alg":"none","typ":"JWT"}')
    body = b64(orjson.dumps({"sub": sub, "exp": 4_102_444_800}))
    return f"{head}.{body}."


# --- a bare MQTT 5 client over WebSocket, on asyncio --------------------------------------------


@dataclass
class StormClient:
    """Publishes pre-encoded QoS 1 packets as fast as the broker takes them, and collects the
    replies on its reply topic (subscribed at QoS 0) by Correlation Data."""

    host: str
    port: int
    client_id: str = field(default_factory=lambda: f"storm-{secrets.token_hex(4)}")
    replies: dict[bytes, list[bytes]] = field(default_factory=dict)
    reply_count: int = 0
    window: int = WINDOW
    refused_by_broker: list[int] = field(default_factory=list)
    _unacked: int = 0
    _acked: asyncio.Event = field(default_factory=asyncio.Event)
    _got: asyncio.Event = field(default_factory=asyncio.Event)
    _mqtt: mqtt5.PacketReader = field(default_factory=mqtt5.PacketReader)
    _ws: bytearray = field(default_factory=bytearray)
    _reader: asyncio.StreamReader | None = None
    _writer: asyncio.StreamWriter | None = None
    _task: asyncio.Task[None] | None = None
    _control: asyncio.Queue[mqtt5.Packet] = field(default_factory=asyncio.Queue)

    @property
    def reply_topic(self) -> str:
        return f"{PREFIX}/clients/{self.client_id}/replies"

    async def __aenter__(self) -> StormClient:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        key = base64.b64encode(os.urandom(16)).decode()
        self._writer.write(
            (
                f"GET /mqtt HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(self._reader.readuntil(b"\r\n\r\n"), 10)
        assert b" 101 " in head.split(b"\r\n", 1)[0], head
        self._task = asyncio.create_task(self._read())
        self._writer.write(ws_frame(connect_packet(self.client_id, keepalive=120)))
        connack = await asyncio.wait_for(self._control.get(), 10)
        assert isinstance(connack, mqtt5.Connack), connack
        assert connack.reason == 0, connack
        receive_max = connack.properties.get_int(mqtt5.P_RECEIVE_MAXIMUM, 65_535)
        self.window = min(WINDOW, receive_max)
        self._writer.write(ws_frame(subscribe_packet(1, self.reply_topic, qos=0)))
        suback = await asyncio.wait_for(self._control.get(), 10)
        assert isinstance(suback, mqtt5.Ack), suback
        assert suback.reasons == b"\x00", suback
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):
                self._writer.write(ws_frame(mqtt5.encode_disconnect()))
                await self._writer.drain()
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _read(self) -> None:
        assert self._reader is not None
        while True:
            chunk = await self._reader.read(1 << 18)
            if not chunk:
                return
            self._ws += chunk
            for pkt in self._mqtt.feed(self._unframe()):
                if isinstance(pkt, mqtt5.Publish):
                    if pkt.correlation is not None:
                        self.replies.setdefault(bytes(pkt.correlation), []).append(pkt.payload)
                        self.reply_count += 1
                        self._got.set()
                elif isinstance(pkt, mqtt5.Ack) and pkt.kind == mqtt5.PUBACK:
                    self._unacked -= 1
                    if pkt.reasons not in (b"", b"\x00"):
                        self.refused_by_broker.append(pkt.packet_id)
                    self._acked.set()
                else:
                    self._control.put_nowait(pkt)

    def _unframe(self) -> bytes:
        """The MQTT bytes of every complete WebSocket frame received (server frames are not
        masked)."""
        ws, out, pos = self._ws, bytearray(), 0
        while len(ws) - pos >= 2:
            n, hdr = ws[pos + 1] & 0x7F, 2
            if n == 126:
                if len(ws) - pos < 4:
                    break
                n, hdr = struct.unpack_from("!H", ws, pos + 2)[0], 4
            elif n == 127:
                if len(ws) - pos < 10:
                    break
                n, hdr = struct.unpack_from("!Q", ws, pos + 2)[0], 10
            if len(ws) - pos < hdr + n:
                break
            if ws[pos] & 0x0F in (0x0, 0x1, 0x2):
                out += ws[pos + hdr : pos + hdr + n]
            pos += hdr + n
        del ws[:pos]
        return bytes(out)

    async def publish_all(self, packets: list[bytes]) -> None:
        """Send every packet, at most ``window`` unacknowledged by the broker at a time."""
        assert self._writer is not None
        for start in range(0, len(packets), PER_FRAME):
            batch = packets[start : start + PER_FRAME]
            while self._unacked + len(batch) > self.window:
                self._acked.clear()
                await asyncio.wait_for(self._acked.wait(), 30)
            self._unacked += len(batch)
            self._writer.write(ws_frame(b"".join(batch)))
            await self._writer.drain()

    async def wait_replies(self, expected: int) -> None:
        """Until ``expected`` replies arrived, or none came for IDLE_S (bounded by MAX_WAIT_S)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MAX_WAIT_S
        while True:
            self._got.clear()
            if self.reply_count >= expected or loop.time() > deadline:
                return
            try:
                await asyncio.wait_for(self._got.wait(), IDLE_S)
            except TimeoutError:
                return


# --- helpers ---------------------------------------------------------------------------------


def live_inbound() -> int:
    """Requests (as the gateway received them) still alive in this process."""
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Inbound)


def rss_mib() -> float:
    """This process's resident set size (the gateway runs in it)."""
    gc.collect()
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


async def dead_letters_since(database: str, since: datetime) -> list[Any]:
    rows: list[Any] = await fetch(
        database,
        """SELECT topic, reason, payload, payload_size, truncated
           FROM dead_letters WHERE received_at >= $1""",
        since,
    )
    return rows


async def wait_dead_letters(database: str, since: datetime, expected: int) -> list[Any]:
    """The dead letters received since ``since``, polled until ``expected`` are there (or 30 s:
    they are written in the background)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    rows = await dead_letters_since(database, since)
    while len(rows) < expected and loop.time() < deadline:
        await asyncio.sleep(0.5)
        rows = await dead_letters_since(database, since)
    await asyncio.sleep(1.0)  # a writer flush interval and more: nothing extra comes late
    return await dead_letters_since(database, since)


# --- the test --------------------------------------------------------------------------------


async def test_storm_of_random_payloads_is_refused_and_the_gateway_keeps_serving(
    servers: Servers,
    gateway: Gateway,
    device: Device,
    tenant: Tenant,
    session_id: str,
    database: str,
) -> None:
    """10,000 random payloads on every request topic: one error reply and one dead letter each,
    nothing stored, memory flat, and good requests are served before and after."""
    seed = int(os.environ.get("HYDROBIT_STORM_SEED") or secrets.randbits(32))
    storm = Storm(seed, tenant, session_id)
    why = f"(HYDROBIT_STORM_SEED={seed})"
    records_topic = f"sessions/{session_id}/records"

    # good traffic before the storm
    good: list[dict[str, Any]] = [record(units=u) for u in (2, 3.5)]
    for rec in good:
        ok = await device.request(records_topic, rec)
        assert ok["status"] == "success", ok

    shots = [storm.shot() for _ in range(STORM)]
    kinds = Counter(s.kind.split(":")[0] for s in shots)
    assert len(kinds) == 10, kinds  # every request topic of SPEC §2
    async with StormClient(servers.mqtt_host, servers.ws_port) as client:
        packets = [
            publish_packet(
                f"{PREFIX}/{s.suffix}",
                s.payload,
                packet_id=i % 65_535 + 1,
                response_topic=client.reply_topic,
                correlation=struct.pack("!Q", i),
                authorization=s.token,
            )
            for i, s in enumerate(shots)
        ]
        before_mib = rss_mib()
        since = datetime.now(UTC)
        await client.publish_all(packets)
        await client.wait_replies(STORM)

        answered = {struct.unpack("!Q", corr)[0]: bodies for corr, bodies in client.replies.items()}
        missing = [i for i in range(STORM) if i not in answered]
        assert not client.refused_by_broker, f"the broker refused some publishes {why}"
        assert not missing, (
            f"{len(missing)} of {STORM} storm messages got no reply (has a gateway task died? "
            f"see the captured log), by kind {Counter(shots[i].kind for i in missing)}, e.g. "
            f"{[(shots[i].kind, shots[i].payload[:80]) for i in missing[:5]]} {why}"
        )
        twice = {i: len(b) for i, b in answered.items() if len(b) != 1}
        assert not twice, f"replies per request must be exactly one: {twice} {why}"

    codes: Counter[str] = Counter()
    expected_letters: Counter[tuple[str, str, bytes, int]] = Counter()
    for i, shot in enumerate(shots):
        reply = orjson.loads(answered[i][0])
        what = f"{shot.kind} on {shot.suffix}: {shot.payload[:300]!r} -> {reply} {why}"
        assert reply["status"] == "error", what
        code = reply["error"]["code"]
        assert code in ERROR_CODES, what
        assert code not in NEVER_OVER_MQTT, what
        assert reply["error"]["message"], what
        codes[code] += 1
        topic = f"{PREFIX}/{shot.suffix}"
        # as the writer keeps it: tokens redacted (tests/core/test_redaction.py), then capped
        kept_topic = capped_topic(redact_tokens(topic.encode()).decode(errors="replace"))
        kept = redact_tokens(shot.payload)[:DEAD_LETTER_CAP]
        expected_letters[(kept_topic, code, kept, len(shot.payload))] += 1

    # every refusal is in the dead-letter table, once, with its payload (capped) and size
    rows = await wait_dead_letters(database, since, STORM)
    got_letters: Counter[tuple[str, str, bytes, int]] = Counter(
        (r["topic"], r["reason"], bytes(r["payload"]), r["payload_size"]) for r in rows
    )
    assert len(rows) == sum(codes.values()), (
        f"{len(rows)} dead letters for {sum(codes.values())} refusals {dict(codes)}; "
        f"missing e.g. {list((expected_letters - got_letters).items())[:3]} {why}"
    )
    assert got_letters == expected_letters, (
        f"dead letters differ from the refusals: missing "
        f"{list((expected_letters - got_letters).items())[:3]}, extra "
        f"{list((got_letters - expected_letters).items())[:3]} {why}"
    )
    assert all(r["truncated"] is (r["payload_size"] > DEAD_LETTER_CAP) for r in rows)

    # memory stays flat: the storm is not kept anywhere
    del packets, answered, client
    after_mib = rss_mib()
    assert after_mib - before_mib < RSS_SLACK_MIB, (
        f"RSS grew from {before_mib:.0f} MiB to {after_mib:.0f} MiB over the storm {why}"
    )

    # and good traffic after: stored, and the totals are exactly the good records
    after = record(units=4)
    ok = await device.request(records_topic, after)
    assert ok["status"] == "success", (ok, why)
    assert ok["data"]["idempotent"] is False
    good.append(after)
    got = await device.request(f"sessions/{session_id}/get", {})
    assert got["status"] == "success", (got, why)
    session = got["data"]
    assert session["status"] == "open", (session, why)
    assert session["totals"]["records"] == len(good), (session["totals"], why)
    assert session["totals"]["units"] == sum(r["units"] for r in good), (session["totals"], why)
    assert session["totals"]["voided"] == 0
    stored = await stored_for(database, [tenant.company_id])
    assert stored.records == len(good), (stored, why)
    assert stored.sessions == 1, (stored, why)

    # nothing of the storm is retained: at most what the pipeline's shards hold of their last
    # batch (GATEWAY_BATCH_MAX each) is still alive
    bound = gateway.settings.batch_max * gateway.settings.pipeline_depth
    alive = live_inbound()
    assert alive <= bound, (
        f"{alive} received requests are still alive after the storm (at most {bound} may be): "
        f"the gateway keeps refused requests, memory grows with every storm {why}"
    )
