"""Idempotency keys and the replay-or-conflict decision (SPEC §5)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from gateway.errors import IdempotencyConflict, InvalidRequest

CLIENT_PREFIX = "client:"


def client_key(session_id: str, worker_id: str, client_event_id: str) -> str:
    """``client:{sessionId}:{workerId}:{clientEventId}``, unique in PostgreSQL."""
    return f"{CLIENT_PREFIX}{session_id}:{worker_id}:{client_event_id}"


def check_idempotency_key(
    key: str | None, session_id: str, worker_id: str, client_event_id: str
) -> None:
    """An idempotencyKey shaped like a client key must be this record's own: the check
    (SPEC §5) reads ``client:...`` as a client key, and would answer for another record."""
    if key is None or split_client_key(key) is None:
        return
    own = client_key(session_id, worker_id, client_event_id)
    if key != own:
        raise InvalidRequest(
            f"idempotencyKey {key!r} has the form of another record's key "
            "client:{sessionId}:{workerId}:{clientEventId}; use this record's own "
            f"({own!r}) or a key of another form",
            {
                "fields": [
                    {"field": "idempotencyKey", "message": "has the form of another record's key"}
                ]
            },
        )


def split_client_key(key: str) -> tuple[str, str] | None:
    """``(sessionId, "workerId:clientEventId")`` of a client key, or None.

    Session ids never contain ``:``, so the first one after the prefix ends the session id;
    worker and event ids may contain ``:`` themselves, so the rest is matched as a whole.
    """
    if not key.startswith(CLIENT_PREFIX):
        return None
    session_id, sep, rest = key[len(CLIENT_PREFIX) :].partition(":")
    if not session_id or not sep or ":" not in rest:
        return None
    return session_id, rest


@dataclass(frozen=True, slots=True)
class RecordContent:
    """The fields that make two creates of one record "the same content"."""

    session_id: str
    worker_id: str
    worker_name: str
    units: float
    recorded_at: datetime
    client_event_id: str
    idempotency_key: str | None
    owner: str = ""  # the session owner (stored) or the caller (incoming)
    record_id: str | None = None  # set on stored records


def same_content(stored: RecordContent, incoming: RecordContent) -> bool:
    return (
        stored.worker_id == incoming.worker_id
        and stored.worker_name == incoming.worker_name
        and float(stored.units) == float(incoming.units)
        and stored.recorded_at == incoming.recorded_at
        and stored.idempotency_key == incoming.idempotency_key
    )


def resolve_existing(
    incoming: RecordContent,
    by_client_key: RecordContent | None,
    by_idempotency_key: RecordContent | None,
) -> RecordContent | None:
    """The stored record ``incoming`` replays, None if it is new, or IdempotencyConflict.

    A client key match must have the same content. An ``idempotencyKey`` match names its
    record: the same content (SPEC §5: workerId, worker_name, units, recordedAtUtc and the key)
    replays it, from another session of the same owner too (a backlog re-sent into the next
    session is stored once); the same key in another user's session is a conflict, never
    their record.
    """
    if by_client_key is None and by_idempotency_key is None:
        return None
    if (
        by_client_key is not None
        and by_idempotency_key is not None
        and by_client_key.record_id != by_idempotency_key.record_id
    ):
        raise IdempotencyConflict(
            "clientEventId and idempotencyKey name two different stored records",
            {"key": client_key(incoming.session_id, incoming.worker_id, incoming.client_event_id)},
        )
    stored = by_client_key or by_idempotency_key
    if stored is None:  # pragma: no cover - excluded above
        return None
    foreign = stored.session_id != incoming.session_id and stored.owner != incoming.owner
    if foreign or not same_content(stored, incoming):
        key = (
            client_key(incoming.session_id, incoming.worker_id, incoming.client_event_id)
            if by_client_key is not None
            else incoming.idempotency_key
        )
        hint = (
            "send a new clientEventId for a new record"
            if by_client_key is not None
            else "send a new idempotencyKey (or none) for a new record"
        )
        raise IdempotencyConflict(
            f"key {key} was already used for a record with different content; {hint}",
            {"key": key, "fields": differing_fields(stored, incoming)},
        )
    return stored


def differing_fields(stored: RecordContent, incoming: RecordContent) -> list[str]:
    names = []
    if stored.session_id != incoming.session_id and stored.owner != incoming.owner:
        names.append("sessionId")
    if stored.worker_id != incoming.worker_id:
        names.append("workerId")
    if stored.worker_name != incoming.worker_name:
        names.append("worker_name")
    if float(stored.units) != float(incoming.units):
        names.append("units")
    if stored.recorded_at != incoming.recorded_at:
        names.append("recordedAtUtc")
    if stored.idempotency_key != incoming.idempotency_key:
        names.append("idempotencyKey")
    return names
