"""Records complete: bulk offline sync, void, get, the MQTT idempotency check, dead letters."""

from __future__ import annotations

import asyncio
import os
import sys
import zlib
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import orjson

from gateway.app import Gateway
from gateway.store.postgres import PostgresStore
from tests.integration.test_events_state import Watcher
from tests.support.devices import Device
from tests.support.servers import Servers
from tests.support.tenants import JWT_SECRET, Tenant, make_tenant, record

PREFIX = "hydrobit/v2"


async def ledger(database: str, session_id: str) -> tuple[Decimal, int, int, int]:
    """(net units, records, voided, counter-movements) straight from the ledger."""
    conn = await asyncpg.connect(database)
    try:
        row = await conn.fetchrow(
            """SELECT coalesce(sum(units), 0) AS units,
                      count(*) FILTER (WHERE kind = 'record') AS records,
                      count(*) FILTER (WHERE state = 'voided') AS voided,
                      count(*) FILTER (WHERE kind = 'void') AS voids
               FROM production_records WHERE session_id = $1""",
            session_id,
        )
    finally:
        await conn.close()
    assert row is not None
    return row["units"], row["records"], row["voided"], row["voids"]


async def totals(device: Device, session_id: str) -> dict[str, Any]:
    reply = await device.request(f"sessions/{session_id}/get", {})
    assert reply["status"] == "success", reply
    result: dict[str, Any] = reply["data"]["totals"]
    return result


async def assert_totals_match_ledger(device: Device, database: str, session_id: str) -> None:
    t = await totals(device, session_id)
    units, records, voided, _ = await ledger(database, session_id)
    assert Decimal(str(t["units"])) == units
    assert t["records"] == records
    assert t["voided"] == voided


async def test_bulk_with_new_duplicate_invalid_and_foreign_records(
    servers: Servers, device: Device, tenant: Tenant, session_id: str, database: str
) -> None:
    """Each record of a bulk is judged on its own; the reply lists every one and sums them up."""
    existing = record(units=2, sessionId=session_id)
    assert (await device.request(f"sessions/{session_id}/records", existing))["status"] == "success"
    other = Device(
        servers.mqtt_host, servers.ws_port, PREFIX, token=tenant.token(tenant.other_user)
    )
    async with other:
        foreign = (
            await other.request(
                "sessions/open", tenant.open_payload(sectorId=tenant.extra_sectors[0])
            )
        )["data"]["sessionId"]
    closed = (
        await device.request("sessions/open", tenant.open_payload(sectorId=tenant.extra_sectors[1]))
    )["data"]["sessionId"]
    await device.request(f"sessions/{closed}/close", {})
    fresh = record(units=3, sessionId=session_id)
    items: list[Any] = [
        fresh,  # 0 ok
        existing,  # 1 duplicated (stored before)
        dict(fresh),  # 2 duplicated (same bulk)
        {**record(sessionId=session_id), "workerId": None},  # 3 failed: validation
        record(sessionId=foreign),  # 4 failed: another user's session
        record(sessionId="000000000000000000000000"),  # 5 failed: unknown session
        record(sessionId=closed),  # 6 failed: closed
        {**existing, "units": 7},  # 7 failed: same key, other content
        "not an object",  # 8 failed
        record(),  # 9 failed: no sessionId
        record(units=4.5, sessionId=session_id),  # 10 ok
        {**record(sessionId=session_id), "auth0Id": tenant.other_user},  # 11 failed: not the sub
        {**record(units=0.5, sessionId=session_id), "auth0Id": tenant.user},  # 12 ok: the token's
    ]
    reply = await device.request("records/bulk", {"records": items, "requestId": "bulk-1"})
    assert reply["status"] == "success", reply
    assert reply["requestId"] == "bulk-1"
    results = reply["results"]
    assert [r["index"] for r in results] == list(range(len(items)))
    statuses = [r["status"] for r in results]
    assert statuses == ["ok", "duplicated", "duplicated"] + ["failed"] * 7 + ["ok", "failed", "ok"]
    codes = [r.get("error", {}).get("code") for r in results]
    assert codes[3:10] == [
        "VALIDATION_ERROR",
        "FORBIDDEN",
        "NOT_FOUND",
        "SESSION_CLOSED",
        "IDEMPOTENCY_CONFLICT",
        "VALIDATION_ERROR",
        "VALIDATION_ERROR",
    ]
    assert codes[11] == "FORBIDDEN"
    assert results[1]["recordId"] != results[0]["recordId"]
    assert results[2]["recordId"] == results[0]["recordId"]
    assert results[0]["clientEventId"] == fresh["clientEventId"]
    assert reply["summary"] == {"ok": 3, "duplicated": 2, "failed": 8}
    t = await totals(device, session_id)
    assert t["units"] == 2 + 3 + 4.5 + 0.5
    assert t["records"] == 4
    await assert_totals_match_ledger(device, database, session_id)


async def test_bulk_of_a_thousand_across_sessions_then_replayed(
    device: Device, tenant: Tenant, database: str
) -> None:
    """1000 buffered counts in one bulk land once; the same bulk again is all duplicates."""
    sids = []
    for sector in [tenant.sector_id, *tenant.extra_sectors]:
        opened = await device.request("sessions/open", tenant.open_payload(sectorId=sector))
        sids.append(opened["data"]["sessionId"])
    items = [
        record(worker=f"W{i % 17:02d}", units=1 + i % 3, sessionId=sids[i % 3]) for i in range(1000)
    ]
    first = await device.request("records/bulk", {"records": items}, timeout=60)
    assert first["summary"] == {"ok": 1000, "duplicated": 0, "failed": 0}
    again = await device.request("records/bulk", {"records": items}, timeout=60)
    assert again["summary"] == {"ok": 0, "duplicated": 1000, "failed": 0}
    assert [r["recordId"] for r in again["results"]] == [r["recordId"] for r in first["results"]]
    expected = sum(1 + i % 3 for i in range(1000))
    got = 0.0
    for sid in sids:
        await assert_totals_match_ledger(device, database, sid)
        t = await totals(device, sid)
        assert t["workers"] == 17
        got += t["units"]
    assert got == expected


async def test_bulk_over_the_limit_is_refused_whole(
    device: Device, session_id: str, database: str
) -> None:
    """1001 records is one VALIDATION_ERROR naming the limit; nothing is stored."""
    items = [record(sessionId=session_id) for _ in range(1001)]
    reply = await device.request("records/bulk", {"records": items})
    assert reply["status"] == "error"
    assert reply["error"]["code"] == "VALIDATION_ERROR"
    assert reply["error"]["details"] == {"limit": 1000, "count": 1001}
    assert (await ledger(database, session_id))[1] == 0


async def test_bulk_needs_a_list_of_records(device: Device) -> None:
    """A bulk without a records array is refused."""
    for payload in ({}, {"records": {"a": 1}}, {"records": "x"}, {"records": None}):
        reply = await device.request("records/bulk", payload)
        assert reply["error"]["code"] == "VALIDATION_ERROR", payload


async def test_void_writes_a_counter_movement_and_moves_totals(
    servers: Servers, device: Device, session_id: str, database: str
) -> None:
    """Void: negative counter-movement, original voided, totals net, event, replay idempotent."""
    keep = await device.request(f"sessions/{session_id}/records", record(worker="A", units=4))
    gone = await device.request(f"sessions/{session_id}/records", record(worker="B", units=6))
    rid = gone["data"]["recordId"]
    async with Watcher(servers, f"{PREFIX}/sessions/{session_id}/events") as ops:
        void = await device.request(f"records/{rid}/void", {"reason": "Duplicate entry"})
        assert void["status"] == "success", void
        data = void["data"]
        assert data["idempotent"] is False
        assert data["voidedRecordId"] == rid
        assert data["payloadPreview"]["units"] == -6
        assert data["payloadPreview"]["reason"] == "Duplicate entry"
        event = await ops.wait_for(lambda p: p["type"] == "record.voided")
    assert event[0]["data"]["recordId"] == rid
    assert event[0]["data"]["voidRecordId"] == data["recordId"]

    t = await totals(device, session_id)
    assert t["units"] == 4
    assert t["records"] == 2
    assert t["voided"] == 1
    assert t["workers"] == 1  # B has no record left that is not voided
    assert t["byWorker"]["B"] == {"units": 0, "records": 1, "voided": 1}
    assert (await ledger(database, session_id)) == (Decimal(4), 2, 1, 1)

    again = await device.request(f"records/{rid}/void", {"reason": "again"})
    assert again["data"]["idempotent"] is True
    assert again["data"]["recordId"] == data["recordId"]
    assert (await ledger(database, session_id)) == (Decimal(4), 2, 1, 1)

    got = (await device.request(f"records/{rid}/get", {}))["data"]
    assert got["state"] == "voided"
    assert got["voidRecordId"] == data["recordId"]
    kept = (await device.request(f"records/{keep['data']['recordId']}/get", {}))["data"]
    assert kept["state"] == "inserted"
    assert kept["units"] == 4
    counter = (await device.request(f"records/{data['recordId']}/get", {}))["data"]
    assert counter["kind"] == "void"
    assert counter["units"] == -6

    of_void = await device.request(f"records/{data['recordId']}/void", {"reason": "x"})
    assert of_void["error"]["code"] == "VALIDATION_ERROR"
    await assert_totals_match_ledger(device, database, session_id)


async def test_void_refusals(
    servers: Servers, device: Device, tenant: Tenant, store: PostgresStore, session_id: str
) -> None:
    """Reason required; owner only; other company sees nothing; closed session refuses."""
    rid = (await device.request(f"sessions/{session_id}/records", record()))["data"]["recordId"]
    for payload in ({}, {"reason": ""}, {"reason": "  \n "}, {"reason": 5}):
        reply = await device.request(f"records/{rid}/void", payload)
        assert reply["error"]["code"] == "VALIDATION_ERROR", payload
    async with Device(
        servers.mqtt_host, servers.ws_port, PREFIX, token=tenant.token(tenant.other_user)
    ) as colleague:
        assert (await colleague.request(f"records/{rid}/void", {"reason": "x"}))["error"][
            "code"
        ] == "FORBIDDEN"
        assert (await colleague.request(f"records/{rid}/get", {}))["error"]["code"] == "FORBIDDEN"
    stranger = await make_tenant(store)
    async with Device(
        servers.mqtt_host, servers.ws_port, PREFIX, token=stranger.token()
    ) as outsider:
        assert (await outsider.request(f"records/{rid}/void", {"reason": "x"}))["error"][
            "code"
        ] == "NOT_FOUND"
        assert (await outsider.request(f"records/{rid}/get", {}))["error"]["code"] == "NOT_FOUND"
    assert (await device.request("records/rec_unknown/void", {"reason": "x"}))["error"][
        "code"
    ] == "NOT_FOUND"
    voided = await device.request(f"sessions/{session_id}/records", record())
    vid = voided["data"]["recordId"]
    first = await device.request(f"records/{vid}/void", {"reason": "typo"})
    await device.request(f"sessions/{session_id}/close", {})
    closed = await device.request(f"records/{rid}/void", {"reason": "late"})
    assert closed["error"]["code"] == "SESSION_CLOSED"
    replay = await device.request(f"records/{vid}/void", {"reason": "typo"})
    assert replay["data"]["idempotent"] is True
    assert replay["data"]["recordId"] == first["data"]["recordId"]
    assert (await device.request(f"records/{rid}/get", {}))["data"]["state"] == "inserted"


async def test_a_void_naming_another_record_in_its_payload_is_refused(
    device: Device, session_id: str, database: str
) -> None:
    """As for get (and sessionId on a session's topics): a recordId in the payload must be the
    topic's, else VALIDATION_ERROR and nothing voided; the same id is fine."""
    rid = (await device.request(f"sessions/{session_id}/records", record()))["data"]["recordId"]
    other = (await device.request(f"sessions/{session_id}/records", record()))["data"]["recordId"]
    wrong = await device.request(f"records/{rid}/void", {"reason": "x", "recordId": other})
    assert wrong["status"] == "error", wrong
    assert wrong["error"]["code"] == "VALIDATION_ERROR", wrong
    assert "recordId" in wrong["error"]["message"], wrong
    for r in (rid, other):
        assert (await device.request(f"records/{r}/get", {}))["data"]["state"] == "inserted"
    _, _, voided, _ = await ledger(database, session_id)
    assert voided == 0
    right = await device.request(f"records/{rid}/void", {"reason": "x", "recordId": rid})
    assert right["status"] == "success", right


async def test_check_idempotency_over_mqtt(device: Device, session_id: str) -> None:
    """The MQTT check answers {key, exists} for client keys and idempotencyKeys."""
    rec = record(idempotencyKey="mobile-app-key-1")
    await device.request(f"sessions/{session_id}/records", rec)
    key = f"client:{session_id}:{rec['workerId']}:{rec['clientEventId']}"
    for k, exists in [(key, True), ("mobile-app-key-1", True), (key + "x", False), ("nope", False)]:
        reply = await device.request("records/check-idempotency", {"key": k})
        assert reply["data"] == {"key": k, "exists": exists}
    bad = await device.request("records/check-idempotency", {})
    assert bad["error"]["code"] == "VALIDATION_ERROR"


async def test_dead_letters_keep_refusals_and_the_cli_lists_them(
    device: Device, session_id: str, database: str
) -> None:
    """Refused requests and failed bulk items are in the dead-letter table, with the CLI."""
    marker = f"dl-{os.getpid()}-{id(device)}"
    # broken JSON that carries the device's token as a 3.1.1 device would
    token = device.token
    assert token is not None
    broken = b'{"authorization": "Bearer ' + token.encode() + b'", ' + marker.encode()
    await device.request(f"sessions/{session_id}/records", broken)
    bulk = await device.request(
        "records/bulk", {"records": [{"sessionId": session_id, "workerId": marker}]}
    )
    assert bulk["summary"]["failed"] == 1
    env = {**os.environ, "GATEWAY_DATABASE_URL": database, "GATEWAY_JWT_SECRET": JWT_SECRET}
    rows: list[dict[str, Any]] = []
    for _ in range(100):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.cli",
            "dead-letters",
            "--since",
            "10m",
            "--json",
            "--reason",
            "VALIDATION_ERROR",
            "--limit",
            "1000",
            env=env,
            stdout=asyncio.subprocess.PIPE,
        )
        stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0
        rows = [orjson.loads(line) for line in stdout.splitlines()]
        rows = [r for r in rows if marker in r["payload"]]
        if len(rows) == 2:
            break
        await asyncio.sleep(0.1)
    assert len(rows) == 2
    topics = {r["topic"] for r in rows}
    assert topics == {f"{PREFIX}/sessions/{session_id}/records", f"{PREFIX}/records/bulk"}
    assert all(r["reason"] == "VALIDATION_ERROR" for r in rows)
    # kept, but not replayable: the token's signature is not in the table
    stored = next(r for r in rows if r["topic"].endswith("/records"))
    assert token.rsplit(".", 1)[0] + ".<redacted>" in stored["payload"]
    assert token.rsplit(".", 1)[1] not in stored["payload"]
    assert stored["payloadSize"] == len(broken)


async def test_a_misspelled_field_is_refused_alone_and_in_a_bulk(
    device: Device, session_id: str, database: str
) -> None:
    """ "unit": 5 would have stored 1 unit: refused, naming the field, alone and as a bulk item;
    the bulk's other items are stored."""
    alone = await device.request(f"sessions/{session_id}/records", without_units(unit=5))
    assert alone["status"] == "error", alone
    assert alone["error"]["code"] == "VALIDATION_ERROR"
    assert alone["error"]["details"]["fields"][0]["field"] == "unit"
    good = record(sessionId=session_id, deviceId="hh-7")  # a device's own field is fine
    bulk = await device.request(
        "records/bulk", {"records": [good, without_units(sessionId=session_id, Units=5)]}
    )
    assert [r["status"] for r in bulk["results"]] == ["ok", "failed"], bulk
    assert bulk["results"][1]["error"]["details"]["fields"][0]["field"] == "records[1].Units"
    _, records, _, _ = await ledger(database, session_id)
    assert records == 1


async def test_bulk_errors_name_the_item_whichever_check_refused_it(
    device: Device, session_id: str
) -> None:
    """A field path in a bulk item's error carries the item's index, from the schema
    (units < 0) as from the rules (clock skew, GATEWAY_MAX_UNITS)."""
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    items = [
        record(sessionId=session_id),
        record(sessionId=session_id, units=-1),
        record(sessionId=session_id, recordedAtUtc=future),
        record(sessionId=session_id, units=10**9),
    ]
    bulk = await device.request("records/bulk", {"records": items})
    results = bulk["results"]
    assert [r["status"] for r in results] == ["ok", "failed", "failed", "failed"], bulk
    fields = [[f["field"] for f in r["error"]["details"]["fields"]] for r in results[1:]]
    assert fields == [["records[1].units"], ["records[2].recordedAtUtc"], ["records[3].units"]]
    alone = await device.request(f"sessions/{session_id}/records", items[2])
    assert alone["error"]["details"]["fields"][0]["field"] == "recordedAtUtc", alone


def without_units(**fields: Any) -> dict[str, Any]:
    """A record payload that does not give units (they default to 1), plus ``fields``."""
    return {k: v for k, v in record().items() if k != "units"} | fields


async def test_a_bulk_and_a_void_sent_before_a_close_count(
    device: Device, tenant: Tenant, database: str, gateway: Gateway
) -> None:
    """A bulk (shard 0: its topic has no id) and a void (sharded by record id) sent before a
    close of a session in another shard were applied after the close and refused
    SESSION_CLOSED: 1,000 buffered counts lost, or a mistaken record left paid. A close
    waits now for everything received before it."""
    depth = gateway.settings.pipeline_depth
    sid = ""
    for _ in range(40):  # a session outside shard 0, where every bulk goes
        opened = await device.request("sessions/open", tenant.open_payload())
        sid = opened["data"]["sessionId"]
        if zlib.crc32(sid.encode()) % depth != 0:
            break
        await device.request(f"sessions/{sid}/close", {})
    assert zlib.crc32(sid.encode()) % depth != 0
    wrong = await device.request(f"sessions/{sid}/records", record(units=7))
    rid = wrong["data"]["recordId"]
    other = (
        await device.request("sessions/open", tenant.open_payload(sectorId=tenant.extra_sectors[0]))
    )["data"]["sessionId"]

    def bulk(session: str, n: int) -> dict[str, Any]:
        return {"records": [record(units=5, sessionId=session) for _ in range(n)]}

    ahead = [  # keep shard 0 busy, as a backlog after an outage would
        asyncio.create_task(device.request("records/bulk", bulk(other, 1000), timeout=120))
        for _ in range(5)
    ]
    synced = asyncio.create_task(device.request("records/bulk", bulk(sid, 1000), timeout=120))
    voided = asyncio.create_task(
        device.request(f"records/{rid}/void", {"reason": "wrong worker"}, timeout=120)
    )
    closed = asyncio.create_task(device.request(f"sessions/{sid}/close", {}, timeout=120))
    replies = await asyncio.gather(*ahead, synced, voided, closed)
    assert all(r["summary"]["ok"] == 1000 for r in replies[:5]), [r["summary"] for r in replies[:5]]
    assert replies[5]["summary"] == {"ok": 1000, "duplicated": 0, "failed": 0}, replies[5][
        "summary"
    ]
    assert replies[6]["status"] == "success", replies[6]
    assert replies[7]["status"] == "success", replies[7]
    t = await totals(device, sid)
    assert (t["units"], t["records"], t["voided"]) == (5000, 1001, 1)
    await assert_totals_match_ledger(device, database, sid)
