"""The service's caches stay correct while notifications arrive (issue: caches that stay
correct): what was cached before a read is not lost by a notification or a full cache during
that read. Real PostgreSQL; the store's reads are wrapped to let a notification land mid-read,
as the sweeper's NOTIFY did under a race audit (a record for an open session got NOT_FOUND).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from gateway import service as service_module
from gateway.core.auth import Claims
from gateway.core.models import CreateRecord
from gateway.core.rules import Limits, Principal
from gateway.service import RecordAccepted, RecordRequest, Service, expiry_events
from gateway.store.postgres import PostgresStore
from tests.support.tenants import make_tenant, opened, record


def during(
    read: Callable[[list[str]], Awaitable[Any]], notify: Callable[[], None]
) -> Callable[[list[str]], Awaitable[Any]]:
    """``read``, with ``notify`` happening while it is under way."""

    async def wrapped(keys: list[str]) -> Any:
        notify()
        return await read(keys)

    return wrapped


def create(who: Principal, session_id: str) -> RecordRequest:
    return RecordRequest(who, CreateRecord.model_validate(record()), session_id, datetime.now(UTC))


def accepted(outcomes: Sequence[object]) -> list[bool]:
    return [isinstance(o, RecordAccepted) and not o.idempotent for o in outcomes]


async def test_a_cached_session_notified_while_another_is_read_is_not_missing(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch holds a record for cached session A and one for B (not cached): while B's facts
    are read, a notification drops A from the cache. Both records are accepted."""
    tenant = await make_tenant(store)
    service = Service(store, Limits())
    who = tenant.principal()
    now = datetime.now(UTC)
    a = await opened(service, who, tenant.open_payload(), now)
    b = await opened(service, who, tenant.open_payload(sectorId=tenant.extra_sectors[0]), now)
    assert accepted(await service.create_records([create(who, a)])) == [True]  # A now cached
    assert a in service.session_cache and b not in service.session_cache
    monkeypatch.setattr(
        store, "session_facts", during(store.session_facts, lambda: service.session_changed(a))
    )
    outcomes = await service.create_records([create(who, a), create(who, b)])
    assert accepted(outcomes) == [True, True], outcomes


async def test_a_known_user_stays_known_when_the_cache_fills_or_is_notified(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Users X (cached) and Y (not) in one batch: the cache emptied because it is full, or X
    notified, while Y is read, leaves X known (it was FORBIDDEN "not registered")."""
    tenant = await make_tenant(store)
    service = Service(store, Limits())
    exp = time.time() + 3600
    x, y = Claims(tenant.user, exp), Claims(tenant.other_user, exp)
    assert await service.principals([(x, None)]) == [Principal(tenant.user, tenant.company_id)]
    monkeypatch.setattr(service_module, "CACHE_LIMIT", 1)  # Y's arrival empties the cache
    both = await service.principals([(x, None), (y, None)])
    assert both == [
        Principal(tenant.user, tenant.company_id),
        Principal(tenant.other_user, tenant.company_id),
    ]
    service.forget_all()
    assert await service.principals([(x, None)]) == [Principal(tenant.user, tenant.company_id)]
    monkeypatch.setattr(
        store, "companies_of", during(store.companies_of, lambda: service.user_changed(x.sub))
    )
    both = await service.principals([(x, None), (y, None)])
    assert all(isinstance(p, Principal) for p in both), both
    assert tenant.other_user not in service.user_cache  # read across a notification: not kept


async def test_a_sweep_locks_sessions_in_the_order_record_batches_do(
    store: PostgresStore, database: str
) -> None:
    """A batch of records locks its sessions in id order. A sweep that locked them in deadline
    order could hold B while waiting for A as a batch holds A and waits for B: a deadlock (seen
    under a race audit). Here a transaction holds A as a batch would, a sweep starts, then the
    transaction takes B: no deadlock, and the sweep closes both once the transaction ends. The
    deadlines lie ahead of the real clock (no other sweeper touches them); the sweep is told a
    later now."""
    tenant = await make_tenant(store, sectors=12)
    service = Service(store, Limits())
    who = tenant.principal()
    now = datetime.now(UTC)
    written = [  # in this order (a table scan meets them so)
        await opened(service, who, tenant.open_payload(sectorId=sector), now)
        for sector in (tenant.sector_id, *tenant.extra_sectors)
    ]
    # B written before A but after it in id order: any other order than the ids' meets B first
    b, a = next((x, y) for i, x in enumerate(written) for y in written[i + 1 :] if x > y)
    for other in set(written) - {a, b}:
        await service.close_session(who, other, now)
    conn = await asyncpg.connect(database)
    try:
        # B is due first: a sweep in deadline order would lock B, then wait for A
        for sid, minutes in ((a, 2), (b, 1)):
            await conn.execute(
                "UPDATE production_sessions SET expires_at = $2 WHERE session_id = $1",
                sid,
                now + timedelta(minutes=minutes),
            )
        lock = "SELECT 1 FROM production_sessions WHERE session_id = $1 FOR NO KEY UPDATE"
        async with conn.transaction():
            await conn.execute(lock, a)
            sweep = asyncio.create_task(
                store.expire_due(now + timedelta(minutes=3), lambda s: expiry_events(s, now))
            )
            await asyncio.sleep(0.5)  # the sweep is waiting for A by now
            await conn.execute("SET LOCAL deadlock_timeout = '100ms'")
            await conn.execute(lock, b)  # deadlock detected here (or in the sweep) before
        swept = await asyncio.wait_for(sweep, 30)
    finally:
        await conn.close()
    assert {s.session_id for s in swept} >= {a, b}
