"""Record ids lead with their minute (a local primary-key index); an id that clashes with a
stored one is drawn again, for creates and for the counter-movement of a void alike."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import NamedTuple

import pytest

import gateway.service
from gateway.core.events import new_record_ids
from gateway.core.models import CreateRecord, VoidRecord
from gateway.core.rules import Limits, Principal
from gateway.service import RecordAccepted, RecordOutcome, RecordRequest, Service
from gateway.store.postgres import PostgresStore
from tests.support.tenants import make_tenant, opened, record


def _clashing_first(taken: str) -> Callable[..., list[str]]:
    """A new_record_ids whose first draw starts with ``taken``, an id already stored."""
    draws = 0

    def ids(n: int, now_s: float | None = None) -> list[str]:
        nonlocal draws
        draws += 1
        fresh = new_record_ids(n, now_s)
        return [taken, *fresh[1:]] if draws == 1 else fresh

    return ids


class Opened(NamedTuple):
    service: Service
    who: Principal
    session_id: str
    now: datetime

    async def create(self, *units: float) -> list[RecordOutcome]:
        return await self.service.create_records(
            [
                RecordRequest(
                    self.who,
                    CreateRecord.model_validate(record(units=u)),
                    self.session_id,
                    self.now,
                )
                for u in units
            ]
        )


async def _opened(store: PostgresStore) -> Opened:
    """A service on the real store and a session opened through it."""
    tenant = await make_tenant(store)
    service = Service(store, Limits())
    who = tenant.principal()
    now = datetime.now(UTC)
    return Opened(service, who, await opened(service, who, tenant.open_payload(), now), now)


async def test_a_create_whose_new_id_is_taken_lands_under_another(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = await _opened(store)
    service, who, sid = session.service, session.who, session.session_id
    first = await session.create(5)
    assert isinstance(first[0], RecordAccepted)
    taken = first[0].record_id

    monkeypatch.setattr(gateway.service, "new_record_ids", _clashing_first(taken))
    second, third = await session.create(2, 3)
    assert isinstance(second, RecordAccepted) and not second.idempotent, second
    assert isinstance(third, RecordAccepted) and not third.idempotent, third
    assert taken not in {second.record_id, third.record_id}
    assert second.record_id != third.record_id
    stored = await store.record(taken)
    assert stored is not None and stored.units == 5  # the first record is untouched
    totals = (await service.get_session(who, sid))["totals"]
    assert totals["records"] == 3
    assert totals["units"] == 10


async def test_a_void_whose_new_id_is_taken_is_written_under_another(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = await _opened(store)
    service, who, sid, now = session
    kept, voided = await session.create(5, 4)
    assert isinstance(kept, RecordAccepted) and isinstance(voided, RecordAccepted)

    draws = iter([kept.record_id, *new_record_ids(2)])
    monkeypatch.setattr(gateway.service, "new_record_id", lambda: next(draws))
    reply = await service.void_record(
        who, voided.record_id, VoidRecord.model_validate({"reason": "scale error"}), now
    )
    void_id = reply["recordId"]
    assert void_id not in (kept.record_id, voided.record_id)
    assert reply["voidedRecordId"] == voided.record_id
    original = await store.record(voided.record_id)
    assert original is not None and original.state == "voided"
    assert original.voided_by == void_id
    untouched = await store.record(kept.record_id)
    assert untouched is not None and untouched.kind == "record" and untouched.units == 5
    totals = (await service.get_session(who, sid))["totals"]
    assert totals["units"] == 5
    assert totals["voided"] == 1
