"""Session rules of SPEC §5, as pure functions of a session snapshot and an instant."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import orjson

from gateway.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
    SessionClosed,
    SessionExpired,
)


@dataclass(frozen=True, slots=True)
class Limits:
    """The configurable bounds the rules enforce."""

    max_units: float = 100_000
    max_session_hours: float = 48
    clock_skew_s: float = 300
    late_sync_grace_s: float = 0
    max_bulk: int = 1_000


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated user and the company the database says they belong to."""

    sub: str
    company_id: str


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """What the rules need to know about a session (a snapshot at some version)."""

    session_id: str
    company_id: str
    owner: str
    status: str  # "open" | "closed"
    opened_at: datetime
    closed_at: datetime | None
    close_reason: str | None
    max_duration_hours: float
    version: int
    deadline: datetime = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "deadline", deadline(self.opened_at, self.max_duration_hours))

    def expired_at(self, at: datetime) -> bool:
        """Open but past its deadline at ``at``: to be closed as expired."""
        return self.status == "open" and at >= self.deadline


@lru_cache(maxsize=512)
def zone(name: str) -> ZoneInfo:
    """The IANA zone ``name``, or InvalidRequest."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidRequest(f"unknown IANA timezone {name!r}, e.g. America/Mexico_City") from None


def session_day(opened_at: datetime, timezone: str) -> date:
    """The local calendar date of ``opened_at`` in the project's timezone."""
    return opened_at.astimezone(zone(timezone)).date()


@lru_cache(maxsize=64)
def _seconds(value: float) -> timedelta:
    return timedelta(seconds=value)


def deadline(opened_at: datetime, max_duration_hours: float) -> datetime:
    return opened_at + timedelta(hours=max_duration_hours)


def check_access(session: SessionFacts, who: Principal) -> None:
    """Another company's session does not exist for the caller; another user's is forbidden."""
    if session.company_id != who.company_id:
        raise NotFound(f"session {session.session_id} not found")
    if session.owner != who.sub:
        raise Forbidden(
            f"session {session.session_id} belongs to another user; only its owner may use it"
        )


def refusal_for_closed(
    session: SessionFacts, at: datetime
) -> SessionClosed | SessionExpired | None:
    """Why ``session`` takes no changes at ``at``, or None if it is open."""
    if session.status == "open":
        if at >= session.deadline:
            return SessionExpired(
                f"session {session.session_id} expired at {iso(session.deadline)}",
                {"sessionId": session.session_id, "expiredAt": iso(session.deadline)},
            )
        return None
    if session.close_reason == "expired":
        return SessionExpired(
            f"session {session.session_id} expired at {iso(session.closed_at)}",
            {"sessionId": session.session_id, "expiredAt": iso(session.closed_at)},
        )
    return SessionClosed(
        f"session {session.session_id} is closed",
        {"sessionId": session.session_id, "closedAt": iso(session.closed_at)},
    )


def arrived_before_expiry(session: SessionFacts, arrival: datetime) -> bool:
    """Closed as expired, but ``arrival`` came before that deadline (``closed_at``): the
    sweeper got there while the request waited its turn. Judged on arrival (SPEC §5), the
    request is applied as if the session were still open."""
    return (
        session.close_reason == "expired"
        and session.closed_at is not None
        and arrival < session.closed_at
    )


def check_open(session: SessionFacts, at: datetime) -> None:
    refusal = refusal_for_closed(session, at)
    if refusal is not None:
        raise refusal


def admit_record(
    session: SessionFacts, recorded_at: datetime, arrival: datetime, grace_s: float
) -> None:
    """May a new record with ``recorded_at``, arriving at ``arrival``, enter ``session``?

    Open and not expired: yes, and so if it arrived before the deadline of a session the
    sweeper closed as expired while the record waited its turn (SPEC §5: judged on arrival
    time). Closed or expired: only with a late-sync grace, when the record was made inside the
    session's open window and arrives within the grace after it ended.
    """
    refusal = refusal_for_closed(session, arrival)
    if refusal is None or arrived_before_expiry(session, arrival):
        return
    if grace_s > 0:
        window_end = session.closed_at if session.status == "closed" else session.deadline
        if (
            window_end is not None
            and session.opened_at <= recorded_at <= window_end
            and arrival <= window_end + timedelta(seconds=grace_s)
        ):
            return
    raise refusal


def check_recorded_at(recorded_at: datetime, arrival: datetime, skew_s: float) -> None:
    if recorded_at > arrival + _seconds(skew_s):
        raise InvalidRequest(
            f"recordedAtUtc {iso(recorded_at)} is in the future (more than {skew_s:g} s ahead); "
            "check the device clock",
            {"fields": [{"field": "recordedAtUtc", "message": "is in the future"}]},
        )


def check_units(units: float, limits: Limits, field: str = "units") -> None:
    if units > limits.max_units:
        raise InvalidRequest(
            f"{field} {units:.15g} exceeds the limit of {limits.max_units:g}",
            {"fields": [{"field": field, "message": f"must be <= {limits.max_units:g}"}]},
        )


def check_duration(hours: float, limits: Limits, *, default_of: str | None = None) -> None:
    """``hours`` within GATEWAY_MAX_SESSION_HOURS. ``default_of`` names the project whose
    default it is (seeded before the limit was lowered): the device never sent it, so the
    refusal says what to send."""
    if hours <= limits.max_session_hours:
        return
    limit = f"{limits.max_session_hours:g}"
    if default_of is None:
        message, field = (
            f"maxDurationHours {hours:.15g} exceeds the limit of {limit}",
            f"must be <= {limit}",
        )
    else:
        message = (
            f"project {default_of} has a default maxDurationHours of {hours:g}, above the limit "
            f"of {limit}: send maxDurationHours (<= {limit}) or have the project's default lowered"
        )
        field = f"required here: the project's default {hours:g} is > {limit}"
    raise InvalidRequest(message, {"fields": [{"field": "maxDurationHours", "message": field}]})


def check_extension(current_hours: float, requested_hours: float, limits: Limits) -> None:
    if requested_hours <= current_hours:
        raise InvalidRequest(
            f"maxDurationHours must be greater than the current {current_hours:g}",
            {"fields": [{"field": "maxDurationHours", "message": f"must be > {current_hours:g}"}]},
        )
    check_duration(requested_hours, limits)


def amount(units: Decimal, price: Decimal, bonus: dict[str, Any] | None) -> Decimal:
    """Net units x price, scaled by a percent bonus or plus a fixed one."""
    base = units * price
    if not bonus:
        return base
    value = Decimal(str(bonus.get("value", 0)))
    if bonus.get("type") == "percent":
        return base * (1 + value / 100)
    if bonus.get("type") == "fixed":
        return base + value
    return base


_ISO_OPTIONS = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC


def iso(value: datetime | None) -> str | None:
    """``2025-10-19T08:00:00.000Z``: UTC with milliseconds, as in the seeds.

    On the hot path (every reply), so formatted by orjson (C) rather than strftime.
    """
    if value is None:
        return None
    if value.tzinfo is not None and value.utcoffset():
        value = value.astimezone(UTC)
    text = orjson.dumps(value, option=_ISO_OPTIONS).decode()  # "…:SS[.ffffff]Z"
    if len(text) == 22:  # no fraction
        return text[1:20] + ".000Z"
    return text[1:24] + "Z"


def to_millis(value: datetime) -> datetime:
    """``value`` truncated to whole milliseconds (what the wire shows)."""
    return value.replace(microsecond=value.microsecond // 1000 * 1000)


def day_iso(day: date) -> str:
    return f"{day.isoformat()}T00:00:00.000Z"
