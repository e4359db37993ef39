"""Faults the gateway must survive with every record stored exactly once and answered:
SIGKILL, a database outage, a broker restart, a replica killed, a graceful stop, a backlog."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import asyncpg
import orjson

from gateway.simulate import MqttWsConnection, publish_packet, ws_frame
from tests.reliability.conftest import PrivateStack
from tests.support.devices import Device
from tests.support.procs import GatewayProcess
from tests.support.stream import RecordStream
from tests.support.tenants import Tenant, record


async def open_session(stack: PrivateStack, tenant: Tenant, sector: str | None = None) -> str:
    async with Device(
        "127.0.0.1", stack.broker.ws_port, stack.prefix, token=tenant.token()
    ) as device:
        reply = await device.request(
            "sessions/open", tenant.open_payload(**({"sectorId": sector} if sector else {}))
        )
    assert reply["status"] == "success", reply
    return str(reply["data"]["sessionId"])


async def streaming(
    stack: PrivateStack, name: str, records: int
) -> tuple[GatewayProcess, RecordStream]:
    """A gateway started and ready, a tenant's session, and a connected device stream of
    ``records`` records into it."""
    gateway = stack.gateway(name).start()
    await gateway.wait_ready()
    tenant = await stack.tenant()
    sid = await open_session(stack, tenant)
    stream = RecordStream(
        "127.0.0.1", stack.broker.ws_port, stack.prefix, tenant.token(), sid, records
    )
    await stream.connect()
    return gateway, stream


async def ledger(dsn: str, session_id: str) -> dict[str, Any]:
    """The ledger of a session next to its maintained totals."""
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            """SELECT count(*) AS stored,
                      count(DISTINCT (worker_id, client_event_id)) AS distinct_keys,
                      coalesce(sum(units), 0) AS units,
                      (SELECT total_units FROM production_sessions WHERE session_id = $1)
                          AS total_units,
                      (SELECT total_records FROM production_sessions WHERE session_id = $1)
                          AS total_records
               FROM production_records WHERE session_id = $1""",
            session_id,
        )
    finally:
        await conn.close()
    assert row is not None
    return dict(row)


async def assert_exactly_once(stack: PrivateStack, stream: RecordStream) -> None:
    got = await ledger(stack.dsn, stream.session_id)
    assert stream.failures() == []
    assert got["stored"] == len(stream.records) == got["distinct_keys"]
    assert got["units"] == stream.units == got["total_units"]
    assert got["total_records"] == len(stream.records)


async def metric(proc: GatewayProcess, name: str) -> float:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{proc.http_port}/metrics") as resp,
    ):
        text = await resp.text()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def correlation(msg: aiomqtt.Message) -> bytes:
    data = getattr(msg.properties, "CorrelationData", None)
    assert isinstance(data, bytes)
    return data


def children(pid: int) -> list[int]:
    """The pids of ``pid``'s child processes (Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


async def readyz(proc: GatewayProcess) -> int:
    try:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{proc.http_port}/readyz") as resp,
        ):
            return resp.status
    except aiohttp.ClientError:
        return 0


async def test_sigkill_mid_stream_loses_and_doubles_nothing(stack: PrivateStack) -> None:
    """3,000 QoS 1 records; the gateway SIGKILLed a third of the way; restarted: all once."""
    gateway, stream = await streaming(stack, "a", 3000)
    try:
        await stream.send(0, 1000)
        await stream.wait_for_replies(300)
        gateway.kill()  # no goodbye, no drain: whatever was in hand is lost from memory
        await stream.send(1000, 3000)  # the broker queues these for the gateway's session
        restarted = stack.gateway("a").start()
        await restarted.wait_ready()
        await stream.settle()
    finally:
        await stream.close()
    await assert_exactly_once(stack, stream)


async def test_database_outage_holds_requests_then_lands_them_once(stack: PrivateStack) -> None:
    """PostgreSQL stopped for ~10 s: /readyz 503, no reply, no spinning; then all land once."""
    gateway, stream = await streaming(stack, "db", 1200)
    try:
        await stream.send(0, 400)
        await stream.wait_for_replies(400)
        await asyncio.to_thread(stack.pg.stop)
        retries_before = await metric(gateway, "gateway_store_retries_total")
        await stream.send(400, 1200)
        statuses = []
        for _ in range(20):  # about ten seconds of outage
            statuses.append(await readyz(gateway))
            await asyncio.sleep(0.5)
        # the REST mirror answers 503 UNAVAILABLE meanwhile, saying when to come back
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"http://127.0.0.1:{gateway.http_port}/api/control/production/sessions/"
                f"{stream.session_id}",
                headers={"Authorization": f"Bearer {stream.token}"},
            ) as resp,
        ):
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "UNAVAILABLE"
            assert int(resp.headers["Retry-After"]) >= 1
        answered_during = stream.answered
        retries = await metric(gateway, "gateway_store_retries_total") - retries_before
        assert gateway.proc is not None and gateway.proc.poll() is None  # still running
        await asyncio.to_thread(stack.pg.start)
        await stream.settle()
    finally:
        await stream.close()
    assert 503 in statuses
    assert answered_during == 400  # nothing answered (so nothing acknowledged) while down
    assert 1 <= retries <= 30  # backoff, not a spin
    await assert_exactly_once(stack, stream)
    assert await readyz(gateway) == 200


async def test_a_gateway_waiting_for_the_database_is_alive_not_ready(stack: PrivateStack) -> None:
    """Started while PostgreSQL is down, the gateway waits for it, and meanwhile its sidecar
    answers: /healthz 200 (it did not answer at all: a liveness probe would restart it for
    waiting), /readyz 503, the REST mirror 503 UNAVAILABLE with Retry-After; once the database
    is back, the same port serves the real sidecar."""
    await asyncio.to_thread(stack.pg.stop)
    gateway = stack.gateway("early").start()
    base = f"http://127.0.0.1:{gateway.http_port}"
    async with aiohttp.ClientSession() as http:
        for _ in range(100):
            if "waiting for PostgreSQL" in gateway.log_path.read_text():
                break
            await asyncio.sleep(0.1)
        assert "waiting for PostgreSQL" in gateway.log_path.read_text()
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200
        assert await readyz(gateway) == 503
        async with http.get(f"{base}/api/control/production/sessions/x") as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "UNAVAILABLE"
            assert int(resp.headers["Retry-After"]) >= 1
        # a browser page too: its preflight is granted and it may read the 503 and Retry-After
        # (without CORS headers it saw only an opaque network failure)
        page = {"Origin": "https://dashboard.farm.example"}
        preflight = {**page, "Access-Control-Request-Method": "POST"}
        async with http.options(f"{base}/api/control/production/records", headers=preflight) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
        async with http.get(f"{base}/api/control/production/sessions/x", headers=page) as resp:
            assert resp.status == 503
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            assert "Retry-After" in resp.headers["Access-Control-Expose-Headers"]
        await asyncio.to_thread(stack.pg.start)
        await gateway.wait_ready()
        async with http.get(f"{base}/api/control/production/sessions/x") as resp:
            assert resp.status == 401  # the real mirror: it asks for a token
    assert gateway.proc is not None and gateway.proc.poll() is None


async def test_fast_shutdowns_mid_stream_answer_nothing_internal(stack: PrivateStack) -> None:
    """PostgreSQL fast-stopped (SIGINT) three times under a steady stream. Its FATAL reaches
    idle connections, and asyncpg then fails the next query with InternalClientError ("another
    operation is in progress") rather than a connection error: that is an outage too. No
    request may be answered INTERNAL (and so acknowledged, never to be redelivered)."""
    gateway, stream = await streaming(stack, "fast", 1500)
    try:
        sending = asyncio.create_task(stream.send(0, 1500, pause_every=5))
        for _ in range(3):
            await asyncio.sleep(0.4)
            await asyncio.to_thread(stack.pg.stop)
            await asyncio.sleep(0.3)
            await asyncio.to_thread(stack.pg.start)
        await sending
        await stream.settle()
    finally:
        await stream.close()
    assert [r["error"]["code"] for r in stream.failures()] == []
    await assert_exactly_once(stack, stream)
    assert await metric(gateway, 'gateway_refused_total{code="INTERNAL"}') == 0


async def test_a_hung_database_is_not_ready_at_once(stack: PrivateStack) -> None:
    """PostgreSQL stopped dead (SIGSTOP: connections stay open, nothing answers): /readyz said
    503 only after ~32 s (a cancelled ping waits for asyncpg's cancel request, which hangs too),
    longer than any probe waits. It answers 503 while the ping is out, 200 once it answers."""
    gateway = stack.gateway("hung").start()
    await gateway.wait_ready()
    tenant = await stack.tenant()
    sid = await open_session(stack, tenant)
    api = f"http://127.0.0.1:{gateway.http_port}/api/control/production"
    auth = {"Authorization": f"Bearer {tenant.token()}"}
    rest_timeout = aiohttp.ClientTimeout(total=40)
    assert stack.pg.pid is not None
    timeout = aiohttp.ClientTimeout(total=15)  # a generous probe; the ping gives up after 2 s
    url = f"http://127.0.0.1:{gateway.http_port}/readyz"
    # the postmaster and its backends (each one leads a process group of its own)
    hung = [stack.pg.pid, *children(stack.pg.pid)]
    for pid in hung:
        os.kill(pid, signal.SIGSTOP)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            for _ in range(3):  # the first ping is still out: the next probes say so too
                async with http.get(url) as resp:
                    assert resp.status == 503
                    assert (await resp.json())["checks"]["database"] is False
            # the REST mirror gives up on the database after 10 s (it waited a minute)
            for path in (f"sessions/{sid}", "records/check-idempotency?key=k"):
                async with http.get(f"{api}/{path}", headers=auth, timeout=rest_timeout) as resp:
                    assert resp.status == 503, path
                    assert (await resp.json())["error"]["code"] == "UNAVAILABLE"
    finally:
        for pid in hung:
            os.kill(pid, signal.SIGCONT)
    for _ in range(100):
        if await readyz(gateway) == 200:
            break
        await asyncio.sleep(0.2)
    assert await readyz(gateway) == 200


async def test_requests_queued_while_down_are_acknowledged_on_return(
    stack: PrivateStack,
) -> None:
    """Requests queued for a stopped gateway arrive with its CONNACK, in the same read. They
    were stamped with the old connection, so their PUBACKs were dropped: applied and answered,
    they came back at every later reconnect (an update re-applied, minutes later, over newer
    ones). Each must be answered once, however often the gateway restarts."""
    gateway = stack.gateway("resume").start()
    await gateway.wait_ready()
    tenant = await stack.tenant()
    sid = await open_session(stack, tenant)
    assert await gateway.terminate() == 0  # its persistent session stays with the broker
    async with (
        Device("127.0.0.1", stack.broker.ws_port, stack.prefix, token=tenant.token()) as device,
        # a reply topic outside the device's own subscription: each reply is delivered once
        device.watch(topic := f"{stack.prefix}/replies/{device.client_id}") as replies,
    ):
        path = f"sessions/{sid}/records"
        sent = [await device.send(path, record(), response_topic=topic) for _ in range(30)]
        answered: list[bytes] = []
        for _ in range(3):
            gateway = stack.gateway("resume").start()
            await gateway.wait_ready()
            # a request sent now is answered behind any redelivered one
            marker = await device.send(path, record(), response_topic=topic)
            sent.append(marker)
            while marker not in answered:
                answered.append(correlation(await asyncio.wait_for(replies.get(), 30)))
            await asyncio.sleep(0.5)  # and what might trail it
            while not replies.empty():
                answered.append(correlation(replies.get_nowait()))
            assert await gateway.terminate() == 0
    assert sorted(answered) == sorted(sent), "a request was answered again after a restart"
    got = await ledger(stack.dsn, sid)
    assert got["stored"] == len(sent) == got["total_records"]


async def test_broker_killed_and_restarted(stack: PrivateStack) -> None:
    """Mosquitto SIGKILLed mid-stream (it loses what arrived since its last autosave) and
    restarted: the gateway reconnects and carries on; devices re-send what was not answered."""
    gateway, stream = await streaming(stack, "mq", 2000)
    try:
        await stream.send(0, 800)
        await stream.wait_for_replies(200)
        await asyncio.to_thread(stack.broker.kill, signal.SIGKILL)
        await asyncio.to_thread(stack.broker.start)
        await stream.send(800, 2000)
        await stream.settle(timeout=120)
    finally:
        await stream.close()
    await assert_exactly_once(stack, stream)
    log = gateway.log_path.read_text()
    assert log.count("mqtt connected") >= 2  # it reconnected by itself
    assert await readyz(gateway) == 200


def retry_delays(log: str) -> list[float]:
    return [float(d) for d in re.findall(r"mqtt connection to .* retrying in ([0-9.]+) s", log)]


async def test_a_broker_down_for_a_while_is_retried_every_two_seconds_at_most(
    stack: PrivateStack,
) -> None:
    """Until the gateway is back and subscribed, mosquitto drops the devices' requests ("no
    matching subscribers": it does not restore shared subscriptions): the retries of a broker
    that is down stay short (they grew to 6.4 s and more, a window of lost requests)."""
    gateway = stack.gateway("down").start()
    await gateway.wait_ready()
    await asyncio.to_thread(stack.broker.stop)
    await asyncio.sleep(8)
    await asyncio.to_thread(stack.broker.start)
    for _ in range(150):
        if gateway.log_path.read_text().count("mqtt connected") >= 2:
            break
        await asyncio.sleep(0.1)
    log = gateway.log_path.read_text()
    assert log.count("mqtt connected") >= 2
    delays = retry_delays(log)
    assert len(delays) >= 4, delays
    assert max(delays) <= 2.0, delays
    for _ in range(50):
        if await readyz(gateway) == 200:
            break
        await asyncio.sleep(0.1)
    assert await readyz(gateway) == 200


async def test_a_client_id_taken_back_and_forth_backs_off_further(stack: PrivateStack) -> None:
    """Two processes with one client id throw each other off: each connection drops as soon as
    it is made, and the retries grow past the short ones of a broker that is down."""
    first = stack.gateway("twin").start()
    await first.wait_ready()
    second = stack.gateway("twin").start()
    await asyncio.sleep(12)
    delays = retry_delays(first.log_path.read_text() + second.log_path.read_text())
    assert delays and max(delays) > 2.0, delays


async def test_two_replicas_one_killed_and_restarted(stack: PrivateStack) -> None:
    """Two gateways share the load; one is SIGKILLed and restarted; records, events and
    expiry still happen exactly once."""
    a = stack.gateway("ra").start()
    b = stack.gateway("rb").start()
    await asyncio.gather(a.wait_ready(), b.wait_ready())
    tenant = await stack.tenant()
    sids = [await open_session(stack, tenant, s) for s in [tenant.sector_id, *tenant.extra_sectors]]
    streams = [
        RecordStream("127.0.0.1", stack.broker.ws_port, stack.prefix, tenant.token(), sid, 1500)
        for sid in sids[:2]
    ]
    for s in streams:
        await s.connect()
    try:
        await asyncio.gather(*(s.send(0, 500) for s in streams))
        await asyncio.gather(*(s.wait_for_replies(200) for s in streams))
        a.kill()
        await asyncio.gather(*(s.send(500, 1500) for s in streams))
        restarted = stack.gateway("ra").start()
        await restarted.wait_ready()
        await asyncio.gather(*(s.settle() for s in streams))
    finally:
        for s in streams:
            await s.close()
    for s in streams:
        await assert_exactly_once(stack, s)
    async with Device("127.0.0.1", stack.broker.ws_port, stack.prefix, token=tenant.token()) as d:
        for sid in sids[:2]:
            assert (await d.request(f"sessions/{sid}/close", {}))["status"] == "success"
    conn = await asyncpg.connect(stack.dsn)
    try:
        await conn.execute(
            "UPDATE production_sessions SET expires_at = now() - interval '1 minute', "
            "version = version + 1 WHERE session_id = $1",
            sids[2],
        )
        for _ in range(200):
            rows = await conn.fetch(
                "SELECT session_id, type, published_at FROM session_events "
                "WHERE session_id = ANY($1::text[]) AND type IN "
                "('session.closed', 'session.expired')",
                sids,
            )
            if len(rows) >= 3 and all(r["published_at"] is not None for r in rows):
                break
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    kinds = sorted((r["session_id"], r["type"]) for r in rows)
    assert kinds == sorted(
        [(sids[0], "session.closed"), (sids[1], "session.closed"), (sids[2], "session.expired")]
    )
    assert all(r["published_at"] is not None for r in rows)


async def test_sigterm_drains_and_announces_offline(stack: PrivateStack) -> None:
    """SIGTERM under load: the batch in hand is finished, offline published, exit 0 soon."""
    gateway, stream = await streaming(stack, "term", 1500)
    status: list[dict[str, Any]] = []
    watcher = Device("127.0.0.1", stack.broker.ws_port, stack.prefix)
    try:
        async with watcher, watcher.watch(f"{stack.prefix}/gateway/status") as statuses:
            await stream.send(0, 600)
            await stream.wait_for_replies(100)
            code = await gateway.terminate(timeout=30)
            with contextlib.suppress(TimeoutError):
                while True:
                    msg = await asyncio.wait_for(statuses.get(), 5)
                    status.append(orjson.loads(msg.payload))
                    if status[-1]["status"] == "offline":
                        break
        await stream.send(600, 1500)
        restarted = stack.gateway("term").start()
        await restarted.wait_ready()
        await stream.settle()
    finally:
        await stream.close()
    assert code == 0
    assert status and status[-1]["status"] == "offline"
    assert "finishing the batch in hand" in gateway.log_path.read_text()
    await assert_exactly_once(stack, stream)


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def test_backlog_of_100k_is_worked_through_with_flat_memory(stack: PrivateStack) -> None:
    """100,000 requests queued while the gateway was away: worked through, memory bounded."""
    first = stack.gateway("burst").start()
    await first.wait_ready()  # creates the persistent session and its subscriptions
    tenant = await stack.tenant()
    sid = await open_session(stack, tenant)
    assert await first.terminate() == 0
    total = int(os.environ.get("HYDROBIT_BURST", "100000"))
    conn = MqttWsConnection("127.0.0.1", stack.broker.ws_port, "/mqtt", "burst-device")
    topic = f"{stack.prefix}/sessions/{sid}/records"
    token = f"Bearer {tenant.token(ttl_s=7200)}"
    frames = []
    for i in range(total):
        rec = record(worker=f"W{i % 20}", event=f"burst-{i}", units=1)
        frames.append(
            publish_packet(
                topic,
                orjson.dumps(rec),
                packet_id=i % 60000 + 1,
                response_topic=f"{stack.prefix}/clients/burst-device/replies",
                correlation=str(i).encode(),
                authorization=token,
            )
        )
    for j in range(0, total, 250):  # pace by the broker's PUBACKs (its Receive Maximum)
        conn.sock.sendall(ws_frame(b"".join(frames[j : j + 250])))
        conn.unacked += len(frames[j : j + 250])
        while conn.unacked > 500:
            conn.read_replies()
    while conn.unacked > 0:  # every PUBACK in: the broker holds all of them
        conn.read_replies()
    conn.close()
    gateway = stack.gateway("burst").start()
    await gateway.wait_ready()
    assert gateway.proc is not None
    baseline = _rss_kib(gateway.proc.pid)
    peak = baseline
    db = await asyncpg.connect(stack.dsn)
    try:
        stored = 0
        for _ in range(1800):  # bounded: 180 s
            peak = max(peak, _rss_kib(gateway.proc.pid))
            stored = await db.fetchval(
                "SELECT count(*) FROM production_records WHERE session_id = $1", sid
            )
            if stored >= total:
                break
            await asyncio.sleep(0.1)
        totals = await db.fetchrow(
            "SELECT total_records, total_units FROM production_sessions WHERE session_id = $1",
            sid,
        )
    finally:
        await db.close()
    assert stored == total, gateway.log_path.read_text()[-3000:]
    assert totals is not None and totals["total_records"] == total == totals["total_units"]
    growth_mib = (peak - baseline) / 1024
    # ~33 MiB here: what the broker pushes while the gateway reads for its replies' PUBACKs
    # (mosquitto 2.0.11 ignores Receive Maximum), each request's topic, reply topic and token
    # shared with the others (copies made it ~62)
    assert growth_mib < 48, f"RSS grew {growth_mib:.0f} MiB while working through the backlog"
