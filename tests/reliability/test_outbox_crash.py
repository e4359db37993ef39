"""A gateway killed between committing an event and publishing it: delayed, not lost."""

from __future__ import annotations

import secrets
from pathlib import Path

import asyncpg
import orjson

from gateway.publisher import LEADER_LOCK_KEY
from gateway.store.postgres import PostgresStore
from tests.conftest import create_database
from tests.integration.test_events_state import Watcher
from tests.support.devices import Device
from tests.support.procs import GatewayProcess
from tests.support.servers import Servers
from tests.support.tenants import make_tenant


async def test_event_committed_before_a_crash_is_published_after_restart(
    servers: Servers, tmp_path: Path
) -> None:
    """SIGKILL after commit, before publish; the restarted gateway publishes the same event."""
    database = await create_database(servers)
    prefix = f"hb-crash-{secrets.token_hex(3)}/v2"
    store = await PostgresStore.connect(database, max_size=2)
    try:
        tenant = await make_tenant(store)
    finally:
        await store.close()
    settings = {
        "database_url": database,
        "mqtt_url": servers.mqtt_url,
        "topic_prefix": prefix,
        "mqtt_client_id": f"gw-crash-{secrets.token_hex(3)}",
    }
    # Hold the publisher's leader lock: the first gateway commits events but cannot publish,
    # which is exactly the state a crash between commit and publish leaves behind.
    blocker = await asyncpg.connect(database)
    await blocker.execute("SELECT pg_advisory_lock($1)", LEADER_LOCK_KEY)
    first = GatewayProcess(tmp_path / "first.log", **settings).start()
    try:
        await first.wait_ready()
        async with Device(servers.mqtt_host, servers.ws_port, prefix, token=tenant.token()) as d:
            opened = await d.request("sessions/open", tenant.open_payload())
        sid = opened["data"]["sessionId"]
        row = await blocker.fetchrow(
            "SELECT event_id, published_at FROM session_events WHERE session_id = $1", sid
        )
        assert row is not None
        assert row["published_at"] is None
        first.kill()
    finally:
        first.close()
    await blocker.execute("SELECT pg_advisory_unlock($1)", LEADER_LOCK_KEY)
    await blocker.close()

    async with Watcher(servers, f"{prefix}/sessions/{sid}/events") as ops:
        second = GatewayProcess(tmp_path / "second.log", **settings).start()
        try:
            await second.wait_ready()
            got = await ops.wait_for(lambda p: p["type"] == "session.opened", timeout=20)
        finally:
            assert await second.terminate() == 0
    assert got[0]["eventId"] == row["event_id"]
    conn = await asyncpg.connect(database)
    try:
        published = await conn.fetchval(
            "SELECT published_at FROM session_events WHERE event_id = $1", row["event_id"]
        )
    finally:
        await conn.close()
    assert published is not None


async def test_sigkilled_gateway_leaves_offline_status_by_its_will(
    servers: Servers, database: str, tmp_path: Path
) -> None:
    """The broker publishes the MQTT will (offline, retained) when a gateway dies unannounced."""
    prefix = f"hb-will-{secrets.token_hex(3)}/v2"
    proc = GatewayProcess(
        tmp_path / "gw.log",
        database_url=database,
        mqtt_url=servers.mqtt_url,
        topic_prefix=prefix,
        mqtt_client_id=f"gw-will-{secrets.token_hex(3)}",
        mqtt_keepalive_s=5,
    ).start()
    try:
        async with Watcher(servers, f"{prefix}/gateway/status") as ops:
            await proc.wait_ready()
            await ops.wait_for(lambda p: p["status"] == "online")
            proc.kill()
            offline = await ops.wait_for(lambda p: p["status"] == "offline", timeout=30)
    finally:
        proc.close()
    assert offline[-1]["instance"].startswith("gw-will-")
    # the will says what it is, as the online status and every other publish do
    will = [m for m in ops.messages if orjson.loads(m.payload)["status"] == "offline"][-1]
    assert will.properties is not None
    assert getattr(will.properties, "ContentType", None) == "application/json"
    assert getattr(will.properties, "PayloadFormatIndicator", None) == 1
