"""A session's deadline at its edges: requests that arrived before it but are applied after
the sweep, and deadlines moved by hand in SQL.

Driven through the service on the real PostgreSQL (the session fixtures), with arrival times
chosen by the test: no wall-clock assertion, no sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta

from gateway.core.models import CreateRecord, ExtendSession, OpenSession, VoidRecord
from gateway.core.rules import Limits, Principal
from gateway.errors import RequestError
from gateway.publisher import Sweeper
from gateway.service import RecordAccepted, RecordRequest, Service
from gateway.store.postgres import PostgresStore
from tests.support.extra_helpers import execute
from tests.support.tenants import make_tenant, opened, record


def _at(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%S.000Z")


async def _opened_11_hours_ago(
    store: PostgresStore,
) -> tuple[Service, Principal, str, datetime, datetime]:
    """(service, owner, session id, now, deadline) of a session opened 11 h ago for the
    project's 12 h: the deadline lies 1 h ahead of the real clock, so no real sweeper touches
    it; a test's own sweep or request is told a later "now"."""
    tenant = await make_tenant(store)
    service = Service(store, Limits())
    who = tenant.principal()
    now = datetime.now(UTC)
    opened_at = now - timedelta(hours=11)
    sid = await opened(service, who, tenant.open_payload(openedAt=_at(opened_at)), now)
    return service, who, sid, now, opened_at.replace(microsecond=0) + timedelta(hours=12)


async def test_a_void_that_arrived_before_the_deadline_is_applied_after_the_sweep(
    store: PostgresStore,
) -> None:
    """SPEC §5: expiry is judged on arrival time. A record that arrived before the deadline is
    stored even when applied after the sweep (test_late_sync), and so is a void: it was refused
    SESSION_EXPIRED, and since a void needs an open session the mistaken record stayed paid."""
    service, who, sid, now, deadline = await _opened_11_hours_ago(store)
    cmd = CreateRecord.model_validate(record(units=6, recordedAtUtc=_at(now)))
    (created,) = await service.create_records([RecordRequest(who, cmd, sid, now)])
    assert isinstance(created, RecordAccepted), created

    swept = await service.expire_due(deadline + timedelta(seconds=1))
    assert sid in swept

    arrived = deadline - timedelta(seconds=5)  # the void reached the gateway before the deadline
    try:
        void = await service.void_record(
            who, created.record_id, VoidRecord(reason="wrong worker"), arrived
        )
    except RequestError as exc:
        raise AssertionError(
            f"a void that arrived before the deadline was refused {exc.code}: {exc}"
        ) from exc
    assert void["idempotent"] is False
    session = await service.get_session(who, sid)
    assert session["totals"]["units"] == 0


async def test_a_deadline_moved_by_hand_through_expires_at_alone_is_one_deadline(
    store: PostgresStore, database: str
) -> None:
    """Migration 006: moving only ``expires_at`` by hand (the sweeper's column) moves
    ``max_duration_hours`` with it. Before, the record path still judged by ``opened_at +
    max_duration_hours``: records were refused SESSION_EXPIRED before the new deadline, the
    session was closed with a ``closedAt`` in the future (``closed_at = expires_at``), and from
    then on records were accepted into the closed session."""
    service, who, sid, _, deadline = await _opened_11_hours_ago(store)
    # an operator gives the crew two more hours, by hand
    await execute(
        database,
        "UPDATE production_sessions SET expires_at = expires_at + interval '2 hours' "
        "WHERE session_id = $1",
        sid,
    )
    service.session_changed(sid)  # (the NOTIFY, delivered at once)

    def create(arrival: datetime) -> RecordRequest:
        cmd = CreateRecord.model_validate(record(recordedAtUtc=_at(arrival)))
        return RecordRequest(who, cmd, sid, arrival)

    t1 = deadline + timedelta(minutes=30)
    (first,) = await service.create_records([create(t1)])
    got = await service.get_session(who, sid, t1)  # a get at t1 closes it, as expired
    t2 = deadline + timedelta(minutes=45)
    (second,) = await service.create_records([create(t2)])
    outcomes = (type(first).__name__, type(second).__name__)
    # one deadline: both refused (the old one holds) or both accepted (the new one holds)
    assert isinstance(first, RecordAccepted) == isinstance(second, RecordAccepted), (
        outcomes,
        got["status"],
        got["closedAt"],
    )
    if got["status"] == "closed":
        assert got["closedAt"] <= _at(t1), got["closedAt"]  # never closed in the future
        assert not isinstance(second, RecordAccepted), "a record entered a closed session"


async def test_a_close_moved_by_hand_is_judged_by_its_new_time_at_once(
    store: PostgresStore, database: str
) -> None:
    """With a late-sync grace, a closed session takes records made before its closedAt. An
    operator moving closed_at back by hand (the crew stopped earlier) is seen at once, even
    by a gateway whose notification has not arrived: a record made after the new closedAt is
    refused (closed sessions are judged on facts read with the record's lock; migration 006
    also bumps the version on such an edit, so every cache drops the session)."""
    tenant = await make_tenant(store)
    service = Service(store, Limits(late_sync_grace_s=3600))
    who = tenant.principal()
    now = datetime.now(UTC)
    sid = await opened(
        service, who, tenant.open_payload(openedAt=_at(now - timedelta(hours=3))), now
    )
    await service.close_session(who, sid, now)

    def create(made: datetime) -> RecordRequest:
        cmd = CreateRecord.model_validate(record(recordedAtUtc=_at(made)))
        return RecordRequest(who, cmd, sid, now + timedelta(seconds=10))

    (late,) = await service.create_records([create(now - timedelta(minutes=50))])
    assert isinstance(late, RecordAccepted), late  # inside the window: the facts now cached
    await execute(
        database,
        "UPDATE production_sessions SET closed_at = closed_at - interval '1 hour' "
        "WHERE session_id = $1",
        sid,
    )  # no service.session_changed(): the notification has not arrived
    (after_new_close,) = await service.create_records([create(now - timedelta(minutes=30))])
    assert not isinstance(after_new_close, RecordAccepted), "made after the moved closedAt"
    assert isinstance(after_new_close, RequestError)
    assert after_new_close.code == "SESSION_CLOSED"


async def test_ending_a_session_now_by_hand_works_for_one_just_opened(
    store: PostgresStore, database: str
) -> None:
    """ "End it now" in SQL (expires_at a minute ago) on a session opened seconds ago puts
    expires_at before opened_at: the edit is taken (not refused by max_duration_hours > 0),
    and the record path agrees the session is over."""
    tenant = await make_tenant(store)
    service = Service(store, Limits())
    who = tenant.principal()
    now = datetime.now(UTC)
    sid = await opened(service, who, tenant.open_payload(), now)
    await execute(
        database,
        "UPDATE production_sessions SET expires_at = now() - interval '1 minute' "
        "WHERE session_id = $1",
        sid,
    )
    service.session_changed(sid)
    cmd = CreateRecord.model_validate(record(recordedAtUtc=_at(now)))
    (refused,) = await service.create_records(
        [RecordRequest(who, cmd, sid, now + timedelta(seconds=1))]
    )
    assert isinstance(refused, RequestError) and refused.code == "SESSION_EXPIRED", refused


async def test_every_path_that_closes_a_session_at_its_deadline_counts_it_once(
    store: PostgresStore,
) -> None:
    """gateway_sessions_expired_total ("sessions closed at their deadline") counted only the
    sweeper's: a close, get, void or open of the same key that found the session past its
    deadline closed it, announced session.expired, and left the counter at 0."""
    counted: list[int] = []

    async def past_deadline() -> tuple[Service, Principal, str, datetime, datetime]:
        service, who, sid, now, deadline = await _opened_11_hours_ago(store)
        service.on_expired = counted.append
        return service, who, sid, now, deadline + timedelta(seconds=1)

    async def refused(call: Awaitable[object]) -> str:
        try:
            await call
        except RequestError as exc:
            return exc.code
        return "accepted"

    service, who, sid, _, late = await past_deadline()
    assert await refused(service.close_session(who, sid, late)) == "SESSION_EXPIRED"
    assert await refused(service.close_session(who, sid, late)) == "SESSION_EXPIRED"
    assert counted == [1], "close"

    service, who, sid, _, late = await past_deadline()
    assert (await service.get_session(who, sid, late))["status"] == "closed"
    await service.get_session(who, sid, late)
    assert counted == [1, 1], "get"

    service, who, sid, now, late = await past_deadline()
    cmd = CreateRecord.model_validate(record(recordedAtUtc=_at(now)))
    (created,) = await service.create_records([RecordRequest(who, cmd, sid, now)])
    assert isinstance(created, RecordAccepted), created
    void = service.void_record(who, created.record_id, VoidRecord(reason="typo"), late)
    assert await refused(void) == "SESSION_EXPIRED"
    assert counted == [1, 1, 1], "void"

    service, who, sid, _, late = await past_deadline()
    old = await service.get_session(who, sid)
    again = OpenSession.model_validate(
        {
            "projectId": old["projectId"],
            "sectorId": old["sectorId"],
            "openedAt": old["openedAt"],
            "maxDurationHours": 13,
        }
    )
    new = await service.open_session(who, again, late)
    assert new["sessionId"] != sid and (await service.get_session(who, sid))["status"] == "closed"
    assert counted == [1, 1, 1, 1], "open"

    service, who, sid, _, late = await past_deadline()
    assert sid in await service.expire_due(late)
    assert sid not in await service.expire_due(late)
    assert counted[-1] >= 1 and len(counted) == 5, "sweeper"


async def test_the_sweeper_leaves_a_session_a_queued_request_arrived_in_time_for(
    store: PostgresStore, database: str
) -> None:
    """An extend (or close, or update) that arrived before the deadline but still waited in
    the pipeline when the sweeper came was refused SESSION_EXPIRED: the sweeper closed the
    session first. The sweeper now closes only sessions whose deadline passed before the
    oldest request the pipeline still holds arrived."""
    tenant = await make_tenant(store)
    service = Service(store, Limits())
    who = tenant.principal()
    now = datetime.now(UTC)
    sid = await opened(service, who, tenant.open_payload(), now)
    deadline = now - timedelta(seconds=30)

    async def deadline_passed() -> None:  # 30 s ago, by hand (the NOTIFY delivered at once)
        await execute(
            database,
            "UPDATE production_sessions SET expires_at = $2 WHERE session_id = $1",
            sid,
            deadline,
        )
        service.session_changed(sid)

    await deadline_passed()
    pending: list[datetime | None] = [deadline - timedelta(seconds=1)]  # queued in time

    async def one_sweep() -> None:
        stopping = asyncio.Event()
        sweeper = Sweeper(service, 0.05, lambda: pending[0])
        running = asyncio.create_task(sweeper.run(stopping))
        await asyncio.sleep(0.3)
        stopping.set()
        await asyncio.wait_for(running, 10)

    await one_sweep()
    assert (await service.get_session(who, sid))["status"] == "open"
    extended = await service.extend_session(
        who, sid, ExtendSession(maxDurationHours=20), deadline - timedelta(seconds=1)
    )
    assert extended == {"maxDurationHours": 20}

    # what is queued now arrived after the (new) deadline: the sweep goes ahead
    await deadline_passed()
    pending[0] = None
    await one_sweep()
    got = await service.get_session(who, sid)
    assert (got["status"], got["closeReason"]) == ("closed", "expired")
