"""The service's caches stay correct while notifications arrive (issue: caches that stay
correct): what was cached before a read is not lost by a notification or a full cache during
that read. Real PostgreSQL; the store's reads are wrapped to let a notification land mid-read,
as the sweeper's NOTIFY did under a race audit (a record for an open session got NOT_FOUND).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest

from gateway import service as service_module
from gateway.core.auth import Claims
from gateway.core.models import CreateRecord, OpenSession
from gateway.core.rules import Limits, Principal
from gateway.service import RecordAccepted, RecordRequest, Service
from gateway.store.postgres import PostgresStore
from tests.support.tenants import make_tenant, record


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
    who = Principal(tenant.user, tenant.company_id)
    now = datetime.now(UTC)
    a = (await service.open_session(who, OpenSession.model_validate(tenant.open_payload()), now))[
        "sessionId"
    ]
    b_payload = tenant.open_payload(sectorId=tenant.extra_sectors[0])
    b = (await service.open_session(who, OpenSession.model_validate(b_payload), now))["sessionId"]
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
