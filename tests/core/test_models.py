"""Request payloads (SPEC §4, §5): bytes -> JSON object -> envelope + typed request."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from gateway.core.models import (
    EMPTY_ENVELOPE,
    Bonus,
    BulkRecords,
    CheckIdempotency,
    CloseSession,
    CreateRecord,
    Envelope,
    ExtendSession,
    OpenSession,
    UpdateSession,
    VoidRecord,
    decode_object,
    number_out,
    parse_record_fast,
    take_envelope,
    validate,
)
from gateway.errors import InvalidRequest, PayloadTooLarge

RECORD: dict[str, Any] = {
    "sessionId": "6507f1e3c9d8e2a4b1f9c3d5",
    "workerId": "JS0315",
    "worker_name": "John Smith",
    "units": 5,
    "recordedAtUtc": "2025-10-19T14:30:00.000Z",
    "clientEventId": "evt_1234567890abcdef",
}
AT = datetime(2025, 10, 19, 14, 30, tzinfo=UTC)


def record(**changes: object) -> dict[str, Any]:
    """The seeds' record example with ``changes`` applied (a value of ... removes the field)."""
    data = dict(RECORD)
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    return data


def refused_fields(exc: InvalidRequest) -> list[str]:
    return [f["field"] for f in exc.details["fields"]]


# --- decode_object ---------------------------------------------------------------------------


def test_a_number_beyond_a_double_is_refused_where_it_stands() -> None:
    """1e400 is valid JSON (RFC 8259 sets no range): not "invalid JSON", but a refusal of the
    field that holds it, the envelope (requestId) still read; NaN stays invalid JSON."""
    data = decode_object(
        b'{"pricePerUnit": 1e400, "requestId": "r-9"}', max_bytes=1024, max_depth=16
    )
    assert take_envelope(dict(data)).request_id == "r-9"
    assert "requestId" in take_envelope({"requestId": math.inf}).invalid
    with pytest.raises(InvalidRequest) as info:
        validate(UpdateSession, {k: v for k, v in data.items() if k != "requestId"})
    assert refused_fields(info.value) == ["pricePerUnit"]
    for raw in (b'{"a": NaN, "b": 1e400}', b'{"a": 1e400, "b": Infinity}', b'{"a": -1e400,'):
        with pytest.raises(InvalidRequest, match="not valid JSON"):
            decode_object(raw, max_bytes=1024, max_depth=16)


def test_integers_read_past_a_double_are_read_as_orjson_reads_them() -> None:
    """A payload orjson cannot read (a number beyond a double) is read by the standard
    library, whose integers have no bound: a 400-digit requestId then came back as an int no
    reply could encode (INTERNAL). Integers are read as orjson reads them: exact within 64
    bits, else a double, infinity past its range, refused where it stands."""
    huge = b"1" + b"0" * 400
    data = decode_object(
        b'{"requestId": ' + huge + b', "units": ' + huge + b', "a": 1e30, "n": 12345678901234'
        b', "big": ' + b"9" * 25 + b', "x": 1e400}',
        max_bytes=4096,
        max_depth=16,
    )
    assert data["units"] == math.inf
    assert data["n"] == 12345678901234 and isinstance(data["n"], int)
    assert data["big"] == 1e25 and isinstance(data["big"], float)
    assert "requestId" in take_envelope(data).invalid
    assert orjson.dumps(data)  # whatever is echoed can be written


@pytest.mark.parametrize(
    "raw",
    [
        b'{"x": 1e400, "sessionId": "\\ud800"}',
        b'{"x": 1e400, "a": {"b": ["ok", "\\udfff tail"]}}',
        b'{"x": 1e400, "\\ud83d": 1}',  # in a key
    ],
)
def test_a_lone_surrogate_is_refused_on_the_standard_library_path_too(raw: bytes) -> None:
    """orjson refuses a lone surrogate escape (no UTF-8 can carry it); the standard library,
    which reads payloads holding a number beyond a double, took it, and the string reached a
    dead-letter write that could not encode it: the pipeline died, and at every restart the
    redelivered request killed it again. Refused as orjson refuses it now."""
    with pytest.raises(InvalidRequest, match="not valid UTF-8"):
        decode_object(raw, max_bytes=1024, max_depth=16)
    with pytest.raises(InvalidRequest, match=r"not valid (UTF-8|JSON)"):  # orjson's refusal
        decode_object(raw.replace(b"1e400", b"1"), max_bytes=1024, max_depth=16)
    pair = decode_object(b'{"x": 1e400, "s": "\\ud83d\\ude00"}', max_bytes=1024, max_depth=16)
    assert pair["s"] == "\U0001f600"  # a pair is one character, as orjson reads it


def test_decode_refuses_payload_over_max_bytes() -> None:
    """A payload longer than max_bytes is PAYLOAD_TOO_LARGE with its size and the limit."""
    raw = b'{"a": "' + b"x" * 100 + b'"}'
    with pytest.raises(PayloadTooLarge) as info:
        decode_object(raw, max_bytes=len(raw) - 1, max_depth=16)
    assert info.value.code == "PAYLOAD_TOO_LARGE"
    assert info.value.details == {"size": len(raw), "limit": len(raw) - 1}


def test_decode_accepts_payload_of_exactly_max_bytes() -> None:
    """The limit itself is allowed."""
    raw = b'{"a": 1}'
    assert decode_object(raw, max_bytes=len(raw), max_depth=16) == {"a": 1}


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not json", id="garbage"),
        pytest.param(b"\x00\x01\x02", id="binary"),
        pytest.param(b"{", id="truncated"),
        pytest.param(b'{"a": 1,}', id="trailing-comma"),
        pytest.param(b"{'a': 1}", id="single-quotes"),
        pytest.param(b'{"a": NaN}', id="nan"),
        pytest.param(b'{"a": Infinity}', id="infinity"),
        pytest.param(b'{"a": "\xff"}', id="invalid-utf8"),
        pytest.param(b'{"a": "\xed\xa0\x80"}', id="utf8-surrogate"),
        pytest.param(b"\xef\xbb\xbf\xff{}", id="bom-then-garbage"),
        pytest.param(b"[]", id="array"),
        pytest.param(b'[{"a": 1}]', id="array-of-object"),
        pytest.param(b'"text"', id="string"),
        pytest.param(b"42", id="integer"),
        pytest.param(b"4.5", id="float"),
        pytest.param(b"null", id="null"),
        pytest.param(b"true", id="true"),
    ],
)
def test_decode_refuses_what_is_not_a_json_object(raw: bytes) -> None:
    """Garbage, invalid UTF-8 and JSON that is not an object are VALIDATION_ERROR."""
    with pytest.raises(InvalidRequest) as info:
        decode_object(raw, max_bytes=1024, max_depth=16)
    assert info.value.code == "VALIDATION_ERROR"


@pytest.mark.parametrize(
    ("raw", "depth_ok"),
    [
        pytest.param(b'{"a": {"b": {"c": 1}}}', True, id="objects-at-limit"),
        pytest.param(b'{"a": {"b": {"c": {}}}}', False, id="objects-over-limit"),
        pytest.param(b'{"a": [[1]]}', True, id="lists-at-limit"),
        pytest.param(b'{"a": [[[1]]]}', False, id="lists-over-limit"),
        pytest.param(b'{"a": [{"b": [2]}]}', False, id="mixed-over-limit"),
        pytest.param(b'{"a": [], "b": {}, "c": [], "d": {}}', True, id="wide-not-deep"),
        pytest.param(b'{"a": "[[[[{{{{[[[["}', True, id="brackets-in-string"),
    ],
)
def test_decode_nesting_limit(raw: bytes, depth_ok: bool) -> None:
    """The top object is level 1; a value nested deeper than max_depth is refused."""
    if depth_ok:
        assert isinstance(decode_object(raw, max_bytes=1024, max_depth=3), dict)
    else:
        with pytest.raises(InvalidRequest, match="deeper than 3"):
            decode_object(raw, max_bytes=1024, max_depth=3)


@pytest.mark.parametrize("opener", [b"[", b'{"a":'])
def test_decode_refuses_pathological_nesting(opener: bytes) -> None:
    """Thousands of nested brackets are refused as VALIDATION_ERROR, never a crash."""
    closer = b"]" if opener == b"[" else b"}"
    raw = b'{"x":' + opener * 5000 + b"1" + closer * 5000 + b"}"
    with pytest.raises(InvalidRequest):
        decode_object(raw, max_bytes=len(raw), max_depth=16)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (b"{}", {}),
        (b'  {"a": 1}  \n', {"a": 1}),
        ('{"worker_name": "José Ñúñez 🍓"}'.encode(), {"worker_name": "José Ñúñez 🍓"}),
        (b'{"a": {"b": [1, 2.5, null, true]}}', {"a": {"b": [1, 2.5, None, True]}}),
    ],
)
def test_decode_accepts_objects(raw: bytes, expected: dict[str, Any]) -> None:
    """A valid UTF-8 JSON object comes back as a dict."""
    assert decode_object(raw, max_bytes=1024, max_depth=16) == expected


# --- take_envelope ---------------------------------------------------------------------------


def test_take_envelope_removes_the_envelope_fields() -> None:
    """authorization, replyTo, requestId and auth0Id are taken out; the content stays."""
    data: dict[str, Any] = {
        "authorization": "Bearer a.b.c",
        "replyTo": "hydrobit/v2/clients/d1/replies",
        "requestId": "req-1",
        "auth0Id": "user_123456789",
        **RECORD,
    }
    envelope = take_envelope(data)
    assert data == RECORD
    assert envelope == Envelope(
        authorization="Bearer a.b.c",
        reply_to="hydrobit/v2/clients/d1/replies",
        request_id="req-1",
        auth0_id="user_123456789",
    )
    envelope.check()


def test_take_envelope_without_envelope_fields() -> None:
    """A payload with no envelope fields is left as it is."""
    data = dict(RECORD)
    assert take_envelope(data) == EMPTY_ENVELOPE
    assert data == RECORD


@pytest.mark.parametrize("request_id", [7, 7.5, "r", None])
def test_take_envelope_request_id_types(request_id: object) -> None:
    """requestId may be a string or a number (or null), and is echoed as given."""
    envelope = take_envelope({"requestId": request_id})
    assert envelope.request_id == request_id
    envelope.check()


def test_take_envelope_caps_a_long_request_id() -> None:
    """An over-long requestId string is cut, not refused."""
    envelope = take_envelope({"requestId": "r" * 10_000})
    assert isinstance(envelope.request_id, str)
    assert 0 < len(envelope.request_id) <= 256


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("authorization", 5),
        ("authorization", ["Bearer a.b.c"]),
        ("replyTo", {"topic": "x"}),
        ("replyTo", True),
        ("auth0Id", 123),
        ("requestId", True),
        ("requestId", {"id": 1}),
        ("requestId", [1]),
    ],
)
def test_take_envelope_flags_wrong_types(field: str, value: object) -> None:
    """An ill-typed envelope field is removed, and check() refuses it naming the field."""
    data: dict[str, Any] = {field: value, "units": 1}
    envelope = take_envelope(data)
    assert data == {"units": 1}
    assert envelope.invalid == (field,)
    with pytest.raises(InvalidRequest) as info:
        envelope.check()
    assert field in info.value.message
    # it says what the field may be: requestId is also taken as a number
    allowed = "a string or a number" if field == "requestId" else "a string"
    assert info.value.message.endswith(f"{field} must be {allowed}"), info.value.message
    assert refused_fields(info.value) == [field]


# --- validate(CreateRecord) ------------------------------------------------------------------


def test_validate_record_from_the_seeds() -> None:
    """The seeds' record example validates to the same values."""
    cmd = validate(CreateRecord, record())
    assert cmd.sessionId == RECORD["sessionId"]
    assert cmd.workerId == "JS0315"
    assert cmd.worker_name == "John Smith"
    assert cmd.units == 5
    assert cmd.recordedAtUtc == AT
    assert cmd.clientEventId == "evt_1234567890abcdef"
    assert cmd.idempotencyKey is None


def test_validate_record_units_default_to_one() -> None:
    """units is optional and defaults to 1 (seeds: 'defaults to 1')."""
    assert validate(CreateRecord, record(units=...)).units == 1


@pytest.mark.parametrize("field", ["workerId", "worker_name", "recordedAtUtc", "clientEventId"])
def test_validate_record_required_fields(field: str) -> None:
    """workerId, worker_name, recordedAtUtc and clientEventId are required."""
    with pytest.raises(InvalidRequest) as info:
        validate(CreateRecord, record(**{field: ...}))
    assert refused_fields(info.value) == [field]
    assert field in info.value.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("units", "5"),
        ("units", True),
        ("units", False),
        ("units", None),
        ("units", [5]),
        ("units", -1),
        ("units", -0.001),
        ("workerId", 315),
        ("workerId", None),
        ("workerId", ""),
        ("workerId", "w" * 129),
        ("worker_name", ""),
        ("worker_name", 7),
        ("worker_name", "n" * 257),
        ("clientEventId", ""),
        ("clientEventId", 12345),
        ("clientEventId", "e" * 129),
        ("idempotencyKey", ""),
        ("idempotencyKey", 99),
        ("idempotencyKey", "k" * 129),
        ("sessionId", ""),
        ("sessionId", 6507),
        ("workerId", "   "),
        ("worker_name", " \t "),
        ("clientEventId", "  "),
        ("idempotencyKey", " "),
    ],
)
def test_validate_record_refuses_bad_values(field: str, value: object) -> None:
    """Wrong types, negative units, empty and over-long strings are refused, naming the field."""
    with pytest.raises(InvalidRequest) as info:
        validate(CreateRecord, record(**{field: value}))
    assert info.value.code == "VALIDATION_ERROR"
    assert refused_fields(info.value) == [field]
    assert field in info.value.message


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("workerId", "w" * 128),
        ("worker_name", "n" * 256),
        ("clientEventId", "e" * 128),
        ("clientEventId", "evt:2025-10-19T08:00:00Z"),
        ("workerId", "04:A3:2B:9F"),  # a badge id
        ("worker_name", " John "),
        ("idempotencyKey", "k" * 128),
        ("units", 0),
        ("units", 0.5),
    ],
)
def test_validate_record_accepts_boundary_values(field: str, value: object) -> None:
    """Strings at their length limit and zero or fractional units are accepted."""
    assert getattr(validate(CreateRecord, record(**{field: value})), field) == value


@pytest.mark.parametrize("raw_units", [b"1e300", b"123456789012345678901234567890", b"1.7e308"])
def test_validate_record_huge_units_stay_finite(raw_units: bytes) -> None:
    """Huge JSON numbers decode to finite floats (never inf/NaN); check_units bounds them."""
    raw = b'{"workerId": "w", "worker_name": "n", "clientEventId": "e", '
    raw += b'"recordedAtUtc": "2025-10-19T14:30:00Z", "units": ' + raw_units + b"}"
    cmd = validate(CreateRecord, decode_object(raw, max_bytes=1024, max_depth=16))
    assert cmd.units > 1e29
    assert cmd.units != float("inf")


def test_validate_record_multiple_errors_name_every_field() -> None:
    """Every bad field is listed in the details, and the message names them."""
    with pytest.raises(InvalidRequest) as info:
        validate(CreateRecord, record(units=-1, workerId=5, recordedAtUtc=...))
    assert sorted(refused_fields(info.value)) == ["recordedAtUtc", "units", "workerId"]
    for name in ("units", "workerId", "recordedAtUtc"):
        assert name in info.value.message


def test_validate_prefix_locates_the_field() -> None:
    """A prefix (e.g. a bulk index) is put before the field name."""
    with pytest.raises(InvalidRequest) as info:
        validate(CreateRecord, record(units=-1), prefix="records[3].")
    assert refused_fields(info.value) == ["records[3].units"]
    assert "records[3].units" in info.value.message


def test_validate_refuses_a_non_object() -> None:
    """A record that is not an object (e.g. inside a bulk) is refused."""
    with pytest.raises(InvalidRequest):
        validate(CreateRecord, ["not", "an", "object"])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("2025-10-19T14:30:00.000Z", AT, id="zulu-millis"),
        pytest.param("2025-10-19T14:30:00Z", AT, id="zulu"),
        pytest.param("2025-10-19T14:30:00+00:00", AT, id="plus-zero"),
        pytest.param("2025-10-19T08:30:00-06:00", AT, id="mexico-offset"),
        pytest.param("2025-10-19T20:00:00+05:30", AT, id="kolkata-offset"),
        pytest.param("2025-10-20T04:30:00+14:00", AT, id="plus-fourteen"),
        pytest.param("2025-10-19T03:30:00-11:00", AT, id="minus-eleven"),
        pytest.param("2025-10-19T14:30:00", AT, id="naive-is-utc"),
        pytest.param("2025-10-19T14:30:00.000", AT, id="naive-millis"),
        pytest.param("2025-10-19t14:30:00.000z", AT, id="rfc3339-lowercase"),
        # kept to the millisecond, as replies write it (a device may send back what it saw)
        pytest.param(
            "2025-10-19T14:30:00.123456Z", AT.replace(microsecond=123000), id="microseconds"
        ),
        pytest.param("2025-10-19T14:30:00.1239Z", AT.replace(microsecond=123000), id="truncated"),
    ],
)
def test_recorded_at_parsing(text: str, expected: datetime) -> None:
    """recordedAtUtc in ISO 8601 is read as an instant, held in UTC to the millisecond."""
    parsed = validate(CreateRecord, record(recordedAtUtc=text)).recordedAtUtc
    assert parsed == expected
    assert parsed.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("2025-10-19", id="date-only"),
        pytest.param("2025-10-19Z", id="date-only-zulu"),
        pytest.param(1760884200, id="epoch-seconds"),
        pytest.param(1760884200000.0, id="epoch-millis"),
        pytest.param(None, id="null"),
        pytest.param("", id="empty"),
        pytest.param("yesterday", id="words"),
        pytest.param("2025-13-01T00:00:00Z", id="month-13"),
        pytest.param("2025-10-19T25:00:00Z", id="hour-25"),
        pytest.param("2025-02-30T00:00:00Z", id="february-30"),
        pytest.param("19/10/2025 14:30", id="local-format"),
        pytest.param({"$date": "2025-10-19T14:30:00Z"}, id="object"),
    ],
)
def test_recorded_at_refused(value: object) -> None:
    """Date-only values, numbers and non-ISO text are VALIDATION_ERROR on recordedAtUtc."""
    with pytest.raises(InvalidRequest) as info:
        validate(CreateRecord, record(recordedAtUtc=value))
    assert refused_fields(info.value) == ["recordedAtUtc"]


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("2025-10-19", "must include a time"),
        ("garbage", "must be an ISO 8601 date-time"),
        ("yesterday", "must be an ISO 8601 date-time"),
    ],
)
def test_recorded_at_refusal_says_what_is_wrong(value: str, says: str) -> None:
    """A date without its time is told so; text that is no date at all is not."""
    with pytest.raises(InvalidRequest) as info:
        validate(CreateRecord, record(recordedAtUtc=value))
    assert says in info.value.message


@pytest.mark.parametrize(
    "text", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "0001-01-01T00:30:00+14:00"]
)
def test_recorded_at_out_of_range_is_a_validation_error(text: str) -> None:
    """A date-time whose UTC instant falls outside the calendar is VALIDATION_ERROR, not a crash."""
    with pytest.raises(InvalidRequest) as info:
        validate(CreateRecord, record(recordedAtUtc=text))
    assert refused_fields(info.value) == ["recordedAtUtc"]


def test_opened_at_out_of_range_is_a_validation_error() -> None:
    """openedAt uses the same instant type and refuses the same way."""
    with pytest.raises(InvalidRequest) as info:
        validate(OpenSession, {"projectId": "proj_123", "openedAt": "0001-01-01T00:00:00+05:00"})
    assert refused_fields(info.value) == ["openedAt"]


def test_create_record_ignores_unknown_fields() -> None:
    """A record may carry extra fields from newer devices; they are ignored."""
    cmd = validate(CreateRecord, record(firmware="2.1.0"))
    assert not hasattr(cmd, "firmware")


# --- other requests --------------------------------------------------------------------------


def test_open_session_from_the_seeds() -> None:
    """The seeds' open example validates; openedAt is UTC; optional settings stay unset."""
    cmd = validate(
        OpenSession,
        {
            "projectId": "proj_123",
            "openedAt": "2025-10-19T08:00:00.000Z",
            "sectorId": "sector_001",
            "sector_name": "Lote A-1",
        },
    )
    assert cmd.openedAt == datetime(2025, 10, 19, 8, tzinfo=UTC)
    assert cmd.samplingUnit is None
    assert cmd.pricePerUnit is None
    assert cmd.bonus is None
    assert cmd.maxDurationHours is None


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({}, "projectId"),
        ({"projectId": ""}, "projectId"),
        ({"projectId": "p", "maxDurationHours": 0}, "maxDurationHours"),
        ({"projectId": "p", "maxDurationHours": "12"}, "maxDurationHours"),
        ({"projectId": "p", "pricePerUnit": -5.5}, "pricePerUnit"),
        ({"projectId": "p", "openedAt": "2025-10-19"}, "openedAt"),
        ({"projectId": "p", "notes": "n" * 2001}, "notes"),
        ({"projectId": "p", "bonus": {"type": "bogus", "value": 1}}, "bonus.type"),
        ({"projectId": "p", "bonus": {"type": "percent", "value": -1}}, "bonus.value"),
        ({"projectId": "p", "bonus": {"type": "fixed"}}, "bonus.value"),
        ({"projectId": "p", "bonus": {"type": "fixed", "value": 1, "x": 1}}, "bonus.x"),
        ({"projectId": "p", "pricePerUnit": 1e308}, "pricePerUnit"),
        ({"projectId": "p", "pricePerUnit": 1_000_000_001}, "pricePerUnit"),
        ({"projectId": "p", "bonus": {"type": "percent", "value": 1e308}}, "bonus.value"),
        ({"projectId": "p", "bonus": {"type": "fixed", "value": 2e9}}, "bonus.value"),
    ],
)
def test_open_session_refusals(payload: dict[str, Any], field: str) -> None:
    """Bad open-session fields are refused naming the (dotted) field."""
    with pytest.raises(InvalidRequest) as info:
        validate(OpenSession, payload)
    assert refused_fields(info.value) == [field]


def test_update_session_accepts_the_updatable_fields() -> None:
    """samplingUnit, pricePerUnit, bonus, notes (and a sessionId) are accepted; changes() lists
    only what was sent."""
    cmd = validate(
        UpdateSession,
        {
            "sessionId": "6507f1e3c9d8e2a4b1f9c3d5",
            "samplingUnit": "kg",
            "pricePerUnit": 6,
            "bonus": {"type": "percent", "value": 10, "note": "High quality bonus"},
            "notes": None,
        },
    )
    changes = cmd.changes()
    assert set(changes) == {"samplingUnit", "pricePerUnit", "bonus", "notes"}
    assert changes["notes"] is None
    assert changes["bonus"] == Bonus(type="percent", value=10, note="High quality bonus")
    assert validate(UpdateSession, {"notes": "x"}).changes() == {"notes": "x"}


@pytest.mark.parametrize(
    "field", ["projectId", "maxDurationHours", "status", "openedAt", "totals", "sector_name"]
)
def test_update_session_forbids_other_fields(field: str) -> None:
    """Any field other than the four updatable ones is VALIDATION_ERROR naming it."""
    with pytest.raises(InvalidRequest) as info:
        validate(UpdateSession, {"notes": "ok", field: "x"})
    assert refused_fields(info.value) == [field]
    assert field in info.value.message


@pytest.mark.parametrize(
    ("model", "payload", "field"),
    [
        (ExtendSession, {}, "maxDurationHours"),
        (ExtendSession, {"maxDurationHours": 0}, "maxDurationHours"),
        (ExtendSession, {"maxDurationHours": -3}, "maxDurationHours"),
        (VoidRecord, {}, "reason"),
        (VoidRecord, {"reason": ""}, "reason"),
        (VoidRecord, {"reason": 5}, "reason"),
        (CheckIdempotency, {}, "key"),
        (CheckIdempotency, {"key": ""}, "key"),
    ],
)
def test_required_fields_of_other_requests(
    model: type[ExtendSession | VoidRecord | CheckIdempotency],
    payload: dict[str, Any],
    field: str,
) -> None:
    """extend needs maxDurationHours > 0, void a reason, check a key."""
    with pytest.raises(InvalidRequest) as info:
        validate(model, payload)
    assert refused_fields(info.value) == [field]


def test_bonus_as_json() -> None:
    """A bonus is written back with whole numbers as integers and its note if any."""
    assert Bonus(type="percent", value=10.0).as_json() == {"type": "percent", "value": 10}
    assert Bonus(type="fixed", value=2.5, note="n").as_json() == {
        "type": "fixed",
        "value": 2.5,
        "note": "n",
    }


@pytest.mark.parametrize(
    ("value", "expected", "kind"),
    [
        (5.0, 5, int),
        (0.0, 0, int),
        (-3.0, -3, int),
        (5.5, 5.5, float),
        (0.1, 0.1, float),
        (1e300, 1e300, float),
    ],
)
def test_number_out(value: float, expected: float, kind: type) -> None:
    """Whole numbers are written as integers (5, not 5.0); others stay floats."""
    out = number_out(value)
    assert out == expected
    assert type(out) is kind


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"pricePerUnit": 1e308}, "pricePerUnit"),
        ({"bonus": {"type": "fixed", "value": 1e10}}, "bonus.value"),
    ],
)
def test_update_session_bounds_money(payload: dict[str, Any], field: str) -> None:
    """A price or bonus past 1e9 is a typo that would overflow the session's amount."""
    with pytest.raises(InvalidRequest) as info:
        validate(UpdateSession, payload)
    assert refused_fields(info.value) == [field]
    assert validate(UpdateSession, {"pricePerUnit": 1e9}).pricePerUnit == 1e9


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan"), 2.0**60])
def test_number_out_keeps_what_is_not_a_safe_integer(value: float) -> None:
    """inf and nan went through int() and raised; they stay floats (orjson writes null)."""
    out = number_out(value)
    assert isinstance(out, float)
    assert out == value or (math.isnan(out) and math.isnan(value))


@pytest.mark.parametrize("worker", ["   ", " \t"])
def test_the_hot_path_refuses_what_the_general_path_refuses(worker: str) -> None:
    """A workerId of only spaces does not slip through the one-pass parse."""
    assert parse_record_fast(orjson.dumps(record(workerId=worker))) is None


def test_messages_name_no_internals() -> None:
    """Neither our class names (pydantic's "instance of Bonus") nor orjson's "surrogates"."""
    with pytest.raises(InvalidRequest) as info:
        validate(OpenSession, {"projectId": "p", "bonus": "high"})
    assert info.value.details["fields"] == [{"field": "bonus", "message": "must be a JSON object"}]
    with pytest.raises(InvalidRequest) as info:
        decode_object(b'{"workerId": "\xff"}', max_bytes=1000, max_depth=16)
    assert info.value.message == "payload is not valid UTF-8: send JSON text encoded as UTF-8"


def test_a_leading_byte_order_mark_is_ignored() -> None:
    """RFC 8259 §8.1: a JSON parser may ignore a UTF-8 BOM (some editors and Blobs add one);
    it was refused as "not valid UTF-8", which sent the developer after the wrong problem."""
    body = orjson.dumps(record())
    assert decode_object(b"\xef\xbb\xbf" + body, max_bytes=1000, max_depth=16) == record()
    with pytest.raises(InvalidRequest) as info:
        decode_object(b"\xef\xbb\xbf{nope", max_bytes=1000, max_depth=16)
    assert info.value.message.startswith("payload is not valid JSON")
    with pytest.raises(InvalidRequest, match="must be a JSON object, got an array"):
        decode_object(b"\xef\xbb\xbf[1]", max_bytes=1000, max_depth=16)
    with pytest.raises(InvalidRequest, match="two byte order marks"):  # one is a mark, not two
        decode_object(b"\xef\xbb\xbf" * 2 + body, max_bytes=1000, max_depth=16)


@pytest.mark.parametrize(
    ("raw", "named"),
    [(b"null", "null"), (b"[]", "an array"), (b"1.5", "a number"), (b'"x"', "a string")],
)
def test_a_payload_that_is_no_object_is_named_in_json_terms(raw: bytes, named: str) -> None:
    """ "got NoneType" / "got list" named Python's types to a device developer."""
    with pytest.raises(InvalidRequest) as info:
        decode_object(raw, max_bytes=1000, max_depth=16)
    assert info.value.message == (
        f'payload must be a JSON object, got {named}: send {{"field": value, ...}}'
    )


@pytest.mark.parametrize(
    ("extra", "meant"),
    [
        ("unit", "units"),
        ("Units", "units"),
        ("UNITS", "units"),
        ("idempotency_key", "idempotencyKey"),
        ("idempotencykey", "idempotencyKey"),
        ("session_id", "sessionId"),
        ("SessionID", "sessionId"),
    ],
)
def test_a_misspelled_record_field_is_refused_by_name(extra: str, meant: str) -> None:
    """ "unit": 5 left out would pay 1 unit: a slip of a field not given (case, '_', an 's') is
    refused, on the general and the hot path, and inside a bulk with its item's index."""
    payload = {k: v for k, v in record().items() if k != meant} | {extra: 5}
    with pytest.raises(InvalidRequest) as info:
        validate(CreateRecord, payload, prefix="records[3].")
    fields = info.value.details["fields"]
    assert {
        "field": f"records[3].{extra}",
        "message": f"is not a field of a record; did you mean {meant}?",
    } in fields
    assert parse_record_fast(orjson.dumps(payload)) is None


@pytest.mark.parametrize(
    ("extra", "meant"),
    [
        ("worker_Name", "worker_name"),
        ("workerName", "worker_name"),
        ("clientEventID", "clientEventId"),
    ],
)
def test_a_slip_of_a_required_field_is_refused_as_missing(extra: str, meant: str) -> None:
    payload = {k: v for k, v in record().items() if k != meant} | {extra: "x"}
    with pytest.raises(InvalidRequest) as info:
        validate(CreateRecord, payload)
    assert refused_fields(info.value) == [meant]


@pytest.mark.parametrize(
    "extra",
    [
        "deviceId",
        "battery",
        "firmware",
        "notes",
        "auth0Id",
        "orderId",
        "unitsKg",
        "recordedAt",
        "Units",
    ],
)
def test_other_unknown_record_fields_are_ignored(extra: str) -> None:
    """A device's own fields (and an envelope field inside a bulk item), and a look-alike of a
    field that is given too ("Units" next to "units"), are left aside."""
    assert validate(CreateRecord, record(**{extra: "x"})).units == record()["units"]
    assert parse_record_fast(orjson.dumps(record(**{extra: "x"}))) is not None


@pytest.mark.parametrize(
    ("model", "payload", "extra", "what", "meant"),
    [
        (OpenSession, {"projectId": "p"}, "pricePerunit", "a session open", "pricePerUnit"),
        (OpenSession, {"projectId": "p"}, "maxDurationHour", "a session open", "maxDurationHours"),
        (OpenSession, {"projectId": "p"}, "sector_id", "a session open", "sectorId"),
        (OpenSession, {"projectId": "p"}, "Bonus", "a session open", "bonus"),
        (ExtendSession, {"maxDurationHours": 20}, "sessionID", "an extend", "sessionId"),
        (VoidRecord, {"reason": "typo"}, "record_id", "a void", "recordId"),
        (CheckIdempotency, {"key": "k"}, "requestID", "a check", "requestId"),
        (BulkRecords, {"records": []}, "auth0ID", "a bulk", "auth0Id"),
    ],
)
def test_a_misspelled_field_of_any_request_is_refused_by_name(
    model: type[BaseModel], payload: dict[str, Any], extra: str, what: str, meant: str
) -> None:
    """An open whose "pricePerunit" were left aside would pay the project's price: a slip of
    one of a request's own fields (or of an envelope field) is refused, not ignored."""
    with pytest.raises(InvalidRequest) as info:
        validate(model, payload | {extra: 7})
    assert info.value.details["fields"] == [
        {"field": extra, "message": f"is not a field of {what}; did you mean {meant}?"}
    ]
    mine = {"orderId": 7, "shift": "night"}  # a device's own fields are still left aside
    assert validate(model, payload | mine).model_dump() == validate(model, payload).model_dump()


@pytest.mark.parametrize(
    ("model", "payload", "extra", "says"),
    [
        (CloseSession, {}, "closedAt", "a session closes when its close arrives"),
        (CloseSession, {}, "notes", "is not changed by a close: send it in an update"),
        (CloseSession, {}, "maxDurationHours", "is not changed by a close"),
        (ExtendSession, {"maxDurationHours": 20}, "notes", "send it in an update"),
        (ExtendSession, {"maxDurationHours": 20}, "pricePerUnit", "send it in an update"),
        (ExtendSession, {"maxDurationHours": 20}, "openedAt", "the gateway sets it"),
    ],
)
def test_close_and_extend_refuse_session_fields_they_would_drop(
    model: type[BaseModel], payload: dict[str, Any], extra: str, says: str
) -> None:
    """A closing note or a backdated closedAt sent with a close would be dropped while the
    reply says success: refused, naming the field and where it goes."""
    with pytest.raises(InvalidRequest) as info:
        validate(model, payload | {extra: "2026-12-01T13:00:00Z"})
    (field,) = info.value.details["fields"]
    assert field["field"] == extra
    assert says in field["message"]
    mine = {"orderId": 7, "sessionId": "s1"}  # a device's own fields, a matching id: fine
    assert validate(model, payload | mine).model_dump()["sessionId"] == "s1"


@pytest.mark.parametrize("request_id", [2**63 - 1, 2**63, 2**64 - 1, -(2**63)])
def test_the_hot_path_echoes_a_64_bit_request_id_as_the_general_path_does(
    request_id: int,
) -> None:
    """A device counting requests in an unsigned 64-bit integer gets it back exactly on the
    record topic too (the one-pass parse read 2**63 and up as a double: 1.8446744073709552e+19)."""
    raw = orjson.dumps({**RECORD, "requestId": request_id})
    fast = parse_record_fast(raw)
    assert fast is not None
    assert fast.envelope().request_id == request_id
    assert type(fast.envelope().request_id) is int
    general = take_envelope(decode_object(raw, max_bytes=4096, max_depth=16))
    assert general.request_id == request_id
    assert orjson.loads(orjson.dumps({"requestId": fast.envelope().request_id})) == {
        "requestId": request_id
    }
