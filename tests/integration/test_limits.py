"""Limits: the per-user rate limit answers RATE_LIMITED (never drops), sizes and depth refused."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import asyncpg

from gateway.store.postgres import PostgresStore
from tests.conftest import gateway_settings, running_gateway
from tests.support.devices import Device, LegacyDevice
from tests.support.servers import Servers
from tests.support.tenants import make_tenant, record


async def test_rate_limit_answers_every_request(
    servers: Servers, database: str, store: PostgresStore
) -> None:
    """Past the burst, requests get RATE_LIMITED with retryAfterS; none goes unanswered."""
    prefix = f"hb-rate-{secrets.token_hex(3)}/v2"
    tenant = await make_tenant(store)
    settings = gateway_settings(
        servers, database, topic_prefix=prefix, rate_limit_per_s=2, rate_limit_burst=5
    )
    async with (
        running_gateway(settings),
        Device(servers.mqtt_host, servers.ws_port, prefix, token=tenant.token()) as device,
    ):
        opened = await device.request("sessions/open", tenant.open_payload())
        sid = opened["data"]["sessionId"]
        records = [record(units=1) for _ in range(20)]
        replies: list[dict[str, Any]] = await asyncio.gather(
            *(device.request(f"sessions/{sid}/records", r) for r in records)
        )
        ok = [r for r in replies if r["status"] == "success"]
        limited = [r for r in replies if r["status"] == "error"]
        assert len(replies) == 20
        assert 1 <= len(ok) <= 6
        assert limited
        assert all(r["error"]["code"] == "RATE_LIMITED" for r in limited)
        assert all(r["error"]["details"]["retryAfterS"] > 0 for r in limited)
        # the device retries what was refused, later: everything lands once
        refused = [
            r for r, reply in zip(records, replies, strict=True) if reply["status"] == "error"
        ]
        for _ in range(60):
            if not refused:
                break
            await asyncio.sleep(0.5)
            retry = await device.request(f"sessions/{sid}/records", refused[0])
            if retry["status"] == "success":
                refused.pop(0)
        assert not refused
    conn = await asyncpg.connect(database)
    try:
        stored = await conn.fetchval(
            "SELECT count(*) FROM production_records WHERE session_id = $1", sid
        )
        dead = await conn.fetchval(
            "SELECT count(*) FROM dead_letters WHERE reason = 'RATE_LIMITED' AND topic = $1",
            f"{prefix}/sessions/{sid}/records",
        )
    finally:
        await conn.close()
    assert stored == 20
    assert dead >= len(limited)


async def test_deep_json_long_strings_and_big_bulks_are_refused(
    device: Device, session_id: str
) -> None:
    """Nesting past GATEWAY_MAX_JSON_DEPTH, over-long ids and over-size bulks are refused."""
    deep: Any = "x"
    for _ in range(40):
        deep = {"k": deep}
    reply = await device.request(f"sessions/{session_id}/records", {**record(), "extra": deep})
    assert reply["error"]["code"] == "VALIDATION_ERROR"
    assert "deeper" in reply["error"]["message"]
    long_id = record(workerId="W" * 129)
    reply = await device.request(f"sessions/{session_id}/records", long_id)
    assert reply["error"]["code"] == "VALIDATION_ERROR"
    assert reply["error"]["details"]["fields"][0]["field"] == "workerId"
    long_notes = {"notes": "n" * 2001}
    reply = await device.request(f"sessions/{session_id}/update", long_notes)
    assert reply["error"]["code"] == "VALIDATION_ERROR"


async def test_too_deep_payload_is_answered_where_the_device_listens(
    legacy_device: LegacyDevice, session_id: str
) -> None:
    """Too deep is refused, but it parsed: an MQTT 3.1.1 device gets the refusal on its
    replyTo, with its requestId, not on <topic>/reply where it does not listen."""
    deep: Any = "x"
    for _ in range(40):
        deep = {"k": deep}
    reply = await legacy_device.request(
        f"sessions/{session_id}/records", {**record(), "extra": deep, "requestId": "deep-1"}
    )
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "VALIDATION_ERROR"
    assert "deeper" in reply["error"]["message"]
    assert reply["requestId"] == "deep-1"
