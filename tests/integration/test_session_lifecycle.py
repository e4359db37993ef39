"""Sessions over MQTT: get, update, close, extend, expiry, with the seeds' rules and shapes."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from gateway.app import Gateway
from tests.integration.test_events_state import Watcher
from tests.support.devices import Device
from tests.support.extra_helpers import execute
from tests.support.servers import Servers
from tests.support.tenants import Tenant, record

PREFIX = "hydrobit/v2"


async def _other_device(servers: Servers, token: str) -> Device:
    return await Device(servers.mqtt_host, servers.ws_port, PREFIX, token=token).__aenter__()


async def _force_deadline(database: str, session_id: str, when: datetime) -> None:
    """Move a session's deadline (as if it had been opened long ago)."""
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(
            """UPDATE production_sessions
               SET opened_at = $2::timestamptz - interval '1 hour', max_duration_hours = 1,
                   expires_at = $2, version = version + 1
               WHERE session_id = $1""",
            session_id,
            when,
        )
    finally:
        await conn.close()


async def test_full_lifecycle(device: Device, tenant: Tenant, session_id: str) -> None:
    """Open, record, update, extend, get, close: every reply has the seeds' shape."""
    base = f"sessions/{session_id}"
    rec = await device.request(f"{base}/records", record(units=8))
    assert rec["status"] == "success"

    upd = await device.request(
        f"{base}/update",
        {
            "samplingUnit": "kg",
            "pricePerUnit": 6,
            "bonus": {"type": "fixed", "value": 10, "note": "weekend"},
            "notes": "Updated notes",
            "sessionId": session_id,
            "auth0Id": tenant.user,
        },
    )
    assert upd == {"status": "success", "data": {"updated": True}}

    ext = await device.request(f"{base}/extend", {"maxDurationHours": 18})
    assert ext == {"status": "success", "data": {"maxDurationHours": 18}}

    got = (await device.request(f"{base}/get", {}))["data"]
    assert got["samplingUnit"] == "kg"
    assert got["pricePerUnit"] == 6
    assert got["bonus"] == {"type": "fixed", "value": 10, "note": "weekend"}
    assert got["notes"] == "Updated notes"
    assert got["maxDurationHours"] == 18
    assert got["totals"]["units"] == 8
    assert got["totals"]["amount"] == 8 * 6 + 10  # fixed bonus added once
    assert got["totals"]["byWorker"]["JS0315"] == {"units": 8, "records": 1, "voided": 0}

    closed = await device.request(f"{base}/close", {})
    assert closed["status"] == "success"
    assert closed["data"]["sessionId"] == session_id
    assert closed["data"]["status"] == "closed"
    assert closed["data"]["closedAt"].endswith("Z")

    after = (await device.request(f"{base}/get", {}))["data"]
    assert after["status"] == "closed"
    assert after["closedAt"] == closed["data"]["closedAt"]
    assert after["closeReason"] == "closed"


async def test_closed_session_refuses_changes_and_records(device: Device, session_id: str) -> None:
    """After close, changes and new records get SESSION_CLOSED; replays still answer."""
    base = f"sessions/{session_id}"
    rec = record()
    first = await device.request(f"{base}/records", rec)
    await device.request(f"{base}/close", {})
    cases: list[tuple[str, dict[str, Any]]] = [
        ("update", {"notes": "late"}),
        ("close", {}),
        ("extend", {"maxDurationHours": 20}),
        ("records", record()),
    ]
    for suffix, payload in cases:
        reply = await device.request(f"{base}/{suffix}", payload)
        assert reply["status"] == "error", (suffix, reply)
        assert reply["error"]["code"] == "SESSION_CLOSED", (suffix, reply)
    replay = await device.request(f"{base}/records", rec)
    assert replay["data"]["idempotent"] is True
    assert replay["data"]["recordId"] == first["data"]["recordId"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"status": "closed"}, "status"),
        ({"maxDurationHours": 30}, "maxDurationHours"),
        ({"projectId": "proj_x"}, "projectId"),
        ({"pricePerUnit": "6"}, "pricePerUnit"),
        ({"pricePerUnit": -1}, "pricePerUnit"),
        ({"bonus": {"type": "double", "value": 1}}, "bonus.type"),
        ({"samplingUnit": 5}, "samplingUnit"),
        ({"sessionId": "someone-else"}, "sessionId"),
    ],
)
async def test_update_refuses_other_fields_and_wrong_types(
    device: Device, session_id: str, payload: dict[str, Any], field: str
) -> None:
    """Only samplingUnit, pricePerUnit, bonus, notes may change; nothing changes otherwise."""
    before = (await device.request(f"sessions/{session_id}/get", {}))["data"]
    reply = await device.request(f"sessions/{session_id}/update", payload)
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "VALIDATION_ERROR"
    assert field in reply["error"]["message"]
    after = (await device.request(f"sessions/{session_id}/get", {}))["data"]
    assert after == before


async def test_empty_update_is_refused(device: Device, session_id: str) -> None:
    """An update with no updatable field says which fields may be sent."""
    reply = await device.request(f"sessions/{session_id}/update", {})
    assert reply["error"]["code"] == "VALIDATION_ERROR"
    assert "samplingUnit" in reply["error"]["message"]


@pytest.mark.parametrize(
    ("op", "payload", "field"),
    [
        ("close", {"closedAt": "2026-12-01T13:00:00Z"}, "closedAt"),
        ("close", {"notes": "rain stopped picking"}, "notes"),
        ("extend", {"maxDurationHours": 20, "notes": "long day"}, "notes"),
    ],
)
async def test_close_and_extend_refuse_what_they_would_drop(
    device: Device, session_id: str, op: str, payload: dict[str, Any], field: str
) -> None:
    """A backdated closedAt or a note sent with a close or an extend is refused, naming the
    field, and nothing changes (it would otherwise be dropped under a success reply)."""
    before = (await device.request(f"sessions/{session_id}/get", {}))["data"]
    reply = await device.request(f"sessions/{session_id}/{op}", payload)
    assert reply["status"] == "error", reply
    assert reply["error"]["code"] == "VALIDATION_ERROR"
    assert reply["error"]["details"]["fields"][0]["field"] == field
    after = (await device.request(f"sessions/{session_id}/get", {}))["data"]
    assert after == before
    assert after["status"] == "open"


@pytest.mark.parametrize("hours", [12, 6, 49, 1000, "20", None, True])
async def test_extend_must_raise_within_the_limit(
    device: Device, session_id: str, hours: object
) -> None:
    """Extend refuses lowering, equal, over GATEWAY_MAX_SESSION_HOURS and ill-typed values."""
    reply = await device.request(f"sessions/{session_id}/extend", {"maxDurationHours": hours})
    assert reply["status"] == "error", reply
    assert reply["error"]["code"] == "VALIDATION_ERROR"
    got = (await device.request(f"sessions/{session_id}/get", {}))["data"]
    assert got["maxDurationHours"] == 12


async def test_only_the_owner_may_act(
    servers: Servers, device: Device, tenant: Tenant, session_id: str
) -> None:
    """A colleague gets FORBIDDEN for every session operation; nothing changes."""
    other = await _other_device(servers, tenant.token(tenant.other_user))
    try:
        cases: list[tuple[str, dict[str, Any]]] = [
            ("get", {}),
            ("update", {"notes": "mine now"}),
            ("extend", {"maxDurationHours": 20}),
            ("close", {}),
            ("records", record()),
        ]
        for suffix, payload in cases:
            reply = await other.request(f"sessions/{session_id}/{suffix}", payload)
            assert reply["error"]["code"] == "FORBIDDEN", (suffix, reply)
    finally:
        await other.__aexit__()
    got = (await device.request(f"sessions/{session_id}/get", {}))["data"]
    assert got["status"] == "open"
    assert got["notes"] is None
    assert got["totals"]["records"] == 0


async def test_another_company_sees_nothing(servers: Servers, store: Any, session_id: str) -> None:
    """Another company's user gets NOT_FOUND: the session does not exist for them."""
    from tests.support.tenants import make_tenant

    stranger = await make_tenant(store)
    other = await _other_device(servers, stranger.token())
    try:
        for suffix, payload in [("get", {}), ("close", {}), ("records", record())]:
            reply = await other.request(f"sessions/{session_id}/{suffix}", payload)
            assert reply["error"]["code"] == "NOT_FOUND", (suffix, reply)
    finally:
        await other.__aexit__()


async def test_auth0_id_must_match_the_token(device: Device, session_id: str) -> None:
    """An auth0Id in the payload that is not the token's subject is FORBIDDEN."""
    reply = await device.request(f"sessions/{session_id}/close", {"auth0Id": "user_mallory"})
    assert reply["error"]["code"] == "FORBIDDEN"
    got = (await device.request(f"sessions/{session_id}/get", {}))["data"]
    assert got["status"] == "open"


async def test_unknown_session(device: Device) -> None:
    """Every session operation on an unknown id is NOT_FOUND."""
    for suffix in ("get", "update", "close", "extend"):
        payload: dict[str, Any] = {"notes": "x"} if suffix == "update" else {}
        if suffix == "extend":
            payload = {"maxDurationHours": 20}
        reply = await device.request(f"sessions/000000000000000000000000/{suffix}", payload)
        assert reply["error"]["code"] == "NOT_FOUND", (suffix, reply)


async def test_expired_session_refuses_records_and_is_closed_at_its_deadline(
    device: Device, gateway: Gateway, database: str, session_id: str
) -> None:
    """Past its deadline: records refused; the sweeper closes it with closedAt = deadline."""
    deadline = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
    await _force_deadline(database, session_id, deadline)
    reply = await device.request(f"sessions/{session_id}/records", record())
    assert reply["error"]["code"] == "SESSION_EXPIRED"
    assert gateway.sweeper is not None
    gateway.sweeper.nudge()
    for _ in range(100):
        got = (await device.request(f"sessions/{session_id}/get", {}))["data"]
        if got["status"] == "closed":
            break
        await asyncio.sleep(0.05)
    assert got["status"] == "closed"
    assert got["closeReason"] == "expired"
    assert got["closedAt"] == deadline.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    again = await device.request(f"sessions/{session_id}/records", record())
    assert again["error"]["code"] == "SESSION_EXPIRED"
    close = await device.request(f"sessions/{session_id}/close", {})
    assert close["error"]["code"] == "SESSION_EXPIRED"


async def test_get_past_the_deadline_shows_the_session_expired(
    servers: Servers, device: Device, database: str, session_id: str
) -> None:
    """A get between the deadline and the sweeper's next round does not show "open" a session
    that refuses records as expired: it is closed as expired then, and announced once."""
    deadline = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    async with Watcher(servers, f"{PREFIX}/sessions/{session_id}/events") as ops:
        await _force_deadline(database, session_id, deadline)
        got = (await device.request(f"sessions/{session_id}/get", {}))["data"]
        assert got["status"] == "closed"
        assert got["closeReason"] == "expired"
        assert got["closedAt"] == deadline.strftime("%Y-%m-%dT%H:%M:%S.000Z")
        again = (await device.request(f"sessions/{session_id}/get", {}))["data"]
        assert again == got
        await ops.wait_for(lambda p: p["type"] == "session.expired")
        await asyncio.sleep(0.3)  # a second announcement would be here by now
    assert [p["type"] for p in ops.payloads()].count("session.expired") == 1


async def test_close_of_an_expired_session_closes_it_as_expired(
    device: Device, database: str, session_id: str
) -> None:
    """A change on an open-but-expired session is refused and the session closed as expired."""
    deadline = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    await _force_deadline(database, session_id, deadline)
    reply = await device.request(f"sessions/{session_id}/extend", {"maxDurationHours": 20})
    assert reply["error"]["code"] == "SESSION_EXPIRED"
    got = (await device.request(f"sessions/{session_id}/get", {}))["data"]
    assert got["status"] == "closed"
    assert got["closeReason"] == "expired"


async def test_extend_revives_a_session_before_its_deadline(
    device: Device, database: str, session_id: str
) -> None:
    """Extending before the deadline moves it: records are accepted past the old one."""
    soon = datetime.now(UTC) + timedelta(seconds=2)
    await _force_deadline(database, session_id, soon)
    reply = await device.request(f"sessions/{session_id}/extend", {"maxDurationHours": 3})
    assert reply["data"] == {"maxDurationHours": 3}
    got = (await device.request(f"sessions/{session_id}/get", {}))["data"]
    assert got["expiresAt"] > soon.strftime("%Y-%m-%dT%H:%M:%S")
    rec = await device.request(f"sessions/{session_id}/records", record())
    assert rec["status"] == "success"


@pytest.mark.parametrize("price", [1.0000000000000002, 123456789.123456789, 5.549999999999999])
async def test_price_is_kept_alike_on_open_and_on_update(
    device: Device, tenant: Tenant, price: float
) -> None:
    """A price with more digits than PostgreSQL keeps is stored the same way whether it came
    with the open or with an update (it was 17 digits one way and 15 the other)."""
    sector = tenant.extra_sectors[0]
    opened = await device.request(
        "sessions/open", tenant.open_payload(sectorId=sector, pricePerUnit=price)
    )
    assert opened["status"] == "success", opened
    sid = opened["data"]["sessionId"]
    try:
        on_open = (await device.request(f"sessions/{sid}/get", {}))["data"]["pricePerUnit"]
        await device.request(f"sessions/{sid}/update", {"pricePerUnit": 7})
        updated = await device.request(f"sessions/{sid}/update", {"pricePerUnit": price})
        assert updated["status"] == "success", updated
        on_update = (await device.request(f"sessions/{sid}/get", {}))["data"]["pricePerUnit"]
    finally:
        await device.request(f"sessions/{sid}/close", {})
    assert on_open == on_update == float(f"{price:.15g}")


# --- sessions edited by hand in SQL (migration 005) ----------------------------------------------


async def _session_row(database: str, session_id: str) -> asyncpg.Record:
    conn = await asyncpg.connect(database)
    try:
        row = await conn.fetchrow(
            """SELECT status, close_reason, closed_at, expires_at,
                      opened_at + make_interval(secs => max_duration_hours * 3600) AS deadline,
                      (SELECT count(*) FROM session_events e
                       WHERE e.session_id = s.session_id AND e.type = 'session.expired') AS expired
               FROM production_sessions s WHERE session_id = $1""",
            session_id,
        )
    finally:
        await conn.close()
    assert row is not None
    return row


async def test_a_session_moved_back_in_sql_expires_at_its_new_deadline(
    device: Device, session_id: str, database: str
) -> None:
    """Moving only opened_at back by hand (an operator's correction, a checker simulating
    time): expires_at follows, so the record path and the sweeper agree. Records are refused
    SESSION_EXPIRED, the session closes at the new deadline (not the old one, in the future),
    announced once, and nothing is stored after it."""
    topic = f"sessions/{session_id}/records"
    assert (await device.request(topic, record()))["status"] == "success"  # facts now cached
    await execute(
        database,
        "UPDATE production_sessions SET opened_at = opened_at - interval '13 hours' "
        "WHERE session_id = $1",
        session_id,
    )
    refused = await device.request(topic, record())
    assert refused["error"]["code"] == "SESSION_EXPIRED", refused
    for _ in range(150):
        row = await _session_row(database, session_id)
        if row["status"] == "closed":
            break
        await asyncio.sleep(0.1)
    assert (row["status"], row["close_reason"]) == ("closed", "expired")
    assert row["closed_at"] == row["expires_at"] == row["deadline"]
    assert row["closed_at"] < datetime.now(UTC)
    assert row["expired"] == 1
    again = await device.request(topic, record())
    assert again["error"]["code"] == "SESSION_EXPIRED", again
    got = await device.request(f"sessions/{session_id}/get", {})
    assert got["data"]["totals"]["records"] == 1, got


async def test_a_session_closed_in_sql_refuses_records_at_once(
    device: Device, session_id: str, database: str
) -> None:
    """A session closed by hand (status only, no version bump) while gateways cache it open:
    the next record is refused SESSION_CLOSED, not stored into the closed session."""
    topic = f"sessions/{session_id}/records"
    assert (await device.request(topic, record()))["status"] == "success"
    await execute(
        database,
        "UPDATE production_sessions SET status = 'closed', close_reason = 'closed', "
        "closed_at = now() WHERE session_id = $1",
        session_id,
    )
    refused = await device.request(topic, record())
    assert refused["error"]["code"] == "SESSION_CLOSED", refused
    got = await device.request(f"sessions/{session_id}/get", {})
    assert got["data"]["status"] == "closed"
    assert got["data"]["totals"]["records"] == 1, got
