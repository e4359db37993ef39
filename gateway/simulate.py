"""``gateway simulate``: a fleet of handhelds over MQTT 5 / WebSocket, cheap enough to load the
gateway instead of itself.

Each worker process drives many device connections from one selector loop on raw sockets:
the WebSocket handshake, then MQTT 5 CONNECT and SUBSCRIBE, then PUBLISH packets that were
encoded before the clock starts (many per WebSocket frame, with a zero mask key), and replies
matched by their 8-byte Correlation Data without parsing their JSON (only its first bytes,
for success/idempotent, and an error reply's code). A full MQTT client spends more CPU per
request than a good gateway, which would make the load generator the bottleneck on a small
machine.
"""

from __future__ import annotations

import base64
import contextlib
import multiprocessing as mp
import os
import secrets
import select
import selectors
import socket
import struct
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from gateway.errors import ConfigError, GatewayError

# --- MQTT 5 encoding (just what a device needs) ------------------------------------------------


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n % 128
        n //= 128
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def mqtt_str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("!H", len(b)) + b


def packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + varint(len(body)) + body


def connect_packet(client_id: str, keepalive: int = 60) -> bytes:
    props = varint(0)
    body = mqtt_str("MQTT") + bytes([5, 0x02]) + struct.pack("!H", keepalive) + props
    return packet(0x10, body + mqtt_str(client_id))


def subscribe_packet(packet_id: int, topic: str, qos: int = 0) -> bytes:
    body = struct.pack("!H", packet_id) + varint(0) + mqtt_str(topic) + bytes([qos])
    return packet(0x82, body)


def publish_packet(
    topic: str,
    payload: bytes,
    *,
    packet_id: int,
    response_topic: str,
    correlation: bytes,
    authorization: str | None,
) -> bytes:
    """A QoS 1 PUBLISH with Response Topic, Correlation Data and the token as user property."""
    props = b"\x08" + mqtt_str(response_topic) + b"\x09" + mqtt_str(correlation)
    if authorization:
        props += b"\x26" + mqtt_str("authorization") + mqtt_str(authorization)
    body = mqtt_str(topic) + struct.pack("!H", packet_id) + varint(len(props)) + props + payload
    return packet(0x32, body)


def ws_frame(data: bytes) -> bytes:
    """A masked binary frame, mask key 0 (so the payload needs no XOR)."""
    n = len(data)
    if n < 126:
        head = bytes([0x82, 0x80 | n])
    elif n < 65536:
        head = bytes([0x82, 0x80 | 126]) + struct.pack("!H", n)
    else:
        head = bytes([0x82, 0x80 | 127]) + struct.pack("!Q", n)
    return head + b"\x00\x00\x00\x00" + data


def read_varint(buf: bytes | bytearray | memoryview, pos: int) -> tuple[int, int] | None:
    value, mult = 0, 1
    for i in range(4):
        if pos + i >= len(buf):
            return None
        b = buf[pos + i]
        value += (b & 0x7F) * mult
        if not b & 0x80:
            return value, pos + i + 1
        mult *= 128
    raise ValueError("malformed remaining length")


_PROP_FIXED = {0x01: 1, 0x02: 4, 0x17: 1, 0x19: 1, 0x23: 2, 0x24: 1, 0x25: 1, 0x28: 1, 0x29: 1}
_PROP_FIXED |= {0x2A: 1, 0x11: 4, 0x18: 4, 0x27: 4, 0x13: 2, 0x21: 2, 0x22: 2}


def correlation_of(props: bytes | memoryview) -> bytes | None:
    """The Correlation Data property (0x09) among MQTT 5 PUBLISH properties."""
    i, n = 0, len(props)
    while i < n:
        pid = props[i]
        i += 1
        if pid == 0x09:
            size = struct.unpack_from("!H", props, i)[0]
            return bytes(props[i + 2 : i + 2 + size])
        if pid in _PROP_FIXED:
            i += _PROP_FIXED[pid]
        elif pid == 0x0B:
            vi = read_varint(props, i)
            if vi is None:
                return None
            i = vi[1]
        elif pid == 0x26:
            k = struct.unpack_from("!H", props, i)[0]
            v = struct.unpack_from("!H", props, i + 2 + k)[0]
            i += 4 + k + v
        else:  # strings and binary data: 2-byte length
            i += 2 + struct.unpack_from("!H", props, i)[0]
    return None


# --- a device connection ------------------------------------------------------------------------


@dataclass(slots=True)
class Reply:
    correlation: bytes
    ok: bool
    idempotent: bool
    code: str = ""  # an error reply's code ("" when ok)


_SUCCESS = b'{"status":"success"'
_CODE = b'"code":"'


def error_code_of(payload: bytes) -> str:
    """The code of an error reply (``{"status":"error","error":{"code":"FORBIDDEN",...``),
    found without parsing the JSON; ``unknown`` if it has none."""
    start = payload.find(_CODE)
    if start < 0:
        return "unknown"
    start += len(_CODE)
    end = payload.find(b'"', start, start + 64)
    return payload[start:end].decode(errors="replace") if end > start else "unknown"


class MqttWsConnection:
    """One device: a non-blocking socket speaking MQTT 5 over WebSocket (blocking setup);
    ``path=None`` speaks plain MQTT over TCP instead (for comparison)."""

    def __init__(
        self, host: str, port: int, path: str | None, client_id: str, *, tls: bool = False
    ):
        self.client_id = client_id
        self.websocket = path is not None
        sock = socket.create_connection((host, port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls:
            import ssl

            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        self.sock = sock
        self._ws = bytearray()  # raw websocket bytes
        self._mqtt = bytearray()  # de-framed MQTT bytes
        self.unacked = 0  # our QoS 1 publishes awaiting the broker's PUBACK
        self.other: list[bytes] = []  # publishes without correlation data
        self.pongs: list[bytes] = []  # answers to the server's pings, sent by the next read
        self.received = 0
        self.last_sent = time.monotonic()
        try:
            if self.websocket:
                self._handshake(host, port, path or "/mqtt")
            self.send(connect_packet(client_id))
            connack = self._expect(0x20, "CONNACK")
        except BaseException:
            self.sock.close()
            raise
        if len(connack) >= 2 and connack[1] >= 0x80:
            self.sock.close()
            raise SimulationError(
                f"the broker refused {client_id} (CONNACK reason 0x{connack[1]:02x}): the "
                "simulated devices connect anonymously, so point --url at a broker that lets "
                "them in, such as gateway dev's (the hardened production.conf does not)"
            )

    def frame(self, data: bytes) -> bytes:
        return ws_frame(data) if self.websocket else data

    def _handshake(self, host: str, port: int, path: str) -> None:
        sock = self.sock
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise ConnectionError("websocket handshake: connection closed")
            head += chunk
        status = head.split(b"\r\n", 1)[0]
        if b" 101 " not in status:
            raise ConnectionError(f"websocket handshake refused: {status.decode(errors='replace')}")
        self._ws += head.split(b"\r\n\r\n", 1)[1]

    def send(self, data: bytes) -> None:
        self.send_raw(self.frame(data))

    def send_raw(self, data: bytes) -> None:
        """All of ``data``; on a non-blocking socket one send() call when the buffer has room
        (toggling the socket's mode costs two more system calls per write)."""
        sock = self.sock
        if sock.gettimeout() != 0.0:
            sock.sendall(data)
            return
        view = memoryview(data)
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                select.select([], [sock], [], 10)

    def _expect(self, kind: int, name: str) -> bytes:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for first, body in self.packets():
                if first & 0xF0 == kind:
                    return body
            self._fill(blocking=True)
        raise TimeoutError(f"no {name} from the broker")

    def subscribe(self, topic: str) -> None:
        self.send(subscribe_packet(1, topic))
        self._expect(0x90, "SUBACK")

    def _fill(self, *, blocking: bool) -> int:
        sock = self.sock
        if sock.gettimeout() == 0.0:  # the run: non-blocking, one recv() per call
            if blocking:
                select.select([sock], [], [], 10)
            try:
                data = sock.recv(1 << 18)
            except BlockingIOError:
                return 0
        elif blocking:  # setup
            data = sock.recv(1 << 18)
        else:
            sock.setblocking(False)
            try:
                data = sock.recv(1 << 18)
            except BlockingIOError:
                return 0
            finally:
                sock.settimeout(10)
        if not data:
            raise ConnectionError(
                f"broker closed the connection of {self.client_id} "
                f"({self.received:,} bytes received, {len(self._ws)} unframed)"
            )
        self.received += len(data)
        if self.websocket:
            self._ws += data
            self._unframe()
            while self.pongs:
                self.send_raw(self.pongs.pop(0))
        else:
            self._mqtt += data
        return len(data)

    def _unframe(self) -> None:
        ws, out = self._ws, self._mqtt
        pos = 0
        while len(ws) - pos >= 2:
            n = ws[pos + 1] & 0x7F
            hdr = 2
            if n == 126:
                if len(ws) - pos < 4:
                    break
                n = struct.unpack_from("!H", ws, pos + 2)[0]
                hdr = 4
            elif n == 127:
                if len(ws) - pos < 10:
                    break
                n = struct.unpack_from("!Q", ws, pos + 2)[0]
                hdr = 10
            if len(ws) - pos < hdr + n:
                break
            opcode = ws[pos] & 0x0F
            if opcode in (0x1, 0x2, 0x0):  # data frames (server frames are unmasked)
                out += ws[pos + hdr : pos + hdr + n]
            elif opcode == 0x9:  # PING: answer PONG with the same payload, or be dropped
                body = bytes(ws[pos + hdr : pos + hdr + n])
                self.pongs.append(bytes([0x8A, 0x80 | len(body)]) + b"\x00\x00\x00\x00" + body)
            pos += hdr + n
        del ws[:pos]

    def packets(self) -> list[tuple[int, bytes]]:
        """Every complete MQTT packet received so far: (first byte, body)."""
        buf = self._mqtt
        pos = 0
        out = []
        while len(buf) - pos >= 2:
            vi = read_varint(buf, pos + 1)
            if vi is None:
                break
            length, start = vi
            if len(buf) - start < length:
                break
            out.append((buf[pos], bytes(buf[start : start + length])))
            pos = start + length
        del buf[:pos]
        return out

    def read_replies(self) -> list[Reply]:
        """Whatever arrived: replies (QoS 0 PUBLISH) and PUBACKs of our publishes."""
        with contextlib.suppress(BlockingIOError):
            while self._fill(blocking=False) == 1 << 18:
                pass
        replies: list[Reply] = []
        for first, body in self.packets():
            kind = first & 0xF0
            if kind == 0x40:
                self.unacked -= 1
            elif kind == 0x30:
                tlen = struct.unpack_from("!H", body, 0)[0]
                pos = 2 + tlen + (2 if first & 0x06 else 0)
                vi = read_varint(body, pos)
                if vi is None:
                    continue
                plen, pstart = vi
                corr = correlation_of(body[pstart : pstart + plen])
                payload = bytes(body[pstart + plen :])
                if corr is None:
                    self.other.append(payload)
                elif payload.startswith(_SUCCESS):
                    replies.append(Reply(corr, True, b'"idempotent":true' in payload))
                else:  # errors are few: only they pay for a search
                    replies.append(Reply(corr, False, False, error_code_of(payload)))
        return replies

    def request_json(
        self, topic: str, body: dict[str, Any], token: str, timeout: float = 15
    ) -> dict[str, Any]:
        """One request/reply (setup, not the hot loop): the reply's JSON."""
        import orjson

        corr = os.urandom(8)
        reply_topic = f"{topic}/reply-{self.client_id}"
        self.subscribe(reply_topic)
        self.send(
            publish_packet(
                topic,
                orjson.dumps(body),
                packet_id=60_000,
                response_topic=reply_topic,
                correlation=corr,
                authorization=f"Bearer {token}",
            )
        )
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._fill(blocking=True)
            for first, body_view in self.packets():
                if first & 0xF0 != 0x30:
                    continue
                tlen = struct.unpack_from("!H", body_view, 0)[0]
                pos = 2 + tlen + (2 if first & 0x06 else 0)
                vi = read_varint(body_view, pos)
                if vi is not None and correlation_of(body_view[vi[1] : vi[1] + vi[0]]) == corr:
                    result: dict[str, Any] = orjson.loads(bytes(body_view[vi[1] + vi[0] :]))
                    return result
        raise TimeoutError(f"no reply to {topic} within {timeout} s; is the gateway running?")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send(b"\xe0\x00")  # DISCONNECT
            self.sock.close()


# --- a fleet worker -----------------------------------------------------------------------------


@dataclass
class FleetPlan:
    """What one simulation run does; pickled to every worker process."""

    host: str
    port: int
    path: str | None  # None: plain MQTT over TCP
    prefix: str
    token: str
    sessions: list[str]
    devices: int = 8
    records: int = 10_000
    rate: float = 0.0  # records/s offered in total; 0 = saturate (keep `window` unanswered)
    window: int = 200  # per device, saturation mode
    duplicates: float = 0.0  # share of records sent twice
    processes: int = 1
    per_frame: int = 32  # MQTT packets per WebSocket frame
    tls: bool = False
    run_id: str = field(default_factory=lambda: secrets.token_hex(3))


@dataclass
class WorkerResult:
    sent: int = 0
    replies: int = 0
    ok: int = 0
    errors: int = 0
    error_codes: dict[str, int] = field(default_factory=dict)
    idempotent: int = 0
    latencies: list[float] = field(default_factory=list)
    cpu_s: float = 0.0
    wall_s: float = 0.0
    first_send: float = 0.0
    last_reply: float = 0.0


def _duplicated(plan: FleetPlan, n: int) -> bool:
    """Is the n-th record of a worker sent twice (``plan.duplicates`` of them are)?"""
    if plan.duplicates <= 0:
        return False
    return n % max(1, round(1 / plan.duplicates)) == 0


def _share(plan: FleetPlan, worker: int) -> int:
    base, extra = divmod(plan.records, plan.processes)
    return base + (1 if worker < extra else 0)


def planned_requests(plan: FleetPlan) -> int:
    """Requests the fleet will send: records plus their deliberate duplicates."""
    return sum(
        _share(plan, w) + sum(_duplicated(plan, n) for n in range(_share(plan, w)))
        for w in range(plan.processes)
    )


def _plan_records(plan: FleetPlan, worker: int) -> list[list[tuple[bytes, bytes]]]:
    """Per device of this worker: (correlation, encoded PUBLISH), all made before timing."""
    share = _share(plan, worker)
    devices = [d for d in range(plan.devices) if d % plan.processes == worker]
    out: list[list[tuple[bytes, bytes]]] = [[] for _ in devices]
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    bearer = f"Bearer {plan.token}"
    seq = 0
    for n in range(share):
        slot = n % len(devices)
        device = devices[slot]
        session = plan.sessions[device % len(plan.sessions)]
        event = f"sim-{plan.run_id}-{worker}-{n}"
        payload = (
            f'{{"workerId":"W{n % 50:03d}","worker_name":"Worker {n % 50:03d}","units":1,'
            f'"recordedAtUtc":"{now}","clientEventId":"{event}"}}'
        ).encode()
        for _ in range(2 if _duplicated(plan, n) else 1):
            corr = struct.pack("!Q", (worker << 48) | seq)
            pkt = publish_packet(
                f"{plan.prefix}/sessions/{session}/records",
                payload,
                packet_id=seq % 65535 + 1,
                response_topic=f"{plan.prefix}/clients/{plan.run_id}-{device}/replies",
                correlation=corr,
                authorization=bearer,
            )
            out[slot].append((corr, pkt))
            seq += 1
    return out


RATE_TICK_S = 0.001


class SimulationError(GatewayError):
    """The fleet could not run: no broker, no gateway answering, a session refused."""


class _Worker:
    """One worker process's devices, driven from one selector loop."""

    def __init__(self, plan: FleetPlan, worker: int) -> None:
        self.plan = plan
        self.worker = worker
        devices = [d for d in range(plan.devices) if d % plan.processes == worker]
        self.queues = _plan_records(plan, worker)
        self.conns: list[MqttWsConnection] = []
        for d in devices:
            c = MqttWsConnection(
                plan.host, plan.port, plan.path, f"{plan.run_id}-{d}", tls=plan.tls
            )
            c.subscribe(f"{plan.prefix}/clients/{plan.run_id}-{d}/replies")
            self.conns.append(c)
        self.sel = selectors.DefaultSelector()
        for i, c in enumerate(self.conns):
            c.sock.setblocking(False)
            self.sel.register(c.sock, selectors.EVENT_READ, i)
        self.total = sum(len(q) for q in self.queues)
        self.rate = plan.rate * len(devices) / plan.devices if plan.rate else 0.0
        self.sent_at: dict[bytes, float] = {}
        self.next_i = [0] * len(self.conns)
        self.outstanding = [0] * len(self.conns)
        self.result = WorkerResult()
        self._turn = 0

    def keep_alive(self) -> None:
        """PINGREQ from devices that have nothing left to send (keepalive is 60 s)."""
        now = time.monotonic()
        for c in self.conns:
            if now - c.last_sent > 20:
                c.send(b"\xc0\x00")
                c.last_sent = now

    def send_due(self, started: float) -> None:
        plan, result = self.plan, self.result
        due = int((time.perf_counter() - started) * self.rate) - result.sent if self.rate else 0
        if self.rate and due <= 0:
            return
        n = len(self.conns)
        self._turn = (self._turn + 1) % n  # a different device goes first each time: fairness
        for i in [(self._turn + j) % n for j in range(n)]:
            c = self.conns[i]
            q = self.queues[i]
            room = len(q) - self.next_i[i]
            if self.rate:
                k = min(room, max(0, due))  # what is due goes out together, devices in turn
            else:
                k = min(room, plan.window - self.outstanding[i], plan.per_frame * 8)
            k = min(k, max(0, 1000 - c.unacked))  # the broker's Receive Maximum
            if k <= 0:
                continue
            batch = q[self.next_i[i] : self.next_i[i] + k]
            self.next_i[i] += k
            stamp = time.perf_counter()
            for corr, _ in batch:
                self.sent_at[corr] = stamp
            frames = [
                c.frame(b"".join(p for _, p in batch[j : j + plan.per_frame]))
                for j in range(0, k, plan.per_frame)
            ]
            c.send_raw(b"".join(frames))
            c.last_sent = time.monotonic()
            self.outstanding[i] += k
            c.unacked += k
            result.sent += k
            due -= k
            if self.rate and due <= 0:
                break

    def receive(self, timeout: float) -> bool:
        """Take replies; True if any arrived."""
        result, got = self.result, False
        for key, _ in self.sel.select(timeout):
            i = key.data
            replies = self.conns[i].read_replies()
            t = time.perf_counter()
            for r in replies:
                started = self.sent_at.pop(r.correlation, None)
                if started is None:
                    continue
                got = True
                result.latencies.append(t - started)
                result.replies += 1
                self.outstanding[i] -= 1
                if not r.ok:
                    result.errors += 1
                    result.error_codes[r.code] = result.error_codes.get(r.code, 0) + 1
                    continue
                result.ok += 1
                result.idempotent += r.idempotent
        return got

    def run(self, progress: Any) -> WorkerResult:
        """Until every request is answered (or 60 s without a reply)."""
        result = self.result
        cpu0, t0 = time.process_time(), time.perf_counter()
        result.first_send = time.time()
        if progress is not None:  # connected: the clock of the bar's rate starts now
            progress.put((self.worker, 0, 0, result.first_send))
        last_reply = last_progress = time.perf_counter()
        tick = t0
        while result.replies < self.total:
            if result.sent < self.total:
                self.send_due(t0)
            if self.rate and result.sent < self.total:
                # Offered rate: work in ticks of RATE_TICK_S (send what is due, read every
                # reply that came) rather than waking for each reply. The fleet shares the
                # machine with what it measures; a wake-up per reply cost it twice the CPU.
                # Replies are timed at the tick that reads them: at most one tick late.
                tick = max(tick + RATE_TICK_S, time.perf_counter() - RATE_TICK_S)
                time.sleep(max(0.0, tick - time.perf_counter()))
                timeout = 0.0
            else:
                timeout = 0.001 if result.sent < self.total else 0.05
            if self.receive(timeout):
                last_reply = time.perf_counter()
            if time.perf_counter() - last_reply > 60:
                break  # the responder went silent: report what we have
            if time.perf_counter() - last_progress > 0.2:
                if progress is not None:
                    progress.put((self.worker, result.sent, result.replies, result.first_send))
                last_progress = time.perf_counter()
                self.keep_alive()
        result.cpu_s = time.process_time() - cpu0
        result.wall_s = last_reply - t0
        result.last_reply = time.time()
        if progress is not None:
            progress.put((self.worker, result.sent, result.replies, result.first_send))
        for c in self.conns:
            c.close()
        return result


def run_worker(plan: FleetPlan, worker: int, progress: Any) -> WorkerResult:
    return _Worker(plan, worker).run(progress)


def _worker_main(plan: FleetPlan, worker: int, progress: Any, results: Any) -> None:
    try:
        results.put((worker, run_worker(plan, worker, progress)))
    except Exception as exc:  # reported to the parent, which says what failed
        results.put((worker, exc))


# --- the fleet ----------------------------------------------------------------------------------


@dataclass
class FleetSummary:
    sent: int
    replies: int
    ok: int
    errors: int
    error_codes: dict[str, int]  # errors by code, most frequent first
    idempotent: int
    rate: float
    p50_ms: float
    p99_ms: float
    fleet_cpu_s: float
    wall_s: float

    def describe(self) -> str:
        return (
            f"{self.replies}/{self.sent} answered in {self.wall_s:.2f} s: "
            f"{self.rate:,.0f} records/s, "
            f"ack latency (publish to reply) p50 {self.p50_ms:.1f} ms p99 {self.p99_ms:.1f} ms, "
            f"{self.idempotent} duplicates (idempotent), {self.errors} errors{self.by_code()}; "
            f"fleet CPU {self.fleet_cpu_s:.2f} s "
            f"({1e6 * self.fleet_cpu_s / max(1, self.replies):.0f} us/record)"
        )

    def by_code(self) -> str:
        """`` (FORBIDDEN 48, SESSION_CLOSED 2)``, or nothing without errors."""
        if not self.error_codes:
            return ""
        return " (" + ", ".join(f"{c} {n}" for c, n in self.error_codes.items()) + ")"


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _bar(done: int, total: int, rate: float | None, width: int = 30) -> str:
    """The progress line; ``rate`` None while the devices are still connecting."""
    frac = done / total if total else 1.0
    filled = int(frac * width)
    bar = "#" * filled + "." * (width - filled)
    speed = "connecting devices" if rate is None else f"{rate:,.0f}/s"
    return f"\r[{bar}] {frac:6.1%} {done}/{total} replies {speed} "


def run_fleet(plan: FleetPlan, *, show_progress: bool = True) -> FleetSummary:
    """Run ``plan`` in ``plan.processes`` worker processes with a progress bar on stderr."""
    ctx = mp.get_context("spawn")
    progress: Any = ctx.Queue()
    results: Any = ctx.Queue()
    procs = [
        ctx.Process(target=_worker_main, args=(plan, w, progress, results), daemon=True)
        for w in range(plan.processes)
    ]
    for p in procs:
        p.start()
    total = planned_requests(plan)
    done_by: dict[int, int] = {}
    first_send: float | None = None  # the first publish of any worker (wall clock)
    got: dict[int, WorkerResult] = {}
    tty = show_progress and sys.stderr.isatty()
    last_line = 0.0
    while len(got) < plan.processes:
        while not progress.empty():
            w, _sent, replies, began = progress.get()
            done_by[w] = replies
            first_send = began if first_send is None else min(first_send, began)
        while not results.empty():
            w, res = results.get()
            if isinstance(res, Exception):
                for p in procs:
                    p.kill()
                where = f" (broker {plan.host}:{plan.port})" if isinstance(res, OSError) else ""
                raise SimulationError(f"simulator worker {w} failed: {res}{where}") from res
            got[w] = res
        if show_progress:
            done = sum(done_by.values())
            # as the summary counts it: replies per second since the first publish
            rate = None if first_send is None else done / max(1e-6, time.time() - first_send)
            line = _bar(done, total, rate)
            if tty:
                sys.stderr.write(line)
                sys.stderr.flush()
            elif time.perf_counter() - last_line > 2:
                sys.stderr.write(line.strip() + "\n")
                last_line = time.perf_counter()
        if all(not p.is_alive() for p in procs) and results.empty() and len(got) < plan.processes:
            raise SimulationError("a simulator worker died without a result")
        time.sleep(0.05)
    for p in procs:
        p.join(5)
    summary = summarize(list(got.values()))
    if show_progress:
        sys.stderr.write(_bar(summary.replies, total, summary.rate) + "\n")
    return summary


def summarize(results: Sequence[WorkerResult]) -> FleetSummary:
    latencies = [x for r in results for x in r.latencies]
    first = min(r.first_send for r in results)
    last = max(r.last_reply for r in results)
    wall = max(1e-9, last - first)
    replies = sum(r.replies for r in results)
    codes: Counter[str] = Counter()
    for r in results:
        codes.update(r.error_codes)
    return FleetSummary(
        sent=sum(r.sent for r in results),
        replies=replies,
        ok=sum(r.ok for r in results),
        errors=sum(r.errors for r in results),
        error_codes=dict(codes.most_common()),
        idempotent=sum(r.idempotent for r in results),
        rate=replies / wall,
        p50_ms=1000 * percentile(latencies, 0.50),
        p99_ms=1000 * percentile(latencies, 0.99),
        fleet_cpu_s=sum(r.cpu_s for r in results),
        wall_s=wall,
    )


def parse_ws_url(url: str) -> tuple[str, int, str | None, bool]:
    """(host, port, websocket path or None for plain TCP, TLS) of a broker URL."""
    parts = urlsplit(url)
    defaults = {"ws": 80, "wss": 443, "mqtt": 1883, "mqtts": 8883}
    if parts.scheme not in defaults or not parts.hostname:
        raise ConfigError(
            f"broker URL {url!r}: use ws://host:9001/mqtt (devices' WebSocket), "
            "wss://..., mqtt://host:1883 or mqtts://..."
        )
    if parts.username or parts.password:
        raise ConfigError(
            "broker URL: no user or password in it; the simulated devices connect anonymously "
            "(use gateway dev's broker, or a test listener that allows them)"
        )
    port = parts.port or defaults[parts.scheme]
    path = (parts.path or "/mqtt") if parts.scheme in ("ws", "wss") else None
    return parts.hostname, port, path, parts.scheme in ("wss", "mqtts")


def open_sessions(
    url: str, prefix: str, token: str, project: str, sectors: Sequence[str]
) -> list[str]:
    """Open (or get back, if open already) one session per sector; their ids."""
    host, port, path, tls = parse_ws_url(url)
    conn = MqttWsConnection(host, port, path, f"sim-setup-{secrets.token_hex(3)}", tls=tls)
    try:
        ids = []
        for sector in sectors:
            reply = conn.request_json(
                f"{prefix}/sessions/open", {"projectId": project, "sectorId": sector}, token
            )
            if reply.get("status") != "success":
                error = reply.get("error") or reply
                raise SimulationError(f"cannot open a session in sector {sector}: {error}")
            ids.append(str(reply["data"]["sessionId"]))
        return ids
    finally:
        conn.close()
