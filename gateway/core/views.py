"""The wire shapes of sessions and records (the seeds' response examples), from plain data."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from gateway.core.idempotency import RecordContent
from gateway.core.models import number_out
from gateway.core.rules import SessionFacts, amount, day_iso, iso


@dataclass(frozen=True, slots=True)
class WorkerTotals:
    units: Decimal
    records: int
    voided: int


@dataclass(frozen=True, slots=True)
class Totals:
    units: Decimal = Decimal(0)
    records: int = 0
    voided: int = 0
    workers: int = 0
    by_worker: dict[str, WorkerTotals] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Session:
    """A production session as stored, with its totals."""

    facts: SessionFacts
    project_id: str
    sector_id: str | None
    sector_name: str | None
    timezone: str
    day: date
    sampling_unit: str
    price_per_unit: Decimal
    bonus: dict[str, Any] | None
    notes: str | None
    totals: Totals = field(default_factory=Totals)

    @property
    def session_id(self) -> str:
        return self.facts.session_id


@dataclass(frozen=True, slots=True)
class Record:
    """A ledger row: a record, or the counter-movement that voids one."""

    record_id: str
    session_id: str
    company_id: str
    owner: str
    worker_id: str
    worker_name: str
    units: Decimal
    recorded_at: datetime
    client_event_id: str | None
    idempotency_key: str | None
    kind: str  # "record" | "void"
    state: str  # "inserted" | "voided"
    void_of: str | None
    void_reason: str | None
    voided_by: str | None
    created_at: datetime

    def content(self) -> RecordContent:
        return RecordContent(
            session_id=self.session_id,
            worker_id=self.worker_id,
            worker_name=self.worker_name,
            units=float(self.units),
            recorded_at=self.recorded_at,
            client_event_id=self.client_event_id or "",
            idempotency_key=self.idempotency_key,
            owner=self.owner,
            record_id=self.record_id,
        )


def dec_out(value: Decimal) -> float | int:
    return number_out(float(value))


def totals_object(session: Session) -> dict[str, Any]:
    t = session.totals
    return {
        "units": dec_out(t.units),
        "records": t.records,
        "voided": t.voided,
        "workers": t.workers,
        "amount": dec_out(amount(t.units, session.price_per_unit, session.bonus)),
        "byWorker": {
            worker: {"units": dec_out(w.units), "records": w.records, "voided": w.voided}
            for worker, w in sorted(t.by_worker.items())
        },
    }


def session_object(session: Session) -> dict[str, Any]:
    f = session.facts
    return {
        "sessionId": f.session_id,
        "companyId": f.company_id,
        "projectId": session.project_id,
        "auth0Id": f.owner,
        "sectorId": session.sector_id,
        "sector_name": session.sector_name,
        "timezone": session.timezone,
        "day": day_iso(session.day),
        "status": f.status,
        "openedAt": iso(f.opened_at),
        "closedAt": iso(f.closed_at),
        "closeReason": f.close_reason,
        "expiresAt": iso(f.deadline),
        "maxDurationHours": number_out(f.max_duration_hours),
        "samplingUnit": session.sampling_unit,
        "pricePerUnit": dec_out(session.price_per_unit),
        "bonus": session.bonus,
        "totals": totals_object(session),
        "notes": session.notes,
    }


def record_preview(record: Record) -> dict[str, Any]:
    """The ``payloadPreview`` of a create reply: the record as stored."""
    out: dict[str, Any] = {
        "sessionId": record.session_id,
        "workerId": record.worker_id,
        "worker_name": record.worker_name,
        "units": dec_out(record.units),
        "recordedAtUtc": iso(record.recorded_at),
        "clientEventId": record.client_event_id,
    }
    if record.idempotency_key is not None:
        out["idempotencyKey"] = record.idempotency_key
    return out


def record_object(record: Record) -> dict[str, Any]:
    """A record for ``records/{id}/get``: the seeds' shape plus what a reconciler needs."""
    out = {
        "recordId": record.record_id,
        "sessionId": record.session_id,
        "workerId": record.worker_id,
        "worker_name": record.worker_name,
        "units": dec_out(record.units),
        "recordedAtUtc": iso(record.recorded_at),
        "clientEventId": record.client_event_id,
        "idempotencyKey": record.idempotency_key,
        "kind": record.kind,
        "state": record.state,
        "createdAt": iso(record.created_at),
    }
    if record.kind == "void":
        out["voidOf"] = record.void_of
        out["reason"] = record.void_reason
    if record.voided_by is not None:
        out["voidRecordId"] = record.voided_by
    return out


_CURRENT: dict[str, Callable[[Session], object]] = {
    "samplingUnit": lambda s: s.sampling_unit,
    "pricePerUnit": lambda s: float(s.price_per_unit),
    "bonus": lambda s: s.bonus,
    "notes": lambda s: s.notes,
}


def actual_changes(session: Session, changes: dict[str, Any]) -> dict[str, Any]:
    """The fields of an update (wire names, bonus as JSON) whose value differs from the
    session's: a re-sent update, or one that sets what is already there, changes nothing and
    is announced nowhere."""
    return {k: v for k, v in changes.items() if _CURRENT[k](session) != v}


# How far a bulk reply's per-item errors are cut, in turn, to fit the broker's message size:
# the fields' details first, then long messages, then the messages (the code stays, and the
# dead-letter table keeps every item's whole refusal).
BULK_TRIM_STEPS = 3
TRIMMED_MESSAGE = 120


def trim_bulk_results(results: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    """``results`` with each failed item's error cut down to ``step`` (1-3)."""
    out = []
    for result in results:
        error = result.get("error")
        if not isinstance(error, dict):
            out.append(result)
            continue
        cut: dict[str, Any] = {"code": error.get("code"), "details": {}}
        message = str(error.get("message", ""))
        if step == 1:
            cut["message"] = message
        elif step == 2:
            cut["message"] = message[:TRIMMED_MESSAGE]
        else:
            cut["message"] = ""
        out.append({**result, "error": cut})
    return out
