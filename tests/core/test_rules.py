"""Session rules of SPEC §5: day, ownership, open/expired, late sync, limits, amount, iso()."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest

from gateway.core.rules import (
    Limits,
    Principal,
    SessionFacts,
    admit_record,
    amount,
    check_access,
    check_duration,
    check_extension,
    check_open,
    check_recorded_at,
    check_units,
    day_iso,
    deadline,
    iso,
    refusal_for_closed,
    session_day,
    to_millis,
    zone,
)
from gateway.errors import (
    Forbidden,
    InvalidRequest,
    NotFound,
    RequestError,
    SessionClosed,
    SessionExpired,
)

OPENED = datetime(2025, 10, 19, 8, tzinfo=UTC)
DEADLINE = OPENED + timedelta(hours=12)
SESSION = SessionFacts(
    session_id="6507f1e3c9d8e2a4b1f9c3d5",
    company_id="comp_12345",
    owner="user_123456789",
    status="open",
    opened_at=OPENED,
    closed_at=None,
    close_reason=None,
    max_duration_hours=12,
    version=1,
)
CLOSED_AT = OPENED + timedelta(hours=6)
CLOSED = replace(SESSION, status="closed", closed_at=CLOSED_AT, close_reason="closed")
EXPIRED = replace(SESSION, status="closed", closed_at=DEADLINE, close_reason="expired")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


# --- day in the project's timezone ----------------------------------------------------------


@pytest.mark.parametrize(
    ("opened_at", "tz", "day"),
    [
        # The seeds' example: 08:00Z is 02:00 in Mexico City, the same day.
        ("2025-10-19T08:00:00Z", "America/Mexico_City", date(2025, 10, 19)),
        ("2025-10-19T04:00:00Z", "America/Mexico_City", date(2025, 10, 18)),
        ("2025-10-19T05:59:59Z", "America/Mexico_City", date(2025, 10, 18)),
        ("2025-10-19T06:00:00Z", "America/Mexico_City", date(2025, 10, 19)),
        # Mexico City has kept UTC-6 all year since 2022.
        ("2025-07-01T05:59:00Z", "America/Mexico_City", date(2025, 6, 30)),
        ("2025-07-01T06:00:00Z", "America/Mexico_City", date(2025, 7, 1)),
        # New York, spring forward on 2025-03-09 (EST -5 -> EDT -4).
        ("2025-03-09T04:59:59Z", "America/New_York", date(2025, 3, 8)),
        ("2025-03-09T05:00:00Z", "America/New_York", date(2025, 3, 9)),
        ("2025-03-09T07:30:00Z", "America/New_York", date(2025, 3, 9)),
        ("2025-03-10T03:59:59Z", "America/New_York", date(2025, 3, 9)),
        ("2025-03-10T04:00:00Z", "America/New_York", date(2025, 3, 10)),
        # New York, fall back on 2025-11-02 (EDT -4 -> EST -5).
        ("2025-11-02T03:59:59Z", "America/New_York", date(2025, 11, 1)),
        ("2025-11-02T04:00:00Z", "America/New_York", date(2025, 11, 2)),
        ("2025-11-02T06:30:00Z", "America/New_York", date(2025, 11, 2)),
        ("2025-11-03T04:59:59Z", "America/New_York", date(2025, 11, 2)),
        ("2025-11-03T05:00:00Z", "America/New_York", date(2025, 11, 3)),
        # Berlin: CEST +2 until 2025-10-26, CET +1 after.
        ("2025-10-25T21:59:59Z", "Europe/Berlin", date(2025, 10, 25)),
        ("2025-10-25T22:00:00Z", "Europe/Berlin", date(2025, 10, 26)),
        ("2025-10-26T22:59:59Z", "Europe/Berlin", date(2025, 10, 26)),
        ("2025-10-26T23:00:00Z", "Europe/Berlin", date(2025, 10, 27)),
        ("2025-12-31T23:00:00Z", "Europe/Berlin", date(2026, 1, 1)),
        # Kolkata +05:30 (half-hour offset).
        ("2025-10-18T18:29:59Z", "Asia/Kolkata", date(2025, 10, 18)),
        ("2025-10-18T18:30:00Z", "Asia/Kolkata", date(2025, 10, 19)),
        # Kiritimati +14: the first place to reach a date.
        ("2025-10-18T09:59:59Z", "Pacific/Kiritimati", date(2025, 10, 18)),
        ("2025-10-18T10:00:00Z", "Pacific/Kiritimati", date(2025, 10, 19)),
        # Pago Pago -11: among the last.
        ("2025-10-19T10:59:59Z", "Pacific/Pago_Pago", date(2025, 10, 18)),
        ("2025-10-19T11:00:00Z", "Pacific/Pago_Pago", date(2025, 10, 19)),
        ("2025-10-19T00:00:00Z", "UTC", date(2025, 10, 19)),
        ("2025-10-19T23:59:59.999Z", "UTC", date(2025, 10, 19)),
    ],
)
def test_session_day(opened_at: str, tz: str, day: date) -> None:
    """The day is the local calendar date of openedAt in the project's timezone."""
    assert session_day(utc(opened_at), tz) == day


def test_session_day_of_an_offset_instant() -> None:
    """openedAt given with any offset is the same instant and yields the same day."""
    local = datetime(2025, 10, 18, 22, tzinfo=timezone(timedelta(hours=-6)))
    assert session_day(local, "Asia/Kolkata") == date(2025, 10, 19)
    assert session_day(local, "America/Mexico_City") == date(2025, 10, 18)


@pytest.mark.parametrize(
    "name", ["Mars/Olympus_Mons", "", "America/Mexico City", "../etc/passwd", "UTC/", "America"]
)
def test_unknown_timezone_is_invalid_request(name: str) -> None:
    """An unknown IANA name (or a zoneinfo folder name) is InvalidRequest, never another error."""
    with pytest.raises(InvalidRequest):
        zone(name)
    with pytest.raises(InvalidRequest):
        session_day(OPENED, name)


@pytest.mark.parametrize(
    ("day", "text"),
    [
        (date(2025, 10, 19), "2025-10-19T00:00:00.000Z"),
        (date(2025, 1, 2), "2025-01-02T00:00:00.000Z"),
        (date(2024, 2, 29), "2024-02-29T00:00:00.000Z"),
    ],
)
def test_day_iso(day: date, text: str) -> None:
    """day is written as that date at T00:00:00.000Z (the seeds' format)."""
    assert day_iso(day) == text


# --- access ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("who", "error"),
    [
        (Principal("user_123456789", "comp_12345"), None),
        (Principal("user_other", "comp_12345"), Forbidden),
        (Principal("user_123456789", "comp_other"), NotFound),
        (Principal("user_other", "comp_other"), NotFound),
    ],
)
def test_check_access(who: Principal, error: type[RequestError] | None) -> None:
    """Owner passes; same company other user is FORBIDDEN; another company's is NOT_FOUND."""
    if error is None:
        check_access(SESSION, who)
    else:
        with pytest.raises(error) as info:
            check_access(SESSION, who)
        assert SESSION.session_id in info.value.message


# --- open, closed, expired ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("session", "at", "error"),
    [
        pytest.param(SESSION, OPENED, None, id="open-at-start"),
        pytest.param(SESSION, DEADLINE - timedelta(seconds=1), None, id="open-before-deadline"),
        pytest.param(SESSION, DEADLINE + timedelta(seconds=1), SessionExpired, id="past-deadline"),
        pytest.param(SESSION, DEADLINE + timedelta(days=3), SessionExpired, id="long-past"),
        pytest.param(CLOSED, CLOSED_AT, SessionClosed, id="closed"),
        pytest.param(CLOSED, OPENED, SessionClosed, id="closed-even-before-deadline"),
        pytest.param(EXPIRED, DEADLINE + timedelta(hours=1), SessionExpired, id="closed-expired"),
    ],
)
def test_refusal_for_closed_and_check_open(
    session: SessionFacts, at: datetime, error: type[RequestError] | None
) -> None:
    """Open sessions pass until the deadline; closed is SESSION_CLOSED; expired SESSION_EXPIRED."""
    refusal = refusal_for_closed(session, at)
    if error is None:
        assert refusal is None
        check_open(session, at)
        return
    assert type(refusal) is error
    with pytest.raises(error):
        check_open(session, at)


def test_expired_refusal_names_the_deadline() -> None:
    """SESSION_EXPIRED details carry the sessionId and when it expired."""
    refusal = refusal_for_closed(SESSION, DEADLINE + timedelta(minutes=5))
    assert isinstance(refusal, SessionExpired)
    assert refusal.details == {"sessionId": SESSION.session_id, "expiredAt": iso(DEADLINE)}
    assert refusal.code == "SESSION_EXPIRED"


def test_closed_refusal_names_the_close() -> None:
    """SESSION_CLOSED details carry the sessionId and closedAt."""
    refusal = refusal_for_closed(CLOSED, CLOSED_AT)
    assert isinstance(refusal, SessionClosed)
    assert refusal.details == {"sessionId": SESSION.session_id, "closedAt": iso(CLOSED_AT)}


def test_deadline_and_expired_at() -> None:
    """The deadline is openedAt + maxDurationHours; an open session past it is to be expired."""
    assert SESSION.deadline == DEADLINE
    assert deadline(OPENED, 1.5) == OPENED + timedelta(minutes=90)
    assert not SESSION.expired_at(DEADLINE - timedelta(seconds=1))
    assert SESSION.expired_at(DEADLINE + timedelta(seconds=1))
    assert not CLOSED.expired_at(DEADLINE + timedelta(days=1))


# --- admitting records (late-sync grace) ------------------------------------------------------

H = timedelta(hours=1)
S = timedelta(seconds=1)


@pytest.mark.parametrize(
    ("session", "recorded", "arrival", "grace_s", "error"),
    [
        pytest.param(SESSION, OPENED + H, OPENED + H, 0, None, id="open"),
        pytest.param(SESSION, OPENED - H, OPENED + H, 0, None, id="open-any-recorded-at"),
        pytest.param(SESSION, OPENED + H, DEADLINE + S, 0, SessionExpired, id="expired-no-grace"),
        pytest.param(CLOSED, OPENED + H, CLOSED_AT + S, 0, SessionClosed, id="closed-no-grace"),
        pytest.param(
            SESSION, DEADLINE - S, DEADLINE + 5 * 60 * S, 600, None, id="expired-within-grace"
        ),
        pytest.param(SESSION, OPENED, DEADLINE + 600 * S, 600, None, id="expired-grace-edge"),
        pytest.param(
            SESSION, OPENED + H, DEADLINE + 601 * S, 600, SessionExpired, id="expired-after-grace"
        ),
        pytest.param(
            SESSION, DEADLINE + S, DEADLINE + 10 * S, 600, SessionExpired, id="made-after-deadline"
        ),
        pytest.param(
            SESSION, OPENED - S, DEADLINE + 10 * S, 600, SessionExpired, id="made-before-open"
        ),
        pytest.param(CLOSED, CLOSED_AT - S, CLOSED_AT + 300 * S, 600, None, id="closed-in-grace"),
        pytest.param(
            CLOSED, CLOSED_AT - S, CLOSED_AT + 601 * S, 600, SessionClosed, id="closed-after-grace"
        ),
        pytest.param(
            CLOSED, CLOSED_AT + S, CLOSED_AT + 10 * S, 600, SessionClosed, id="made-after-close"
        ),
        pytest.param(
            EXPIRED, DEADLINE - H, DEADLINE + 300 * S, 600, None, id="closed-expired-in-grace"
        ),
        pytest.param(
            EXPIRED, DEADLINE - H, DEADLINE + 700 * S, 600, SessionExpired, id="closed-expired-late"
        ),
        # arrived before the deadline, decided after the sweeper closed it: judged on arrival
        pytest.param(EXPIRED, DEADLINE - H, DEADLINE - S, 0, None, id="arrived-before-sweep"),
        pytest.param(EXPIRED, DEADLINE - H, DEADLINE, 0, SessionExpired, id="arrived-at-deadline"),
        pytest.param(CLOSED, CLOSED_AT - H, CLOSED_AT - S, 0, SessionClosed, id="closed-by-owner"),
    ],
)
def test_admit_record(
    session: SessionFacts,
    recorded: datetime,
    arrival: datetime,
    grace_s: float,
    error: type[RequestError] | None,
) -> None:
    """Open sessions take records; after close only records made inside the window, within grace."""
    if error is None:
        admit_record(session, recorded, arrival, grace_s)
    else:
        with pytest.raises(error):
            admit_record(session, recorded, arrival, grace_s)


# --- limits -----------------------------------------------------------------------------------

ARRIVAL = datetime(2025, 10, 19, 14, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("offset_s", "skew_s", "ok"),
    [
        (-86_400, 300, True),
        (0, 300, True),
        (300, 300, True),
        (301, 300, False),
        (3600, 300, False),
        (0, 0, True),
        (1, 0, False),
    ],
)
def test_check_recorded_at(offset_s: int, skew_s: float, ok: bool) -> None:
    """recordedAtUtc may be in the past, but at most the clock skew in the future."""
    recorded = ARRIVAL + timedelta(seconds=offset_s)
    if ok:
        check_recorded_at(recorded, ARRIVAL, skew_s)
    else:
        with pytest.raises(InvalidRequest) as info:
            check_recorded_at(recorded, ARRIVAL, skew_s)
        assert info.value.details["fields"][0]["field"] == "recordedAtUtc"


@pytest.mark.parametrize(
    ("units", "ok"), [(0, True), (5.5, True), (100_000, True), (100_000.5, False), (1e300, False)]
)
def test_check_units(units: float, ok: bool) -> None:
    """units up to GATEWAY_MAX_UNITS pass; more is VALIDATION_ERROR naming the field."""
    if ok:
        check_units(units, Limits())
    else:
        with pytest.raises(InvalidRequest) as info:
            check_units(units, Limits(), field="records[2].units")
        assert info.value.details["fields"][0]["field"] == "records[2].units"


@pytest.mark.parametrize(
    ("current", "requested", "ok"),
    [
        (12, 18, True),
        (12, 12.5, True),
        (12, 48, True),
        (12, 12, False),
        (12, 11, False),
        (12, 48.5, False),
        (12, 1000, False),
        (48, 48, False),
    ],
)
def test_check_extension(current: float, requested: float, ok: bool) -> None:
    """Extend must raise maxDurationHours, and not beyond GATEWAY_MAX_SESSION_HOURS (48)."""
    if ok:
        check_extension(current, requested, Limits())
    else:
        with pytest.raises(InvalidRequest) as info:
            check_extension(current, requested, Limits())
        assert info.value.details["fields"][0]["field"] == "maxDurationHours"


def test_check_duration_honours_the_limit() -> None:
    """maxDurationHours above the configured limit is refused, at the limit accepted."""
    check_duration(24, Limits(max_session_hours=24))
    with pytest.raises(InvalidRequest, match="maxDurationHours"):
        check_duration(24.1, Limits(max_session_hours=24))


def test_project_default_duration_above_the_limit_names_the_project() -> None:
    """A project default over the limit: the refusal says it is the project's, and what to send."""
    check_duration(48, Limits(max_session_hours=48), default_of="proj_1")
    with pytest.raises(InvalidRequest) as info:
        check_duration(100, Limits(max_session_hours=48), default_of="proj_1")
    assert "proj_1" in info.value.message and "send maxDurationHours" in info.value.message
    assert info.value.details["fields"][0]["field"] == "maxDurationHours"


# --- amount -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("units", "price", "bonus", "expected"),
    [
        pytest.param("8", "5.5", None, "44.0", id="no-bonus"),
        pytest.param("8", "5.5", {}, "44.0", id="empty-bonus"),
        pytest.param("8", "5.5", {"type": "percent", "value": 10}, "48.40", id="percent"),
        pytest.param("8", "5.5", {"type": "percent", "value": 10.0}, "48.40", id="percent-float"),
        pytest.param("10", "2", {"type": "percent", "value": 12.5}, "22.5", id="percent-half"),
        pytest.param("8", "5.5", {"type": "percent", "value": 0}, "44", id="percent-zero"),
        pytest.param("8", "5.5", {"type": "fixed", "value": 10}, "54.0", id="fixed"),
        pytest.param("0", "5.5", {"type": "fixed", "value": 10}, "10", id="fixed-once"),
        pytest.param("3", "0.1", None, "0.3", id="exact-decimal"),
        pytest.param("3", "0.1", {"type": "percent", "value": 0.1}, "0.3003", id="tiny-percent"),
        pytest.param("-2", "5", None, "-10", id="net-negative"),
    ],
)
def test_amount(units: str, price: str, bonus: dict[str, Any] | None, expected: str) -> None:
    """amount = net units x price, x (1 + value/100) for percent, + value once for fixed."""
    result = amount(Decimal(units), Decimal(price), bonus)
    assert isinstance(result, Decimal)
    assert result == Decimal(expected)


def test_amount_percent_does_not_compound_with_units() -> None:
    """A fixed bonus is added once per session, not once per unit."""
    one = amount(Decimal(1), Decimal(1), {"type": "fixed", "value": 5})
    many = amount(Decimal(100), Decimal(1), {"type": "fixed", "value": 5})
    assert many - one == Decimal(99)


# --- time format ------------------------------------------------------------------------------

ISO_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (datetime(2025, 10, 19, 8, tzinfo=UTC), "2025-10-19T08:00:00.000Z"),
        (datetime(2025, 10, 19, 8, 0, 0, 999_999, tzinfo=UTC), "2025-10-19T08:00:00.999Z"),
        (datetime(2025, 10, 19, 8, 0, 0, 1_000, tzinfo=UTC), "2025-10-19T08:00:00.001Z"),
        (datetime(2025, 10, 19, 8, 0, 0, 999, tzinfo=UTC), "2025-10-19T08:00:00.000Z"),
        (
            datetime(2025, 10, 19, 2, 0, tzinfo=timezone(timedelta(hours=-6))),
            "2025-10-19T08:00:00.000Z",
        ),
        (
            datetime(2025, 10, 19, 1, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
            "2025-10-18T20:00:00.000Z",
        ),
        (datetime(1, 1, 1, tzinfo=UTC), "0001-01-01T00:00:00.000Z"),
    ],
)
def test_iso(value: datetime, text: str) -> None:
    """iso() is always UTC with exactly 3 fractional digits and a trailing Z."""
    assert iso(value) == text
    assert ISO_RE.match(text)


def test_iso_of_none() -> None:
    """iso(None) is None (e.g. closedAt of an open session)."""
    assert iso(None) is None


def test_to_millis() -> None:
    """to_millis drops sub-millisecond precision, as the wire shows it."""
    value = datetime(2025, 10, 19, 8, 0, 0, 123_987, tzinfo=UTC)
    assert to_millis(value) == datetime(2025, 10, 19, 8, 0, 0, 123_000, tzinfo=UTC)
    assert iso(to_millis(value)) == iso(value)


def test_a_refusal_shows_the_value_sent_not_a_rounded_one() -> None:
    """units 100000.5 read "units 100000 exceeds the limit of 100000"."""
    with pytest.raises(InvalidRequest, match=r"units 100000\.5 exceeds the limit of 100000$"):
        check_units(100000.5, Limits(max_units=100000))
    with pytest.raises(InvalidRequest, match=r"maxDurationHours 48\.0001 exceeds"):
        check_duration(48.0001, Limits(max_session_hours=48))
