"""A device's requests sent back to back, without waiting for replies, take effect in the order
sent (one gateway process): a batch may hold them all, and it must not race them."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Awaitable
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.errors import StoreUnavailable
from gateway.transport.mqtt import MqttLink
from tests.support.devices import Device
from tests.support.tenants import Tenant, record

ROUNDS = 3  # each round a fresh burst: the race, when there is one, shows in most rounds


async def burst(device: Device, requests: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Publish all at once, in this order (each publish is queued before the next starts)."""
    return list(await asyncio.gather(*(device.request(t, p) for t, p in requests)))


def ok(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["status"] == "success", reply
    data: dict[str, Any] = reply["data"]
    return data


async def open_session(device: Device, tenant: Tenant, sector: str) -> str:
    return str(
        ok(await device.request("sessions/open", tenant.open_payload(sectorId=sector)))["sessionId"]
    )


async def test_records_sent_before_the_close_are_all_taken(device: Device, tenant: Tenant) -> None:
    """The last counts of a shift and the close, published together: every count is stored
    (none refused SESSION_CLOSED), and the close's session holds them all."""
    for _ in range(ROUNDS):
        sid = await open_session(device, tenant, tenant.extra_sectors[0])
        replies = await burst(
            device,
            [(f"sessions/{sid}/records", record(units=1)) for _ in range(40)]
            + [(f"sessions/{sid}/close", {})],
        )
        for reply in replies:
            ok(reply)
        got = ok(await device.request(f"sessions/{sid}/get", {}))
        assert got["totals"]["records"] == 40


async def test_updates_and_a_get_apply_in_the_order_sent(device: Device, session_id: str) -> None:
    """Three price updates then a get: the get sees the last price, and so does a later get."""
    for round_ in range(ROUNDS):
        prices = [10 * round_ + p for p in (6, 7, 8)]
        replies = await burst(
            device,
            [(f"sessions/{session_id}/update", {"pricePerUnit": p}) for p in prices]
            + [(f"sessions/{session_id}/get", {})],
        )
        assert ok(replies[-1])["pricePerUnit"] == prices[-1]
        assert (
            ok(await device.request(f"sessions/{session_id}/get", {}))["pricePerUnit"] == prices[-1]
        )


async def test_extends_apply_in_the_order_sent(device: Device, tenant: Tenant) -> None:
    """Extend to 13 then 14, together: both raise the duration (14 first would refuse 13)."""
    for _ in range(ROUNDS):
        sid = await open_session(device, tenant, tenant.extra_sectors[1])
        replies = await burst(
            device,
            [
                (f"sessions/{sid}/extend", {"maxDurationHours": 13}),
                (f"sessions/{sid}/extend", {"maxDurationHours": 14}),
            ],
        )
        assert [ok(r)["maxDurationHours"] for r in replies] == [13, 14]
        ok(await device.request(f"sessions/{sid}/close", {}))


async def test_the_first_void_sent_is_the_void(device: Device, session_id: str) -> None:
    """Three voids of one record at once: the first is applied (its reason kept), the others
    answer that same void as a replay."""
    for _ in range(ROUNDS):
        rid = ok(await device.request(f"sessions/{session_id}/records", record()))["recordId"]
        replies = await burst(
            device, [(f"records/{rid}/void", {"reason": f"r{i}"}) for i in range(3)]
        )
        voids = [ok(r) for r in replies]
        assert [v["idempotent"] for v in voids] == [False, True, True]
        assert {v["payloadPreview"]["reason"] for v in voids} == {"r0"}
        assert len({v["recordId"] for v in voids}) == 1


async def test_a_bulk_is_judged_in_its_order(
    device: Device, tenant: Tenant, session_id: str
) -> None:
    """Two items of one bulk share an idempotencyKey in two sessions of one owner: the first
    item is stored, in its session, and the second is its duplicate (same content) or its
    conflict (other units), whichever session sorts first."""
    other = await open_session(device, tenant, tenant.extra_sectors[0])
    try:
        for first, second in ((session_id, other), (other, session_id)):
            key = f"K-{secrets.token_hex(4)}"
            stamp = record()["recordedAtUtc"]
            items = [
                record(sessionId=sid, idempotencyKey=key, worker="W1", recordedAtUtc=stamp)
                for sid in (first, second)
            ]
            reply = await device.request("records/bulk", {"records": items})
            assert reply["status"] == "success", reply
            ok, dup = reply["results"]
            assert (ok["status"], dup["status"]) == ("ok", "duplicated"), reply
            assert dup["recordId"] == ok["recordId"]
            stored = await device.request(f"records/{ok['recordId']}/get", {})
            assert stored["data"]["sessionId"] == first, stored
            items = [
                record(sessionId=sid, idempotencyKey=f"{key}-2", worker="W1", units=units)
                for sid, units in ((first, 5), (second, 9))
            ]
            reply = await device.request("records/bulk", {"records": items})
            assert [r["status"] for r in reply["results"]] == ["ok", "failed"], reply
            assert reply["results"][1]["error"]["code"] == "IDEMPOTENCY_CONFLICT"
    finally:
        await device.request(f"sessions/{other}/close", {})


async def test_a_check_sent_after_a_create_sees_it(device: Device, session_id: str) -> None:
    """Create then check its key, together: the check answers exists."""
    for _ in range(ROUNDS):
        rec = record()
        key = f"client:{session_id}:{rec['workerId']}:{rec['clientEventId']}"
        created, checked = await burst(
            device,
            [(f"sessions/{session_id}/records", rec), ("records/check-idempotency", {"key": key})],
        )
        ok(created)
        assert ok(checked) == {"key": key, "exists": True}


async def test_a_change_applied_before_the_database_went_away_is_not_applied_again(
    device: Device, gateway: Gateway, session_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A create, an extend then a get in one batch; the get (a later wave) meets the database
    gone and the batch is retried: the extend, already committed, is answered as applied, not
    refused as "must be greater than 13" by applying it again, and the create as new."""
    assert gateway.service is not None and gateway.link is not None
    service, link = gateway.service, gateway.link
    calls = {"extend": 0, "get": 0}
    real_extend, real_get = service.extend_session, service.get_session

    async def extend(*args: Any) -> dict[str, Any]:
        calls["extend"] += 1
        return await real_extend(*args)

    async def get(*args: Any) -> dict[str, Any]:
        calls["get"] += 1
        if calls["get"] == 1:
            raise StoreUnavailable("injected: the database went away")
        return await real_get(*args)

    monkeypatch.setattr(service, "extend_session", extend)
    monkeypatch.setattr(service, "get_session", get)
    created, extended, got = await one_batch(
        link,
        device.request(f"sessions/{session_id}/records", record(units=2)),
        device.request(f"sessions/{session_id}/extend", {"maxDurationHours": 13}),
        device.request(f"sessions/{session_id}/get", {}),
    )
    assert ok(extended) == {"maxDurationHours": 13}
    # the create, committed before the retry, is answered as new, not as a replay of itself
    assert ok(created)["idempotent"] is False
    assert ok(got)["maxDurationHours"] == 13
    assert ok(got)["totals"]["records"] == 1
    assert calls == {"extend": 1, "get": 2}


async def one_batch(link: MqttLink, *requests: Awaitable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Publish while the gateway does not read: the requests wait on its socket, so that one
    batch takes them all."""
    link.pause_reading()
    try:
        pending = asyncio.gather(*requests)
        await asyncio.sleep(0.5)
    finally:
        link.resume_reading()
    return list(await pending)
