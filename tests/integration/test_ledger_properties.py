"""Property: whatever mix of creates, replays, bulks and voids (concurrent too), the totals equal
the ledger and no key is stored twice. Drives the service on the real PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.models import CreateRecord, OpenSession, VoidRecord
from gateway.core.rules import Limits, Principal
from gateway.errors import RequestError
from gateway.service import RecordAccepted, RecordRequest, Service
from gateway.store.postgres import PostgresStore
from tests.support.tenants import make_tenant

BASE = datetime(2026, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Create:
    session: int  # which of the example's sessions
    worker: str
    event: str
    units: float
    name: str
    minute: int


@dataclass(frozen=True)
class Bulk:
    items: tuple[Create, ...]


@dataclass(frozen=True)
class Void:
    pick: int  # index into the records created so far


@dataclass(frozen=True)
class Together:
    """Operations started at once (asyncio.gather): the race the gateway must win."""

    ops: tuple[Create | Bulk | Void, ...]


creates = st.builds(
    Create,
    session=st.integers(0, 1),
    worker=st.sampled_from(["W1", "W2", "W3"]),
    event=st.sampled_from([f"e{i}" for i in range(6)]),
    units=st.sampled_from([0.0, 1.0, 2.5, 5.0]),
    name=st.sampled_from(["Ana", "Ana", "Bo"]),
    minute=st.sampled_from([0, 0, 1]),
)
simple_ops = st.one_of(
    creates,
    st.builds(Bulk, items=st.lists(creates, min_size=1, max_size=12).map(tuple)),
    st.builds(Void, pick=st.integers(0, 50)),
)
operations = st.lists(
    st.one_of(
        simple_ops,
        st.builds(Together, ops=st.lists(simple_ops, min_size=2, max_size=6).map(tuple)),
    ),
    min_size=1,
    max_size=12,
)


class Run:
    """One example: a fresh tenant, two open sessions, the ops applied through the service."""

    def __init__(self, service: Service, who: Principal, sessions: list[str]) -> None:
        self.service = service
        self.who = who
        self.sessions = sessions
        self.created: list[str] = []
        self.answers: dict[tuple[str, str, str], set[str]] = defaultdict(set)
        self.new_per_key: dict[tuple[str, str, str], int] = defaultdict(int)

    def request(self, c: Create) -> RecordRequest:
        sid = self.sessions[c.session]
        cmd = CreateRecord.model_validate(
            {
                "workerId": c.worker,
                "worker_name": c.name,
                "units": c.units,
                "recordedAtUtc": (BASE + timedelta(minutes=c.minute)).isoformat(),
                "clientEventId": c.event,
            }
        )
        return RecordRequest(self.who, cmd, sid, datetime.now(UTC))

    def note(self, c: Create, outcome: RecordAccepted | RequestError) -> None:
        key = (self.sessions[c.session], c.worker, c.event)
        if isinstance(outcome, RecordAccepted):
            self.answers[key].add(outcome.record_id)
            self.created.append(outcome.record_id)
            if not outcome.idempotent:
                self.new_per_key[key] += 1
        else:
            assert outcome.code == "IDEMPOTENCY_CONFLICT", outcome

    async def apply(self, op: Create | Bulk | Void | Together) -> None:
        if isinstance(op, Together):
            await asyncio.gather(*(self.apply(o) for o in op.ops))
        elif isinstance(op, Create):
            (outcome,) = await self.service.create_records([self.request(op)])
            self.note(op, outcome)
        elif isinstance(op, Bulk):
            outcomes = await self.service.create_records([self.request(c) for c in op.items])
            for c, outcome in zip(op.items, outcomes, strict=True):
                self.note(c, outcome)
        elif self.created:
            rid = self.created[op.pick % len(self.created)]
            try:
                await self.service.void_record(
                    self.who, rid, VoidRecord(reason="property"), datetime.now(UTC)
                )
            except RequestError as exc:
                if exc.code != "VALIDATION_ERROR":  # only voiding a void may be refused
                    raise


async def check_ledger(database: str, sessions: list[str]) -> None:
    conn = await asyncpg.connect(database)
    try:
        for sid in sessions:
            s = await conn.fetchrow(
                """SELECT total_units, total_records, total_voided, total_workers
                   FROM production_sessions WHERE session_id = $1""",
                sid,
            )
            led = await conn.fetchrow(
                """SELECT coalesce(sum(units), 0) AS units,
                          count(*) FILTER (WHERE kind = 'record') AS records,
                          count(*) FILTER (WHERE state = 'voided') AS voided,
                          count(DISTINCT worker_id) FILTER (
                              WHERE kind = 'record' AND state = 'inserted') AS workers
                   FROM production_records WHERE session_id = $1""",
                sid,
            )
            assert s is not None and led is not None
            assert (
                s["total_units"],
                s["total_records"],
                s["total_voided"],
                s["total_workers"],
            ) == (
                led["units"],
                led["records"],
                led["voided"],
                led["workers"],
            )
            by_worker = await conn.fetch(
                """SELECT w.worker_id, w.units, w.records, w.voided,
                          coalesce(sum(r.units), 0) AS l_units,
                          count(r.*) FILTER (WHERE r.kind = 'record') AS l_records,
                          count(r.*) FILTER (WHERE r.state = 'voided') AS l_voided
                   FROM session_worker_totals w
                   LEFT JOIN production_records r
                     ON r.session_id = w.session_id AND r.worker_id = w.worker_id
                   WHERE w.session_id = $1
                   GROUP BY w.worker_id, w.units, w.records, w.voided""",
                sid,
            )
            for w in by_worker:
                assert (w["units"], w["records"], w["voided"]) == (
                    w["l_units"],
                    w["l_records"],
                    w["l_voided"],
                ), dict(w)
        dupes = await conn.fetchval(
            """SELECT count(*) FROM (
                   SELECT 1 FROM production_records WHERE session_id = ANY($1::text[])
                     AND kind = 'record'
                   GROUP BY session_id, worker_id, client_event_id HAVING count(*) > 1) d""",
            sessions,
        )
        assert dupes == 0
        voids = await conn.fetchval(
            """SELECT count(*) FROM production_records v
               JOIN production_records r ON r.record_id = v.void_of
               WHERE v.session_id = ANY($1::text[])
                 AND (r.state <> 'voided' OR r.voided_by <> v.record_id OR v.units <> -r.units)""",
            sessions,
        )
        assert voids == 0
    finally:
        await conn.close()


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=operations)
async def test_totals_always_equal_the_ledger(
    store: PostgresStore, database: str, ops: list[Any]
) -> None:
    """Random creates, replays, conflicts, bulks and voids, some concurrent: books balance."""
    tenant = await make_tenant(store)
    service = Service(store, Limits())
    who = Principal(tenant.user, tenant.company_id)
    sessions = []
    for sector in (tenant.sector_id, tenant.extra_sectors[0]):
        opened = await service.open_session(
            who,
            OpenSession.model_validate({"projectId": tenant.project_id, "sectorId": sector}),
            datetime.now(UTC),
        )
        sessions.append(opened["sessionId"])
    run = Run(service, who, sessions)
    for op in ops:
        await run.apply(op)
    await check_ledger(database, sessions)
    for key, ids in run.answers.items():
        assert len(ids) == 1, (key, ids)  # every answer for a key names the one stored record
        assert run.new_per_key[key] == 1, key  # and exactly one of them created it
