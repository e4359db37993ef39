"""Record ids lead with their minute (a local primary-key index); an id that clashes with a
stored one is drawn again, for creates and for the counter-movement of a void alike."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import pytest

import gateway.service
from gateway.core.events import new_record_ids
from gateway.core.models import CreateRecord, VoidRecord
from gateway.core.rules import Limits
from gateway.service import RecordAccepted, RecordRequest, Service
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


async def test_a_create_whose_new_id_is_taken_lands_under_another(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = await make_tenant(store)
    service = Service(store, Limits())
    who = tenant.principal()
    now = datetime.now(UTC)
    sid = await opened(service, who, tenant.open_payload(), now)
    first = await service.create_records(
        [RecordRequest(who, CreateRecord.model_validate(record()), sid, now)]
    )
    assert isinstance(first[0], RecordAccepted)
    taken = first[0].record_id

    monkeypatch.setattr(gateway.service, "new_record_ids", _clashing_first(taken))
    second, third = await service.create_records(
        [
            RecordRequest(who, CreateRecord.model_validate(record(units=2)), sid, now),
            RecordRequest(who, CreateRecord.model_validate(record(units=3)), sid, now),
        ]
    )
    assert isinstance(second, RecordAccepted) and not second.idempotent, second
    assert isinstance(third, RecordAccepted) and not third.idempotent, third
    assert taken not in {second.record_id, third.record_id}
    assert second.record_id != third.record_id
    stored = await store.record(taken)
    assert stored is not None and stored.units == 5  # the first record is untouched
    session = await service.get_session(who, sid)
    assert session["totals"]["records"] == 3
    assert session["totals"]["units"] == 10


async def test_a_void_whose_new_id_is_taken_is_written_under_another(
    store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant = await make_tenant(store)
    service = Service(store, Limits())
    who = tenant.principal()
    now = datetime.now(UTC)
    sid = await opened(service, who, tenant.open_payload(), now)
    made = await service.create_records(
        [
            RecordRequest(who, CreateRecord.model_validate(record()), sid, now),
            RecordRequest(who, CreateRecord.model_validate(record(units=4)), sid, now),
        ]
    )
    kept, voided = made
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
    session = await service.get_session(who, sid)
    assert session["totals"]["units"] == 5
    assert session["totals"]["voided"] == 1
