"""The operations of SPEC §2, written once and used by both the MQTT and the HTTP transport.

Each operation takes an authenticated ``Principal`` and a validated request, applies the pure
rules of ``gateway.core`` and lets the store (PostgreSQL) have the final word.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, NamedTuple, TypeVar

import orjson

from gateway.core import rules
from gateway.core.auth import Claims
from gateway.core.events import (
    EventType,
    SessionEvent,
    new_event,
    new_record_id,
    new_record_ids,
    new_session_id,
)
from gateway.core.idempotency import (
    RecordContent,
    check_idempotency_key,
    resolve_existing,
    split_client_key,
)
from gateway.core.models import (
    Bonus,
    BulkRecords,
    CreateRecord,
    ExtendSession,
    OpenSession,
    UpdateSession,
    VoidRecord,
    number_out,
    validate,
)
from gateway.core.rules import Limits, Principal, SessionFacts
from gateway.core.views import (
    Record,
    Session,
    actual_changes,
    dec_out,
    record_object,
    record_preview,
    session_object,
    totals_object,
)
from gateway.errors import (
    Forbidden,
    IdempotencyConflict,
    Internal,
    InvalidRequest,
    NotFound,
    RequestError,
    SessionAlreadyOpen,
    SessionExpired,
    error_body,
)
from gateway.store.postgres import NewRecord, NewSession, PostgresStore, SessionTx

log = logging.getLogger(__name__)

MAX_RECORD_ATTEMPTS = 4
CACHE_LIMIT = 100_000


class RecordRequest(NamedTuple):
    """One record to create, from a single create or an item of a bulk."""

    who: Principal
    cmd: CreateRecord
    session_id: str
    arrival: datetime

    def content(self) -> RecordContent:
        c = self.cmd
        return RecordContent(
            session_id=self.session_id,
            worker_id=c.workerId,
            worker_name=c.worker_name,
            units=c.units,
            recorded_at=c.recordedAtUtc,
            client_event_id=c.clientEventId,
            idempotency_key=c.idempotencyKey,
            owner=self.who.sub,
        )


@dataclass(frozen=True, slots=True)
class RecordAccepted:
    """A record stored (now, or before: ``idempotent``) and what the reply shows of it."""

    record_id: str
    preview: dict[str, Any]
    idempotent: bool

    @classmethod
    def stored(cls, record: Record, *, idempotent: bool) -> RecordAccepted:
        return cls(record.record_id, record_preview(record), idempotent)

    @classmethod
    def new(cls, r: RecordRequest, record_id: str) -> RecordAccepted:
        """Just inserted: the preview comes from the request (no Record to build)."""
        c = r.cmd
        preview: dict[str, Any] = {
            "sessionId": r.session_id,
            "workerId": c.workerId,
            "worker_name": c.worker_name,
            "units": number_out(c.units),
            "recordedAtUtc": rules.iso(c.recordedAtUtc),
            "clientEventId": c.clientEventId,
        }
        if c.idempotencyKey is not None:
            preview["idempotencyKey"] = c.idempotencyKey
        return cls(record_id, preview, False)

    def data(self) -> dict[str, Any]:
        return {
            "recordId": self.record_id,
            "payloadPreview": self.preview,
            "idempotent": self.idempotent,
        }


RecordOutcome = RecordAccepted | RequestError


class Bulk:
    """One bulk (offline sync): its items' requests and, as outcomes arrive, their results."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items
        self.requests: list[tuple[int, RecordRequest]] = []
        self.results: list[dict[str, Any]] = []
        for i, item in enumerate(items):
            event_id = item.get("clientEventId") if isinstance(item, dict) else None
            self.results.append(
                {"index": i, "clientEventId": event_id if isinstance(event_id, str) else None}
            )

    @classmethod
    def prepare(cls, who: Principal, data: object, arrival: datetime, limit: int) -> Bulk:
        """Validate the bulk (refused whole over ``limit``) and each item on its own."""
        cmd = validate(BulkRecords, data)
        if len(cmd.records) > limit:
            raise InvalidRequest(
                f"a bulk holds at most {limit} records (GATEWAY_MAX_BULK); this one has "
                f"{len(cmd.records)}: split it",
                {"limit": limit, "count": len(cmd.records)},
            )
        bulk = cls(cmd.records)
        for i, item in enumerate(cmd.records):
            try:
                if not isinstance(item, dict):
                    raise InvalidRequest(f"records[{i}] must be a JSON object")
                rec = validate(CreateRecord, item, prefix=f"records[{i}].")
                owner = item.get("auth0Id")
                if owner is not None and not isinstance(owner, str):
                    raise InvalidRequest(
                        f"records[{i}].auth0Id must be a string",
                        {"fields": [{"field": f"records[{i}].auth0Id", "message": "string"}]},
                    )
                if owner is not None and owner != who.sub:
                    raise Forbidden(
                        f"records[{i}].auth0Id differs from the token's subject; leave it out "
                        "or send the token's own"
                    )
                if rec.sessionId is None:
                    raise InvalidRequest(
                        f"records[{i}].sessionId is required in a bulk",
                        {"fields": [{"field": f"records[{i}].sessionId", "message": "required"}]},
                    )
            except RequestError as exc:
                bulk.settle(i, exc)
                continue
            bulk.requests.append((i, RecordRequest(who, rec, rec.sessionId, arrival)))
        return bulk

    def settle(self, i: int, outcome: RecordOutcome) -> None:
        result = self.results[i]
        if isinstance(outcome, RequestError):
            result["status"] = "failed"
            result["error"] = _bulk_item_error(i, error_body(outcome))
        else:
            result["status"] = "duplicated" if outcome.idempotent else "ok"
            result["recordId"] = outcome.record_id

    def sink(self, i: int) -> Callable[[RecordOutcome], None]:
        return lambda outcome: self.settle(i, outcome)

    def failures(self) -> Iterator[tuple[str, str, bytes]]:
        """``(code, message, item as JSON)`` of every failed item: its dead letter."""
        for item, result in zip(self.items, self.results, strict=True):
            error = result.get("error")
            if error is not None:
                yield error["code"], error["message"], orjson.dumps(item)

    def body(self) -> dict[str, Any]:
        """``{"status", "results", "summary"}`` as SPEC §4 gives it."""
        summary = {"ok": 0, "duplicated": 0, "failed": 0}
        for result in self.results:
            result.setdefault("status", "failed")
            if result["status"] == "failed" and "error" not in result:
                result["error"] = error_body(RuntimeError("no outcome"))
            summary[result["status"]] += 1
        return {"status": "success", "results": self.results, "summary": summary}


def _bulk_item_error(i: int, error: dict[str, Any]) -> dict[str, Any]:
    """Field paths in a bulk item's error name the item (``records[4].units``), whichever
    check (the schema, or a rule such as the clock skew) found the fault."""
    fields = error["details"].get("fields")
    if not isinstance(fields, list):
        return error
    prefix = f"records[{i}]."
    named = [
        {**f, "field": prefix + f["field"]}
        if isinstance(f, dict)
        and isinstance(f.get("field"), str)
        and not f["field"].startswith("records[")
        else f
        for f in fields
    ]
    return {**error, "details": {**error["details"], "fields": named}}


def utcnow() -> datetime:
    return datetime.now(UTC)


class Service:
    """Production sessions and records, over a PostgreSQL store."""

    def __init__(
        self,
        store: PostgresStore,
        limits: Limits,
        *,
        on_expired: Callable[[int], None] = lambda _n: None,
    ) -> None:
        self.store = store
        self.limits = limits
        # Caches that stay correct: entries are dropped on PostgreSQL notifications (the app
        # wires them), and the database still decides: inserts are guarded by the session
        # version, and a refusal read from the cache is checked again against the database.
        self.session_cache: dict[str, SessionFacts] = {}
        self.user_cache: dict[str, Principal] = {}
        self._notified = 0  # notifications so far: what was read across one is not cached
        # called when a request finds an open session past its deadline (wakes the sweeper)
        self.on_expired_seen: Callable[[], None] = lambda: None
        # n sessions this process closed as expired (committed), whichever request found them
        self.on_expired = on_expired

    # who is asking --------------------------------------------------------------------------

    async def principals(
        self, asks: Sequence[tuple[Claims, str | None]]
    ) -> list[Principal | RequestError]:
        """The principal of each (verified claims, payload auth0Id); companies in one query."""
        # taken from the cache before any await: a notification or a full cache may empty it
        # meanwhile, which must not turn a known user into an unknown one
        known = {c.sub: who for c, _ in asks if (who := self.user_cache.get(c.sub)) is not None}
        missing = {c.sub for c, _ in asks} - known.keys()
        if missing:
            notified = self._notified
            companies = await self.store.companies_of(sorted(missing))
            found = {sub: Principal(sub, company) for sub, company in companies.items()}
            known.update(found)
            if notified == self._notified:
                _remember(self.user_cache, found)
        out: list[Principal | RequestError] = []
        for claims, auth0_id in asks:
            who = known.get(claims.sub)
            if auth0_id is not None and auth0_id != claims.sub:
                out.append(Forbidden("auth0Id in the payload differs from the token's subject"))
            elif who is None:
                out.append(Forbidden(f"user {claims.sub} is not registered with any company"))
            else:
                out.append(who)
        return out

    async def principal(self, claims: Claims, auth0_id: str | None = None) -> Principal:
        (result,) = await self.principals([(claims, auth0_id)])
        if isinstance(result, RequestError):
            raise result
        return result

    # sessions -------------------------------------------------------------------------------

    async def open_session(
        self, who: Principal, cmd: OpenSession, arrival: datetime
    ) -> dict[str, Any]:
        project = await self.store.project(cmd.projectId)
        if project is None or project.company_id != who.company_id:
            raise NotFound(f"project {cmd.projectId} not found in your company")
        sector_name = cmd.sector_name
        if cmd.sectorId is not None:
            known = await self.store.sector_name(project.project_id, cmd.sectorId)
            if known is None:
                raise NotFound(f"sector {cmd.sectorId} not found in project {project.project_id}")
            sector_name = sector_name or known
        opened_at = cmd.openedAt or rules.to_millis(arrival)
        if opened_at > arrival + timedelta(seconds=self.limits.clock_skew_s):
            raise InvalidRequest(
                "openedAt is in the future; check the device clock",
                {"fields": [{"field": "openedAt", "message": "is in the future"}]},
            )
        if cmd.maxDurationHours is None:
            hours = project.max_duration_hours
            rules.check_duration(hours, self.limits, default_of=project.project_id)
        else:
            hours = cmd.maxDurationHours
            rules.check_duration(hours, self.limits)
        deadline = rules.deadline(opened_at, hours)
        # A deadline already passed creates nothing, but the key's open session (extended
        # since, say) is still the answer to a device re-sending its open.
        too_late = deadline <= arrival
        # left out: the project's bonus; null: none, as an update's null clears it
        bonus: dict[str, Any] | None
        if cmd.bonus is not None:
            bonus = cmd.bonus.as_json()
        else:
            bonus = None if "bonus" in cmd.model_fields_set else project.bonus
        new = NewSession(
            session_id=new_session_id(),
            company_id=who.company_id,
            project_id=project.project_id,
            owner=who.sub,
            sector_id=cmd.sectorId,
            sector_name=sector_name,
            timezone=project.timezone,
            day=rules.session_day(opened_at, project.timezone),
            opened_at=opened_at,
            max_duration_hours=hours,
            expires_at=deadline,
            sampling_unit=cmd.samplingUnit or project.sampling_unit,
            price_per_unit=(
                Decimal(repr(cmd.pricePerUnit))
                if cmd.pricePerUnit is not None
                else project.price_per_unit
            ),
            bonus=bonus,
            notes=cmd.notes,
        )
        draft = session_object_for_new(new)
        events = [new_event(EventType.OPENED, new.session_id, draft, arrival)]
        session, created, expired = await self.store.open_session(
            new, arrival, events, lambda closed: expiry_events(closed, arrival), create=not too_late
        )
        for gone in expired:
            self.session_changed(gone.session_id)
        if expired:
            self.on_expired(len(expired))
        if session is None:
            raise SessionExpired(
                f"a session opened at {rules.iso(opened_at)} for {hours:g} h "
                f"expired at {rules.iso(deadline)}",
                {"expiredAt": rules.iso(deadline)},
            )
        if not created:
            if session.facts.owner != who.sub:
                raise SessionAlreadyOpen(
                    f"session {session.session_id} is already open for this project, day "
                    "and sector by another user",
                    {"sessionId": session.session_id},
                )
            return {**session_object(session), "idempotent": True}
        return {**session_object(session), "idempotent": False}

    async def get_session(
        self, who: Principal, session_id: str, arrival: datetime | None = None
    ) -> dict[str, Any]:
        """The session object. One found past its deadline (the sweeper not yet by) is closed
        as expired first, so a get never shows open what refuses records as expired."""
        session = await self.store.session(session_id)
        if session is None:
            raise NotFound(f"session {session_id} not found")
        rules.check_access(session.facts, who)
        if arrival is not None and session.facts.expired_at(arrival):
            session = await self._expire_now(session_id, arrival) or session
        return session_object(session)

    async def _expire_now(self, session_id: str, arrival: datetime) -> Session | None:
        try:
            async with self.store.lock_session(session_id) as tx:
                if tx is None:
                    return None
                if not tx.session.facts.expired_at(arrival):
                    return tx.session  # closed or extended meanwhile
                expired = await tx.expire()
                await tx.emit(expiry_events([expired], arrival))
            self.on_expired(1)  # committed
            return expired
        finally:
            self.session_changed(session_id)

    async def update_session(
        self, who: Principal, session_id: str, cmd: UpdateSession, arrival: datetime
    ) -> dict[str, Any]:
        changes = cmd.changes()
        if not changes:
            raise InvalidRequest(
                "nothing to update: send at least one of samplingUnit, pricePerUnit, bonus, notes"
            )
        if "samplingUnit" in changes and changes["samplingUnit"] is None:
            raise InvalidRequest(
                "samplingUnit cannot be null",
                {"fields": [{"field": "samplingUnit", "message": "must be a string"}]},
            )
        if "pricePerUnit" in changes and changes["pricePerUnit"] is None:
            raise InvalidRequest(
                "pricePerUnit cannot be null",
                {"fields": [{"field": "pricePerUnit", "message": "must be a number"}]},
            )
        if isinstance(changes.get("bonus"), Bonus):
            changes["bonus"] = changes["bonus"].as_json()

        async def apply(tx: SessionTx) -> dict[str, Any]:
            changed = actual_changes(tx.session, changes)
            if not changed:  # a re-sent update, or values already set: nothing to announce
                return {"updated": True}
            session = await tx.update(changed)
            await tx.emit(
                [
                    new_event(
                        EventType.UPDATED,
                        session_id,
                        {**session_object(session), "changed": sorted(changed)},
                        arrival,
                    )
                ]
            )
            return {"updated": True}

        return await self._change_open_session(who, session_id, arrival, apply)

    async def close_session(
        self, who: Principal, session_id: str, arrival: datetime
    ) -> dict[str, Any]:
        closed_at = rules.to_millis(arrival)

        async def apply(tx: SessionTx) -> dict[str, Any]:
            session = await tx.close(closed_at)
            await tx.emit(
                [new_event(EventType.CLOSED, session_id, session_object(session), arrival)]
            )
            return {"sessionId": session_id, "status": "closed", "closedAt": rules.iso(closed_at)}

        return await self._change_open_session(who, session_id, arrival, apply)

    async def extend_session(
        self, who: Principal, session_id: str, cmd: ExtendSession, arrival: datetime
    ) -> dict[str, Any]:
        async def apply(tx: SessionTx) -> dict[str, Any]:
            facts = tx.session.facts
            rules.check_extension(facts.max_duration_hours, cmd.maxDurationHours, self.limits)
            deadline = rules.deadline(facts.opened_at, cmd.maxDurationHours)
            session = await tx.extend(cmd.maxDurationHours, deadline)
            data = {
                **session_object(session),
                "previousMaxDurationHours": number_out(facts.max_duration_hours),
            }
            await tx.emit([new_event(EventType.EXTENDED, session_id, data, arrival)])
            return {"maxDurationHours": number_out(cmd.maxDurationHours)}

        return await self._change_open_session(who, session_id, arrival, apply)

    async def _change_open_session(
        self,
        who: Principal,
        session_id: str,
        arrival: datetime,
        apply: Callable[[SessionTx], Awaitable[dict[str, Any]]],
    ) -> dict[str, Any]:
        """Lock the session, check owner and open, ``apply`` and commit.

        A session found past its deadline is closed as expired (and announced) in the same
        transaction, and the request is refused with SESSION_EXPIRED.
        """
        refusal: RequestError | None = None
        try:
            async with self.store.lock_session(session_id) as tx:
                if tx is None:
                    raise NotFound(f"session {session_id} not found")
                facts = tx.session.facts
                rules.check_access(facts, who)
                refusal = rules.refusal_for_closed(facts, arrival)
                if refusal is None:
                    return await apply(tx)
                expiring = facts.expired_at(arrival)
                if expiring:
                    expired = await tx.expire()
                    await tx.emit(expiry_events([expired], arrival))
            if expiring:
                self.on_expired(1)  # committed
        finally:
            self.session_changed(session_id)  # this process knows first; others get a NOTIFY
        raise refusal

    async def expire_due(self, now: datetime, due_by: datetime | None = None) -> list[str]:
        """Close and announce (at ``now``) every session whose deadline has passed by
        ``due_by`` (default ``now``); the ids closed by this call."""
        closed = await self.store.expire_due(
            now if due_by is None else due_by, lambda s: expiry_events(s, now)
        )
        for s in closed:
            self.session_changed(s.session_id)
        if closed:
            self.on_expired(len(closed))
        return [s.session_id for s in closed]

    # records --------------------------------------------------------------------------------

    async def create_records(self, reqs: Sequence[RecordRequest]) -> list[RecordOutcome]:
        """Create records in as few round trips as the batch allows; one outcome per request.

        New records are inserted with one statement guarded by each session's version. What
        does not go in is looked up: a replay (same content) answers with the original, a key
        with different content is a conflict, and a stale decision is made again.
        """
        outcomes: list[RecordOutcome | None] = [None] * len(reqs)
        pending: list[int] = []
        for i, r in enumerate(reqs):
            try:
                self._check_record(r)
            except RequestError as exc:
                outcomes[i] = exc
            else:
                pending.append(i)
        for attempt in range(MAX_RECORD_ATTEMPTS):
            if not pending:
                break
            # new ids every round: one that clashed with a stored id is not tried again
            ids = dict(zip(pending, new_record_ids(len(pending)), strict=True))
            pending = await self._record_round(reqs, pending, ids, outcomes, fresh=attempt > 0)
        for i in pending:
            log.error("record %s could not be decided", reqs[i].cmd.clientEventId)
            outcomes[i] = Internal("the record could not be applied; retry with the same ids")
        return [o if o is not None else Internal("no outcome") for o in outcomes]

    async def _session_facts(self, ids: set[str], *, fresh: bool) -> dict[str, SessionFacts]:
        """Facts of the sessions ``ids`` (those that exist), from the cache unless ``fresh``.

        What the cache holds is taken before the await: a notification arriving meanwhile (the
        sweeper closing one of them) must not make a session look missing (NOT_FOUND).
        """
        cache = self.session_cache
        known = {} if fresh else {s: f for s in ids if (f := cache.get(s)) is not None}
        wanted = ids - known.keys()
        if wanted:
            notified = self._notified
            found = await self.store.session_facts(sorted(wanted))
            known.update(found)
            if notified == self._notified:  # else what was read may predate the change
                _remember(cache, found)
        return known

    def session_changed(self, session_id: str) -> None:
        """A notification: the session's admission facts changed elsewhere."""
        self._notified += 1
        self.session_cache.pop(session_id, None)

    def user_changed(self, auth0_id: str) -> None:
        self._notified += 1
        self.user_cache.pop(auth0_id, None)

    def forget_all(self) -> None:
        """Notifications may have been missed: trust nothing cached."""
        self._notified += 1
        self.session_cache.clear()
        self.user_cache.clear()

    def _check_record(self, r: RecordRequest) -> None:
        c = r.cmd
        if c.sessionId is not None and c.sessionId != r.session_id:
            raise InvalidRequest(
                f"sessionId {c.sessionId} does not match {r.session_id}, the session the topic "
                "(or URL) names",
                {"fields": [{"field": "sessionId", "message": "must match the topic"}]},
            )
        rules.check_units(c.units, self.limits)
        rules.check_recorded_at(c.recordedAtUtc, r.arrival, self.limits.clock_skew_s)
        check_idempotency_key(c.idempotencyKey, r.session_id, c.workerId, c.clientEventId)

    async def _record_round(
        self,
        reqs: Sequence[RecordRequest],
        pending: list[int],
        ids: dict[int, str],
        outcomes: list[RecordOutcome | None],
        *,
        fresh: bool,
    ) -> list[int]:
        facts = await self._session_facts({reqs[i].session_id for i in pending}, fresh=fresh)
        to_insert: list[int] = []
        refused: dict[int, RequestError] = {}
        if not fresh:  # a refusal must not rest on the cache: confirm those sessions first
            doubtful = {
                reqs[i].session_id
                for i in pending
                if (f := facts.get(reqs[i].session_id)) is not None
                and rules.refusal_for_closed(f, reqs[i].arrival) is not None
            }
            if doubtful:
                facts.update(await self._session_facts(doubtful, fresh=True))
        for i in pending:
            r = reqs[i]
            f = facts.get(r.session_id)
            try:
                if f is None:
                    raise NotFound(f"session {r.session_id} not found")
                rules.check_access(f, r.who)
            except RequestError as exc:
                outcomes[i] = exc
                continue
            try:
                rules.admit_record(f, r.cmd.recordedAtUtc, r.arrival, self.limits.late_sync_grace_s)
            except RequestError as exc:
                refused[i] = exc  # unless it is a replay: answered before the open check
                if f.expired_at(r.arrival):
                    self.on_expired_seen()
            else:
                to_insert.append(i)
        inserted = await self.store.insert_records(
            [_new_record(reqs[i], ids[i], facts[reqs[i].session_id].version) for i in to_insert]
        )
        for i in to_insert:
            if ids[i] in inserted:
                outcomes[i] = RecordAccepted.new(reqs[i], ids[i])
        unresolved = [i for i in to_insert if ids[i] not in inserted] + list(refused)
        if not unresolved:
            return []
        by_client, by_idem = await self.store.existing_records(
            [
                (reqs[i].session_id, f"{reqs[i].cmd.workerId}:{reqs[i].cmd.clientEventId}")
                for i in unresolved
            ],
            [
                (reqs[i].who.company_id, k)
                for i in unresolved
                if (k := reqs[i].cmd.idempotencyKey) is not None
            ],
        )
        retry: list[int] = []
        for i in unresolved:
            r = reqs[i]
            client = by_client.get((r.session_id, f"{r.cmd.workerId}:{r.cmd.clientEventId}"))
            idem = (
                by_idem.get((r.who.company_id, r.cmd.idempotencyKey))
                if r.cmd.idempotencyKey is not None
                else None
            )
            try:
                stored = resolve_existing(
                    r.content(),
                    client.content() if client else None,
                    idem.content() if idem else None,
                )
            except IdempotencyConflict as exc:
                outcomes[i] = exc
                continue
            if stored is not None:
                original = client if client is not None else idem
                assert original is not None
                outcomes[i] = RecordAccepted.stored(original, idempotent=True)
            elif i in refused:
                outcomes[i] = refused[i]
            else:
                retry.append(i)  # the session changed under us: decide again
        return retry

    async def void_record(
        self, who: Principal, record_id: str, cmd: VoidRecord, arrival: datetime
    ) -> dict[str, Any]:
        """Cancel a record with a counter-movement; voiding again answers the same void."""
        refusal: RequestError | None = None
        async with self.store.lock_record(record_id) as tx:
            if tx is None or tx.record.company_id != who.company_id:
                raise NotFound(f"record {record_id} not found")
            facts = tx.session_tx.session.facts
            rules.check_access(facts, who)
            if tx.record.kind == "void":
                raise InvalidRequest(
                    f"{record_id} is itself a void (a counter-movement); it cannot be voided",
                    {"voidOf": tx.record.void_of},
                )
            existing = await tx.void_of()
            if existing is not None:  # a replay: answered before the open check
                return _void_data(existing, idempotent=True)
            refusal = rules.refusal_for_closed(facts, arrival)
            if refusal is None or rules.arrived_before_expiry(facts, arrival):
                void = await tx.void(new_record_id, cmd.reason, rules.to_millis(arrival))
                data = _void_data(void, idempotent=False)
                session = tx.session_tx.session
                await tx.session_tx.emit(
                    [
                        new_event(
                            EventType.RECORD_VOIDED,
                            session.session_id,
                            {
                                "recordId": record_id,
                                "voidRecordId": void.record_id,
                                "workerId": void.worker_id,
                                "units": dec_out(-void.units),
                                "reason": cmd.reason,
                                "totals": totals_object(session),
                            },
                            arrival,
                        )
                    ]
                )
                return data
            expiring = facts.expired_at(arrival)
            if expiring:
                expired = await tx.session_tx.expire()
                await tx.session_tx.emit(expiry_events([expired], arrival))
        if expiring:
            self.on_expired(1)  # committed
        raise refusal

    async def bulk_records(self, who: Principal, data: object, arrival: datetime) -> Bulk:
        """A whole bulk on its own (the REST mirror; MQTT merges bulks into its batches)."""
        bulk = Bulk.prepare(who, data, arrival, self.limits.max_bulk)
        outcomes = await self.create_records([rr for _, rr in bulk.requests])
        for (i, _), outcome in zip(bulk.requests, outcomes, strict=True):
            bulk.settle(i, outcome)
        return bulk

    async def get_record(self, who: Principal, record_id: str) -> dict[str, Any]:
        record = await self.store.record(record_id)
        if record is None or record.company_id != who.company_id:
            raise NotFound(f"record {record_id} not found")
        if record.owner != who.sub:
            raise Forbidden(f"record {record_id} belongs to another user's session")
        return record_object(record)

    async def check_key(self, who: Principal, key: str) -> bool:
        """Does ``key`` (a client key or an idempotencyKey) exist in the caller's company?"""
        return await self.store.key_exists(who.company_id, key, split_client_key(key))


def _new_record(r: RecordRequest, record_id: str, version: int) -> NewRecord:
    return NewRecord(
        record_id=record_id,
        company_id=r.who.company_id,
        session_id=r.session_id,
        owner=r.who.sub,
        worker_id=r.cmd.workerId,
        worker_name=r.cmd.worker_name,
        units=r.cmd.units,
        recorded_at=r.cmd.recordedAtUtc,
        client_event_id=r.cmd.clientEventId,
        idempotency_key=r.cmd.idempotencyKey,
        expected_version=version,
    )


def _void_data(void: Record, *, idempotent: bool) -> dict[str, Any]:
    return {
        "recordId": void.record_id,
        "voidedRecordId": void.void_of,
        "payloadPreview": {
            "recordId": void.record_id,
            "voidOf": void.void_of,
            "sessionId": void.session_id,
            "workerId": void.worker_id,
            "worker_name": void.worker_name,
            "units": dec_out(void.units),
            "reason": void.void_reason,
            "createdAt": rules.iso(void.created_at),
        },
        "idempotent": idempotent,
    }


K = TypeVar("K")
V = TypeVar("V")


def _remember(cache: dict[K, V], entries: Mapping[K, V]) -> None:
    """Add ``entries`` to a bounded cache (emptied when full)."""
    if len(cache) + len(entries) > CACHE_LIMIT:
        cache.clear()
    cache.update(entries)


def expiry_events(sessions: Sequence[Session], at: datetime) -> list[SessionEvent]:
    return [new_event(EventType.EXPIRED, s.session_id, session_object(s), at) for s in sessions]


def session_object_for_new(new: NewSession) -> dict[str, Any]:
    """The session object of a session about to be inserted (for its ``session.opened`` event)."""
    facts = SessionFacts(
        session_id=new.session_id,
        company_id=new.company_id,
        owner=new.owner,
        status="open",
        opened_at=new.opened_at,
        closed_at=None,
        close_reason=None,
        max_duration_hours=new.max_duration_hours,
        version=1,
    )
    return session_object(
        Session(
            facts=facts,
            project_id=new.project_id,
            sector_id=new.sector_id,
            sector_name=new.sector_name,
            timezone=new.timezone,
            day=new.day,
            sampling_unit=new.sampling_unit,
            price_per_unit=new.price_per_unit,
            bonus=new.bonus,
            notes=new.notes,
        )
    )
