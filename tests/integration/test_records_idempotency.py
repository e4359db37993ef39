"""Record idempotency (SPEC §5 "Record"): replays answer the original, conflicts change nothing,
concurrent duplicates land once, and the session totals always equal the ledger."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.store.postgres import PostgresStore
from tests.conftest import PREFIX, gateway_settings, running_gateway
from tests.support.devices import Device
from tests.support.extra_helpers import fetch, iso_ms
from tests.support.servers import Servers
from tests.support.tenants import Tenant, make_tenant, record


def success(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["status"] == "success", reply
    data: dict[str, Any] = reply["data"]
    return data


def conflict(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["status"] == "error", reply
    error: dict[str, Any] = reply["error"]
    assert error["code"] == "IDEMPOTENCY_CONFLICT", reply
    return error


async def ledger(database: str, session_id: str) -> list[Any]:
    return await fetch(
        database,
        """SELECT record_id, worker_id, worker_name, units, recorded_at, client_event_id,
                  idempotency_key, kind, state
           FROM production_records WHERE session_id = $1 ORDER BY created_at, record_id""",
        session_id,
    )


async def assert_totals_match_ledger(device: Device, database: str, session_id: str) -> None:
    """sessions/{id}/get totals equal what production_records holds for the session."""
    totals = success(await device.request(f"sessions/{session_id}/get", {}))["totals"]
    rows = await ledger(database, session_id)
    units = sum((Decimal(r["units"]) for r in rows), Decimal(0))
    records = sum(1 for r in rows if r["kind"] == "record")
    voided = sum(1 for r in rows if r["state"] == "voided")
    workers = len(
        {r["worker_id"] for r in rows if r["kind"] == "record" and r["state"] != "voided"}
    )
    assert Decimal(str(totals["units"])) == units, (totals, rows)
    assert totals["records"] == records, (totals, rows)
    assert totals["voided"] == voided, (totals, rows)
    assert totals["workers"] == workers, (totals, rows)
    by_worker = totals.get("byWorker")
    if by_worker is not None:
        for worker, wt in by_worker.items():
            mine = [r for r in rows if r["worker_id"] == worker]
            assert Decimal(str(wt["units"])) == sum(
                (Decimal(r["units"]) for r in mine), Decimal(0)
            ), (worker, wt, mine)


def batches_handled(gw: Gateway) -> int:
    """How many request batches a gateway has applied (from its /metrics text)."""
    for line in gw.metrics.render().splitlines():
        if line.startswith("gateway_batch_size_count "):
            return int(float(line.split()[1]))
    raise AssertionError("gateway_batch_size_count is missing from the metrics")


def instant(minutes_ago: int = 1) -> datetime:
    return (datetime.now(UTC) - timedelta(minutes=minutes_ago)).replace(microsecond=250_000)


async def test_replay_with_equivalent_content_is_idempotent(
    device: Device, session_id: str, database: str
) -> None:
    """5 vs 5.0 and the same instant with another offset are the same content: a replay."""
    at = instant()
    first_payload = record(units=5, recordedAtUtc=iso_ms(at))
    first = success(await device.request(f"sessions/{session_id}/records", first_payload))
    assert first["idempotent"] is False
    assert first["payloadPreview"]["units"] == 5
    assert first["payloadPreview"]["recordedAtUtc"] == iso_ms(at)

    variants: list[dict[str, Any]] = [
        {"units": 5.0},
        {"recordedAtUtc": at.astimezone(timezone(timedelta(hours=5, minutes=30))).isoformat()},
        {"recordedAtUtc": at.astimezone(timezone(timedelta(hours=-6))).isoformat()},
        {"recordedAtUtc": at.strftime("%Y-%m-%dT%H:%M:%S.250000+00:00")},
        {"units": 5.0, "recordedAtUtc": at.strftime("%Y-%m-%dT%H:%M:%S.250+00:00")},
        {"requestId": "another-request"},
    ]
    for change in variants:
        payload = {**first_payload, **change}
        reply = await device.request(f"sessions/{session_id}/records", payload)
        data = success(reply)
        assert data["idempotent"] is True, (change, reply)
        assert data["recordId"] == first["recordId"], (change, reply)
        assert data["payloadPreview"] == first["payloadPreview"], (change, reply)
        assert reply["clientEventId"] == first_payload["clientEventId"]
    rows = await ledger(database, session_id)
    assert [r["record_id"] for r in rows] == [first["recordId"]]
    await assert_totals_match_ledger(device, database, session_id)


async def test_units_default_to_one(device: Device, session_id: str, database: str) -> None:
    """A record without units counts 1; its replay with units 1 is the same content."""
    payload = record()
    del payload["units"]
    first = success(await device.request(f"sessions/{session_id}/records", payload))
    assert first["payloadPreview"]["units"] == 1
    again = success(await device.request(f"sessions/{session_id}/records", {**payload, "units": 1}))
    assert again["idempotent"] is True
    assert again["recordId"] == first["recordId"]
    await assert_totals_match_ledger(device, database, session_id)


@pytest.mark.parametrize(
    "change",
    [
        pytest.param({"units": 6}, id="units"),
        pytest.param({"units": 5.0001}, id="units-slightly"),
        pytest.param({"worker_name": "Jane Smith"}, id="worker_name"),
        pytest.param({"recordedAtUtc": "shift"}, id="recordedAtUtc"),
        pytest.param({"idempotencyKey": "added-later"}, id="idempotencyKey-added"),
    ],
)
async def test_same_client_event_with_other_content_is_a_conflict(
    device: Device, session_id: str, database: str, change: dict[str, Any]
) -> None:
    """The same clientEventId (same worker) with different content: IDEMPOTENCY_CONFLICT."""
    at = instant()
    first_payload = record(units=5, recordedAtUtc=iso_ms(at))
    first = success(await device.request(f"sessions/{session_id}/records", first_payload))
    totals_before = success(await device.request(f"sessions/{session_id}/get", {}))["totals"]
    if change.get("recordedAtUtc") == "shift":
        change = {"recordedAtUtc": iso_ms(at + timedelta(milliseconds=1))}
    reply = await device.request(f"sessions/{session_id}/records", {**first_payload, **change})
    error = conflict(reply)
    assert reply["clientEventId"] == first_payload["clientEventId"]
    assert error["message"]
    totals_after = success(await device.request(f"sessions/{session_id}/get", {}))["totals"]
    assert totals_after == totals_before
    rows = await ledger(database, session_id)
    assert [r["record_id"] for r in rows] == [first["recordId"]]
    assert Decimal(rows[0]["units"]) == 5
    # the original still replays
    again = success(await device.request(f"sessions/{session_id}/records", first_payload))
    assert again["idempotent"] is True
    assert again["recordId"] == first["recordId"]
    await assert_totals_match_ledger(device, database, session_id)


async def test_same_client_event_for_another_worker_is_another_record(
    device: Device, session_id: str, database: str
) -> None:
    """The key is client:{sessionId}:{workerId}:{clientEventId}: another worker, another record."""
    event = f"evt_{secrets.token_hex(6)}"
    a = success(await device.request(f"sessions/{session_id}/records", record("W1", event)))
    b = success(await device.request(f"sessions/{session_id}/records", record("W2", event)))
    assert a["idempotent"] is False
    assert b["idempotent"] is False
    assert a["recordId"] != b["recordId"]
    assert len(await ledger(database, session_id)) == 2
    await assert_totals_match_ledger(device, database, session_id)


async def test_idempotency_key_names_its_record(
    device: Device, tenant: Tenant, session_id: str, database: str
) -> None:
    """A stored idempotencyKey names its record: same content replays, other content conflicts."""
    key = f"mobile-app-key-{secrets.token_hex(6)}"
    at = instant()
    first_payload = record(units=3, recordedAtUtc=iso_ms(at), idempotencyKey=key)
    first = success(await device.request(f"sessions/{session_id}/records", first_payload))
    assert first["idempotent"] is False
    assert first["payloadPreview"].get("idempotencyKey") == key

    # a new clientEventId, same key, same content: the first record, idempotent
    replay = {**first_payload, "clientEventId": f"evt_{secrets.token_hex(6)}"}
    again = success(await device.request(f"sessions/{session_id}/records", replay))
    assert again["idempotent"] is True
    assert again["recordId"] == first["recordId"]

    # a new clientEventId, same key, other content: a conflict
    for change in ({"units": 4}, {"worker_name": "Someone Else"}, {"workerId": "OTHER1"}):
        other = {**first_payload, "clientEventId": f"evt_{secrets.token_hex(6)}", **change}
        conflict(await device.request(f"sessions/{session_id}/records", other))

    rows = await ledger(database, session_id)
    assert [r["record_id"] for r in rows] == [first["recordId"]]
    await assert_totals_match_ledger(device, database, session_id)


async def test_an_idempotency_key_shaped_like_another_records_key_is_refused(
    device: Device, session_id: str, database: str
) -> None:
    """The check reads client:... as a client key: an idempotencyKey of that form naming another
    record would make it answer "stored" for a record never sent. Refused, nothing stored; the
    record's own client key, a key merely starting with 'client:', and ':' in ids are fine."""
    reply = await device.request(
        f"sessions/{session_id}/records",
        record(worker="W7", event="e1", idempotencyKey=f"client:{session_id}:W7:never1"),
    )
    assert reply["status"] == "error", reply
    assert reply["error"]["code"] == "VALIDATION_ERROR", reply
    assert await ledger(database, session_id) == []
    check = await device.request(
        "records/check-idempotency", {"key": f"client:{session_id}:W7:never1"}
    )
    assert success(check)["exists"] is False
    badge, event = "04:A3:2B:9F", "evt:2025-10-19T08:00:00Z"
    own = f"client:{session_id}:{badge}:{event}"
    for payload in (
        record(worker=badge, event=event, idempotencyKey=own),
        record(worker=badge, idempotencyKey="client:app7-000123"),
    ):
        stored = success(await device.request(f"sessions/{session_id}/records", payload))
        assert stored["idempotent"] is False
    assert success(await device.request("records/check-idempotency", {"key": own}))["exists"]


async def test_the_client_key_is_unique_as_spelled_with_colons_inside_ids(
    device: Device, session_id: str, database: str
) -> None:
    """Worker 'a:b' with event 'c' and worker 'a' with event 'b:c' spell one key,
    client:{session}:a:b:c: the second is a conflict, so the check names one record only
    (a device told "stored" must not drop a count that never was)."""
    tag = secrets.token_hex(3)
    original = record(worker=f"{tag}:b", event="c", units=2)
    first = success(await device.request(f"sessions/{session_id}/records", original))
    reply = await device.request(
        f"sessions/{session_id}/records", record(worker=tag, event="b:c", units=9)
    )
    assert conflict(reply)["details"]["key"] == f"client:{session_id}:{tag}:b:c", reply
    rows = await ledger(database, session_id)
    assert [r["record_id"] for r in rows] == [first["recordId"]]
    again = success(await device.request(f"sessions/{session_id}/records", original))
    assert (again["recordId"], again["idempotent"]) == (first["recordId"], True)


async def test_idempotency_key_is_unique_per_company_not_per_session(
    device: Device, tenant: Tenant, session_id: str, database: str
) -> None:
    """The same idempotencyKey in another session of the company makes no second record."""
    key = f"mobile-app-key-{secrets.token_hex(6)}"
    first = success(
        await device.request(f"sessions/{session_id}/records", record(idempotencyKey=key))
    )
    other_session = success(
        await device.request("sessions/open", tenant.open_payload(sectorId=tenant.extra_sectors[0]))
    )["sessionId"]
    reply = await device.request(
        f"sessions/{other_session}/records", record(units=7, idempotencyKey=key)
    )
    conflict(reply)
    rows = await fetch(
        database,
        "SELECT record_id FROM production_records WHERE company_id = $1 AND idempotency_key = $2",
        tenant.company_id,
        key,
    )
    assert [r["record_id"] for r in rows] == [first["recordId"]]
    assert await ledger(database, other_session) == []
    # the same content (a new clientEventId) re-sent into the owner's other session is the
    # stored record: SPEC §5's "same content" has no sessionId in it
    same = record(units=3, idempotencyKey=f"{key}-b")
    stored = success(await device.request(f"sessions/{session_id}/records", same))
    replay = success(
        await device.request(
            f"sessions/{other_session}/records", {**same, "clientEventId": "evt_resend_1"}
        )
    )
    assert (replay["recordId"], replay["idempotent"]) == (stored["recordId"], True)
    assert replay["payloadPreview"]["sessionId"] == session_id
    assert await ledger(database, other_session) == []


async def test_idempotency_key_of_another_company_is_independent(
    servers: Servers, device: Device, session_id: str, store: PostgresStore, database: str
) -> None:
    """Another company may use the same idempotencyKey: keys are unique per company."""
    key = f"mobile-app-key-{secrets.token_hex(6)}"
    mine = success(
        await device.request(f"sessions/{session_id}/records", record(idempotencyKey=key))
    )
    other = await make_tenant(store)
    async with Device(
        servers.mqtt_host, servers.ws_port, PREFIX, token=other.token()
    ) as their_device:
        sid = success(await their_device.request("sessions/open", other.open_payload()))[
            "sessionId"
        ]
        theirs = success(
            await their_device.request(f"sessions/{sid}/records", record(idempotencyKey=key))
        )
    assert theirs["idempotent"] is False
    assert theirs["recordId"] != mine["recordId"]


async def test_concurrent_identical_records_land_once(
    device: Device, session_id: str, database: str
) -> None:
    """20 identical records published at once: one ledger row, every reply names it."""
    payload = record(units=5)
    replies = await asyncio.gather(
        *(device.request(f"sessions/{session_id}/records", payload) for _ in range(20))
    )
    datas = [success(r) for r in replies]
    assert {d["recordId"] for d in datas} == {datas[0]["recordId"]}
    assert sorted(d["idempotent"] for d in datas) == [False] + [True] * 19
    rows = await ledger(database, session_id)
    assert [r["record_id"] for r in rows] == [datas[0]["recordId"]]
    await assert_totals_match_ledger(device, database, session_id)
    totals = success(await device.request(f"sessions/{session_id}/get", {}))["totals"]
    assert totals["units"] == 5
    assert totals["records"] == 1


async def test_concurrent_identical_records_from_two_devices_land_once(
    servers: Servers, device: Device, tenant: Tenant, session_id: str, database: str
) -> None:
    """The same records from two connections at once (a device and its retry path): once each."""
    payloads = [record(worker=f"W{i % 3}", units=i + 1) for i in range(10)]
    async with Device(servers.mqtt_host, servers.ws_port, PREFIX, token=tenant.token()) as twin:
        replies = await asyncio.gather(
            *(
                d.request(f"sessions/{session_id}/records", p)
                for p in payloads
                for d in (device, twin, device, twin)
            )
        )
    by_event: dict[str, set[str]] = {}
    fresh = 0
    for r in replies:
        data = success(r)
        by_event.setdefault(r["clientEventId"], set()).add(data["recordId"])
        fresh += data["idempotent"] is False
    assert all(len(ids) == 1 for ids in by_event.values()), by_event
    assert fresh == len(payloads)
    rows = await ledger(database, session_id)
    assert len(rows) == len(payloads)
    assert {r["client_event_id"] for r in rows} == {p["clientEventId"] for p in payloads}
    await assert_totals_match_ledger(device, database, session_id)
    totals = success(await device.request(f"sessions/{session_id}/get", {}))["totals"]
    assert totals["units"] == sum(range(1, 11))
    assert totals["workers"] == 3


async def test_concurrent_identical_records_across_two_gateways_land_once(
    servers: Servers, store: PostgresStore, database: str
) -> None:
    """Two gateway replicas sharing the load race on one key: PostgreSQL keeps one row."""
    prefix = f"hb-race-{secrets.token_hex(3)}/v2"
    tenant = await make_tenant(store)
    group = f"race{secrets.token_hex(3)}"
    settings = [
        gateway_settings(servers, database, topic_prefix=prefix, share_group=group)
        for _ in range(2)
    ]
    async with (
        running_gateway(settings[0]) as gw_a,
        running_gateway(settings[1]) as gw_b,
        Device(servers.mqtt_host, servers.ws_port, prefix, token=tenant.token()) as d1,
        Device(servers.mqtt_host, servers.ws_port, prefix, token=tenant.token()) as d2,
    ):
        sid = success(await d1.request("sessions/open", tenant.open_payload()))["sessionId"]
        payload = record(units=2.5)
        replies = await asyncio.gather(
            *(d.request(f"sessions/{sid}/records", payload) for _ in range(10) for d in (d1, d2))
        )
        datas = [success(r) for r in replies]
        assert {d["recordId"] for d in datas} == {datas[0]["recordId"]}
        assert sorted(d["idempotent"] for d in datas) == [False] + [True] * 19
        # both replicas took part (the broker deals a shared subscription round-robin)
        assert batches_handled(gw_a) > 0
        assert batches_handled(gw_b) > 0
        rows = await ledger(database, sid)
        assert [r["record_id"] for r in rows] == [datas[0]["recordId"]]
        await assert_totals_match_ledger(d1, database, sid)


async def test_totals_equal_the_ledger_after_mixed_traffic(
    device: Device, session_id: str, database: str
) -> None:
    """After new records, replays, conflicts and refusals, totals equal the ledger's sums."""
    sent: list[dict[str, Any]] = []
    for i in range(12):
        p = record(worker=f"W{i % 4}", units=[0, 1, 2.5, 10, 0.25][i % 5])
        sent.append(p)
        success(await device.request(f"sessions/{session_id}/records", p))
    for p in sent[:5]:  # replays
        assert success(await device.request(f"sessions/{session_id}/records", p))["idempotent"]
    for p in sent[5:8]:  # conflicts
        conflict(
            await device.request(
                f"sessions/{session_id}/records", {**p, "units": float(p["units"]) + 1}
            )
        )
    for p in sent[8:10]:  # refusals
        reply = await device.request(
            f"sessions/{session_id}/records", {**p, "clientEventId": "x", "units": -1}
        )
        assert reply["status"] == "error", reply
    await assert_totals_match_ledger(device, database, session_id)
    data = success(await device.request(f"sessions/{session_id}/get", {}))
    expected_units = sum(Decimal(str(p["units"])) for p in sent)
    assert Decimal(str(data["totals"]["units"])) == expected_units
    assert data["totals"]["records"] == 12
    assert data["totals"]["workers"] == 4
    # amount = net units x pricePerUnit x (1 + 10/100) (the project's percent bonus)
    expected_amount = expected_units * Decimal("5.5") * Decimal("1.1")
    assert abs(Decimal(str(data["totals"]["amount"])) - expected_amount) < Decimal("0.001")


async def test_totals_equal_the_ledger_after_a_void(
    device: Device, session_id: str, database: str
) -> None:
    """A void's counter-movement keeps totals equal to the ledger (net units, voided count)."""
    ids = []
    for units, worker in ((4, "W1"), (6, "W2"), (1.5, "W2")):
        data = success(
            await device.request(
                f"sessions/{session_id}/records", record(worker=worker, units=units)
            )
        )
        ids.append(data["recordId"])
    voided = await device.request(f"records/{ids[0]}/void", {"reason": "Duplicate entry"})
    assert voided["status"] == "success", voided
    await assert_totals_match_ledger(device, database, session_id)
    totals = success(await device.request(f"sessions/{session_id}/get", {}))["totals"]
    assert Decimal(str(totals["units"])) == Decimal("7.5")
    assert totals["records"] == 3
    assert totals["voided"] == 1
    assert totals["workers"] == 1


async def test_replay_after_close_is_still_idempotent(
    device: Device, session_id: str, database: str
) -> None:
    """Replays are answered before the open-session check: after close, the original comes back."""
    payload = record(units=2)
    first = success(await device.request(f"sessions/{session_id}/records", payload))
    closed = await device.request(f"sessions/{session_id}/close", {})
    assert closed["status"] == "success", closed
    again = success(await device.request(f"sessions/{session_id}/records", payload))
    assert again["idempotent"] is True
    assert again["recordId"] == first["recordId"]
    new = await device.request(f"sessions/{session_id}/records", record())
    assert new["status"] == "error", new
    assert new["error"]["code"] == "SESSION_CLOSED"
    assert len(await ledger(database, session_id)) == 1
    await assert_totals_match_ledger(device, database, session_id)


@pytest.mark.parametrize("units", [0.1 + 0.2, 1.2345678901234567, 1e-7, 12345.678901234567])
async def test_units_with_more_digits_than_stored_replay_and_preview_as_stored(
    device: Device, session_id: str, database: str, units: float
) -> None:
    """Units beyond 15 significant digits: the preview shows what was stored (what a get and
    the totals show), and the exact same request again is a replay, not a conflict."""
    payload = record(units=units)
    first = success(await device.request(f"sessions/{session_id}/records", payload))
    again = success(await device.request(f"sessions/{session_id}/records", payload))
    assert again["idempotent"] is True, again
    assert again["recordId"] == first["recordId"]
    assert again["payloadPreview"] == first["payloadPreview"]
    shown = first["payloadPreview"]["units"]  # sending back what the reply showed: a replay
    echo = success(
        await device.request(f"sessions/{session_id}/records", {**payload, "units": shown})
    )
    assert echo["idempotent"] is True, (units, shown)
    assert echo["recordId"] == first["recordId"]
    got = await device.request(f"records/{first['recordId']}/get", {})
    assert got["data"]["units"] == first["payloadPreview"]["units"]
    rows = await ledger(database, session_id)
    stored = next(r["units"] for r in rows if r["record_id"] == first["recordId"])
    assert Decimal(str(first["payloadPreview"]["units"])) == stored


async def test_recorded_at_beyond_milliseconds_replays_as_shown(
    device: Device, session_id: str
) -> None:
    """A time sent with microseconds is kept, and shown, to the millisecond: sending back the
    time a reply showed is a replay (it was a conflict, inviting a second, paid, record)."""
    payload = record(recordedAtUtc="2026-01-02T03:04:05.123456Z")
    first = success(await device.request(f"sessions/{session_id}/records", payload))
    shown = first["payloadPreview"]["recordedAtUtc"]
    assert shown == "2026-01-02T03:04:05.123Z"
    for sent in (shown, "2026-01-02T03:04:05.1239Z", payload["recordedAtUtc"]):
        again = success(
            await device.request(
                f"sessions/{session_id}/records", {**payload, "recordedAtUtc": sent}
            )
        )
        assert again["idempotent"] is True, sent
        assert again["recordId"] == first["recordId"]
