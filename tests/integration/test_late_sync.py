"""GATEWAY_LATE_SYNC_GRACE_S: an offline device's records made while the session was open are
still accepted that long after it closed; nothing else is."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import asyncpg
import orjson

from gateway.core.models import CreateRecord
from gateway.core.rules import Limits
from gateway.errors import SessionExpired
from gateway.service import RecordAccepted, RecordRequest, Service, expiry_events
from gateway.store.postgres import PostgresStore
from tests.conftest import create_database, gateway_settings, running_gateway
from tests.support.devices import Device
from tests.support.servers import Servers
from tests.support.tenants import make_tenant, opened, record


def _at(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.000Z")


async def test_records_made_while_open_land_within_the_grace(
    servers: Servers,
) -> None:
    """After close: inside the window and within the grace accepted; outside refused. A
    database of its own: its gateway is then the one that publishes the retained state."""
    prefix = f"hb-grace-{secrets.token_hex(3)}/v2"
    database = await create_database(servers)
    store = await PostgresStore.connect(database, max_size=1)
    try:
        tenant = await make_tenant(store)
    finally:
        await store.close()
    settings = gateway_settings(servers, database, topic_prefix=prefix, late_sync_grace_s=3600)
    async with (
        running_gateway(settings),
        Device(servers.mqtt_host, servers.ws_port, prefix, token=tenant.token()) as device,
    ):
        opened_at = datetime.now(UTC) - timedelta(minutes=30)
        opened = await device.request("sessions/open", tenant.open_payload(openedAt=_at(opened_at)))
        sid = opened["data"]["sessionId"]
        made_while_open = record(recordedAtUtc=_at(opened_at + timedelta(minutes=5)))
        closed = await device.request(f"sessions/{sid}/close", {})
        assert closed["status"] == "success"
        state_topic = f"{prefix}/sessions/{sid}/state"
        await _closed_state_with_records(servers, state_topic, 0)
        await asyncio.sleep(1)  # the state publisher's low mark moves past the close
        late = await device.request(f"sessions/{sid}/records", made_while_open)
        assert late["status"] == "success", late
        assert late["data"]["idempotent"] is False
        made_after_close = record(recordedAtUtc=_at(datetime.now(UTC) + timedelta(seconds=5)))
        refused = await device.request(f"sessions/{sid}/records", made_after_close)
        assert refused["error"]["code"] == "SESSION_CLOSED"
        before_open = record(recordedAtUtc=_at(opened_at - timedelta(minutes=1)))
        refused = await device.request(f"sessions/{sid}/records", before_open)
        assert refused["error"]["code"] == "SESSION_CLOSED"
        got = (await device.request(f"sessions/{sid}/get", {}))["data"]
        state = await _closed_state_with_records(servers, state_topic, 1)
    assert got["status"] == "closed"
    assert got["totals"]["records"] == 1
    assert state["totals"]["units"] == got["totals"]["units"]


async def _closed_state_with_records(servers: Servers, topic: str, records: int) -> dict[str, Any]:
    """The retained state once it shows the session closed with ``records`` records: a late
    record moves a closed session's state too (its state_xid, which an open session's records
    leave alone), so the state publisher republishes it."""
    state: dict[str, Any] = {}
    for _ in range(60):
        async with aiomqtt.Client(
            servers.mqtt_host, servers.mqtt_port, protocol=aiomqtt.ProtocolVersion.V5
        ) as watcher:
            await watcher.subscribe(topic, qos=1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1):
                    async for msg in watcher.messages:
                        state = orjson.loads(msg.payload)
                        break
        if state.get("status") == "closed" and state["totals"]["records"] == records:
            return state
        await asyncio.sleep(0.1)
    raise AssertionError(f"retained state on {topic} never showed {records} records: {state}")


async def test_without_grace_a_closed_session_takes_nothing(
    device: Device, session_id: str
) -> None:
    """The seeds' rule (grace 0): even a record made while open is refused after close."""
    made_now = record()
    await device.request(f"sessions/{session_id}/close", {})
    reply = await device.request(f"sessions/{session_id}/records", made_now)
    assert reply["error"]["code"] == "SESSION_CLOSED"


async def test_a_record_that_arrived_before_the_deadline_lands_after_the_sweep(
    store: PostgresStore, database: str
) -> None:
    """Under load a record may wait its turn while the sweeper closes its session as expired
    (closedAt = the deadline). It arrived while the session was open: judged on arrival time
    (SPEC §5), it is stored, without any grace; one arriving at the deadline is refused."""
    tenant = await make_tenant(store)
    service = Service(store, Limits())
    who = tenant.principal()
    now = datetime.now(UTC)
    sid = await opened(service, who, tenant.open_payload(), now)
    deadline = now + timedelta(minutes=1)  # ahead of the real clock: no other sweeper gets it
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(
            "UPDATE production_sessions SET expires_at = $2 WHERE session_id = $1", sid, deadline
        )
    finally:
        await conn.close()
    service.session_changed(sid)
    swept = await store.expire_due(deadline + timedelta(seconds=1), lambda s: expiry_events(s, now))
    assert sid in {s.session_id for s in swept}

    def create(arrival: datetime) -> RecordRequest:
        cmd = CreateRecord.model_validate(record(recordedAtUtc=_at(now)))
        return RecordRequest(who, cmd, sid, arrival)

    early, late = await service.create_records(
        [create(deadline - timedelta(milliseconds=1)), create(deadline)]
    )
    assert isinstance(early, RecordAccepted) and not early.idempotent, early
    assert isinstance(late, SessionExpired), late
    session = await service.get_session(who, sid)
    assert session["status"] == "closed" and session["totals"]["records"] == 1
