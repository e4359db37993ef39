"""What a real gateway sends fits the published schemas: every reply, event, state and status.

Each request sent is checked against its request schema too: a schema-valid request is applied,
a schema-invalid one refused, so the schemas and the gateway agree in both directions.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson

from gateway.app import Gateway
from gateway.wireschema import MESSAGES
from tests.conftest import PREFIX, gateway_settings, running_gateway
from tests.core.test_wireschema import assert_fits, problems
from tests.integration.test_events_state import Watcher, make_due
from tests.support.devices import Device, LegacyDevice
from tests.support.servers import Servers
from tests.support.tenants import Tenant, record


class Wire:
    """A device whose every request and reply is checked against the schemas."""

    def __init__(self, device: Device) -> None:
        self.device = device
        self.checked: set[str] = set()  # the reply schemas replies were checked against

    async def ask(
        self, op: str, suffix: str, payload: dict[str, Any] | bytes, *, valid: bool = True
    ) -> dict[str, Any]:
        """Send ``payload`` to ``suffix``: it fits ``op``'s request schema exactly when
        ``valid``, one that does not is refused, and the reply fits ``op``'s reply schema."""
        if isinstance(payload, dict):
            assert (not problems(f"{op}.request", payload)) is valid, (op, payload)
        reply = await self.device.request(suffix, payload)
        assert_fits(f"{op}.reply", reply)
        if reply["status"] == "error":
            assert_fits("error.reply", reply)
            self.checked.add("error.reply")
        if not valid:
            assert reply["status"] == "error", reply
        self.checked.add(f"{op}.reply")
        return reply


def _success(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["status"] == "success", reply
    return reply


def _error(reply: dict[str, Any], code: str) -> dict[str, Any]:
    assert reply["status"] == "error", reply
    assert reply["error"]["code"] == code, reply
    return reply


async def test_every_reply_event_and_state_fits_its_schema(
    servers: Servers, device: Device, tenant: Tenant, gateway: Gateway
) -> None:
    """Open, create + replay, bulk, get/update/extend, record get, void, check, errors, close:
    each reply, each session event and the retained state validate."""
    wire = Wire(device)
    async with Watcher(servers, f"{PREFIX}/sessions/+/events") as events:
        opened = _success(
            await wire.ask("sessions.open", "sessions/open", tenant.open_payload(requestId="o-1"))
        )
        assert opened["requestId"] == "o-1"
        sid = opened["data"]["sessionId"]
        again = _success(await wire.ask("sessions.open", "sessions/open", tenant.open_payload()))
        assert again["data"]["idempotent"] is True

        first = record(requestId=7, idempotencyKey=f"key-{secrets.token_hex(4)}")
        created = _success(await wire.ask("records.create", f"sessions/{sid}/records", first))
        assert created["requestId"] == 7 and created["data"]["idempotent"] is False
        replay = _success(await wire.ask("records.create", f"sessions/{sid}/records", first))
        assert replay["data"]["idempotent"] is True
        rid = created["data"]["recordId"]

        bulk = {
            "records": [
                {**record(), "sessionId": sid},  # ok
                {**first, "sessionId": sid},  # duplicated
                {**record(units=-1), "sessionId": sid},  # failed: units
                record(),  # failed: no sessionId
            ]
        }
        # the request fits as a whole only without its bad items
        assert problems("records.bulk.request", bulk)
        assert_fits("records.bulk.request", {"records": bulk["records"][:2]})
        bulked = await wire.device.request("records/bulk", bulk)
        assert_fits("records.bulk.reply", bulked)
        assert bulked["summary"] == {"ok": 1, "duplicated": 1, "failed": 2}, bulked
        assert [r["status"] for r in bulked["results"]] == ["ok", "duplicated", "failed", "failed"]

        _success(await wire.ask("sessions.get", f"sessions/{sid}/get", {}))
        _success(await wire.ask("sessions.update", f"sessions/{sid}/update", {"notes": "sunny"}))
        _success(
            await wire.ask(
                "sessions.update",
                f"sessions/{sid}/update",
                {"bonus": {"type": "fixed", "value": 20}, "pricePerUnit": 6, "samplingUnit": "kg"},
            )
        )
        _success(
            await wire.ask("sessions.extend", f"sessions/{sid}/extend", {"maxDurationHours": 14})
        )

        _success(await wire.ask("records.get", f"records/{rid}/get", {}))
        why = {"reason": "Duplicate entry"}
        voided = _success(await wire.ask("records.void", f"records/{rid}/void", why))
        revoid = _success(await wire.ask("records.void", f"records/{rid}/void", why))
        assert revoid["data"]["idempotent"] is True
        void_id = voided["data"]["recordId"]
        got = _success(await wire.ask("records.get", f"records/{rid}/get", {}))
        assert got["data"]["state"] == "voided"
        counter = _success(await wire.ask("records.get", f"records/{void_id}/get", {}))
        assert counter["data"]["kind"] == "void"

        key = f"client:{sid}:{first['workerId']}:{first['clientEventId']}"
        for k, exists in ((key, True), (first["idempotencyKey"], True), ("no-such-key", False)):
            found = await wire.ask(
                "records.check-idempotency", "records/check-idempotency", {"key": k}
            )
            assert _success(found)["data"] == {"key": k, "exists": exists}

        # refusals: each reply is an error reply of its operation's schema
        records = f"sessions/{sid}/records"
        _error(
            await wire.ask("records.create", records, record(units=-1), valid=False),
            "VALIDATION_ERROR",
        )
        missing = {k: v for k, v in record().items() if k != "workerId"}
        refused = await wire.ask("records.create", records, missing, valid=False)
        assert _error(refused, "VALIDATION_ERROR")["clientEventId"] == missing["clientEventId"]
        _error(
            await wire.ask(
                "sessions.update", f"sessions/{sid}/update", {"projectId": "x"}, valid=False
            ),
            "VALIDATION_ERROR",
        )
        _error(await wire.ask("sessions.get", "sessions/nope/get", {}), "NOT_FOUND")
        _error(await wire.ask("records.get", "records/rec_nope/get", {}), "NOT_FOUND")
        _error(await wire.ask("records.create", records, b"not json"), "VALIDATION_ERROR")
        _error(
            await wire.ask("records.create", records, {**first, "units": 9}),
            "IDEMPOTENCY_CONFLICT",
        )

        closed = _success(await wire.ask("sessions.close", f"sessions/{sid}/close", {}))
        assert closed["data"]["status"] == "closed"
        _error(await wire.ask("records.create", records, record()), "SESSION_CLOSED")
        _error(
            await wire.ask("sessions.extend", f"sessions/{sid}/extend", {"maxDurationHours": 20}),
            "SESSION_CLOSED",
        )
        after = _success(await wire.ask("sessions.get", f"sessions/{sid}/get", {}))
        assert after["data"]["closeReason"] == "closed"

        await events.wait_for(lambda p: p["sessionId"] == sid and p["type"] == "session.closed")
        mine = [p for p in events.payloads() if p["sessionId"] == sid]
    for event in mine:
        assert_fits("sessions.events", event)
    assert [e["type"] for e in mine] == [
        "session.opened",
        "session.updated",
        "session.updated",
        "session.extended",
        "record.voided",
        "session.closed",
    ]
    wire.checked.add("records.bulk.reply")
    assert wire.checked == {m.name for m in MESSAGES if m.name.endswith(".reply")}

    state = await _retained_state(servers, sid, lambda s: s["status"] == "closed")
    assert_fits("sessions.state", state)
    assert state["totals"]["voided"] == 1


async def test_an_expired_session_and_a_legacy_device_fit(
    servers: Servers,
    device: Device,
    legacy_device: LegacyDevice,
    tenant: Tenant,
    gateway: Gateway,
    database: str,
) -> None:
    """The expiry event and its state; an MQTT 3.1.1 device's envelope in the payload."""
    open_payload = tenant.open_payload(sectorId=tenant.extra_sectors[0], requestId=1.5)
    opened = await legacy_device.request("sessions/open", open_payload)
    envelope = {"authorization": f"Bearer {legacy_device.token}", "replyTo": "t/r"}
    assert_fits("sessions.open.request", {**open_payload, **envelope})
    assert_fits("sessions.open.reply", opened)
    sid = opened["data"]["sessionId"]
    payload = record(requestId="legacy-1")
    assert_fits("records.create.request", {**payload, **envelope})
    created = await legacy_device.request(f"sessions/{sid}/records", payload)
    assert_fits("records.create.reply", created)
    assert created["status"] == "success" and created["requestId"] == "legacy-1"

    async with Watcher(servers, f"{PREFIX}/sessions/{sid}/events") as events:
        conn = await asyncpg.connect(database)
        try:
            await make_due(conn, [sid])
        finally:
            await conn.close()
        assert gateway.sweeper is not None
        gateway.sweeper.nudge()
        expired = await events.wait_for(lambda p: p["type"] == "session.expired")
    assert_fits("sessions.events", expired[0])
    refused = await Wire(device).ask("records.create", f"sessions/{sid}/records", record())
    _error(refused, "SESSION_EXPIRED")
    state = await _retained_state(servers, sid, lambda s: s.get("closeReason") == "expired")
    assert_fits("sessions.state", state)


async def test_gateway_status_online_and_offline_fit(servers: Servers, database: str) -> None:
    """The retained status, online on start and offline on a clean stop, fits its schema."""
    prefix = f"hb-schema-{secrets.token_hex(3)}/v2"
    settings = gateway_settings(servers, database, topic_prefix=prefix)
    async with Watcher(servers, f"{prefix}/gateway/status") as ops:
        async with running_gateway(settings):
            online = await ops.wait_for(lambda p: p["status"] == "online")
        offline = await ops.wait_for(lambda p: p["status"] == "offline")
    for status in (*online, *offline):
        assert_fits("gateway.status", status)


async def _retained_state(
    servers: Servers, session_id: str, ready: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The retained state of a session once ``ready(state)`` (states are coalesced)."""
    topic = f"{PREFIX}/sessions/{session_id}/state"
    state: dict[str, Any] = {}
    for _ in range(100):
        async with Watcher(servers, topic) as late:
            for _ in range(20):
                if late.messages:
                    break
                await asyncio.sleep(0.05)
            retained = [m for m in late.messages if m.retain]
            if retained:
                state = orjson.loads(retained[-1].payload)
                if ready(state):
                    return state
        await asyncio.sleep(0.1)
    raise AssertionError(f"no retained state for {session_id} that is ready: {state}")
