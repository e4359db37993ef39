"""The published JSON Schemas (schemas/): generated, valid draft 2020-12, and right on examples."""

from __future__ import annotations

import json
import re
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from jsonschema import (  # type: ignore[import-untyped]
    Draft202012Validator,
    FormatChecker,
)
from pydantic import BaseModel

from gateway import wireschema
from gateway.core.models import (
    ENVELOPE_FIELDS,
    BulkRecords,
    CheckIdempotency,
    CreateRecord,
    ExtendSession,
    OpenSession,
    RecordCommand,
    RecordWithEnvelope,
    SessionCommand,
    UpdateSession,
    VoidRecord,
    take_envelope,
    validate,
)
from gateway.resources import data_dir

SCHEMAS = data_dir("schemas")

# jsonschema checks "date-time" only with an optional package; RFC 3339 is short enough to check
# here (fromisoformat alone would take "2025-10-19" or a date without a zone).
FORMAT_CHECKER = FormatChecker(formats=())
_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$", re.ASCII
)


@FORMAT_CHECKER.checks("date-time", raises=ValueError)  # type: ignore[untyped-decorator]
def _is_date_time(value: object) -> bool:
    if not isinstance(value, str):
        return True  # "format" applies to strings only
    if not _RFC3339.match(value):
        return False
    datetime.fromisoformat(value.upper())  # month 13, hour 25: ValueError
    return True


@cache
def schema_of(name: str) -> dict[str, Any]:
    """The shipped schema ``schemas/{name}.schema.json``."""
    loaded: dict[str, Any] = json.loads((SCHEMAS / f"{name}{wireschema.SCHEMA_SUFFIX}").read_text())
    return loaded


def problems(name: str, payload: object) -> list[str]:
    """Why ``payload`` does not fit schema ``name`` (empty: it fits), date-times checked."""
    validator = Draft202012Validator(schema_of(name), format_checker=FORMAT_CHECKER)
    return [
        f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
        for e in validator.iter_errors(payload)
    ]


def assert_fits(name: str, payload: object) -> None:
    found = problems(name, payload)
    assert not found, f"{name}: {found}\n{json.dumps(payload, indent=1)[:3000]}"


def test_files_are_what_the_generator_writes() -> None:
    """schemas/ is exactly `python -m gateway.wireschema`'s output: no drift from the models."""
    assert wireschema.differences(SCHEMAS) == []
    assert wireschema.main(["--check"]) == 0


def test_check_names_a_file_that_differs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--check exits 1 and names the edited, missing and stray files."""
    wireschema.main(["--dir", str(tmp_path)])
    capsys.readouterr()
    (tmp_path / "records.create.request.schema.json").write_text("{}")
    (tmp_path / "gateway.status.schema.json").unlink()
    (tmp_path / "old.schema.json").write_text("{}")
    assert wireschema.main(["--check", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "records.create.request.schema.json" in err
    assert "gateway.status.schema.json" in err
    assert "old.schema.json" in err


def test_one_file_per_message_and_a_readme() -> None:
    """Every message kind has its file, listed in the README, and nothing else is there."""
    files = sorted(p.name for p in SCHEMAS.iterdir())
    expected = sorted([*(m.file for m in wireschema.MESSAGES), "README.md"])
    assert files == expected
    readme = (SCHEMAS / "README.md").read_text()
    for m in wireschema.MESSAGES:
        assert f"[{m.file}]" in readme


@pytest.mark.parametrize("message", wireschema.MESSAGES, ids=lambda m: m.name)
def test_each_schema_is_valid_draft_2020_12(message: wireschema.Message) -> None:
    """Each file is a valid 2020-12 schema whose local references all resolve."""
    schema = schema_of(message.name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    refs = re.findall(r'"\$ref": "#/\$defs/([^"]+)"', json.dumps(schema))
    assert set(refs) <= set(schema.get("$defs", {}))


def test_envelope_is_the_models_envelope() -> None:
    """The schema's envelope fields are the parser's, and the hot path's model adds only them."""
    assert set(wireschema.ENVELOPE) == set(ENVELOPE_FIELDS)
    assert set(RecordWithEnvelope.model_fields) == set(CreateRecord.model_fields) | set(
        ENVELOPE_FIELDS
    )
    for m in wireschema.MESSAGES:
        if m.name.endswith(".request"):
            assert set(ENVELOPE_FIELDS) <= set(schema_of(m.name)["properties"])


# examples ------------------------------------------------------------------------------------

SID = "6507f1e3c9d8e2a4b1f9c3d5"
USER = "user_123456789"
BONUS = {"type": "percent", "value": 10, "note": "High quality bonus"}
RECORD = {  # seeds 001: create a production record
    "auth0Id": USER,
    "sessionId": SID,
    "workerId": "JS0315",
    "worker_name": "John Smith",
    "recordedAtUtc": "2025-10-19T14:30:00.000Z",
    "clientEventId": "evt_1234567890abcdef",
}
BULK_ITEMS = [  # seeds 001: bulk
    {**RECORD, "units": 5},
    {**RECORD, "units": 3, "recordedAtUtc": "2025-10-19T15:00:00.000Z", "clientEventId": "evt_9"},
]
for _item in BULK_ITEMS:
    del _item["auth0Id"]
OPEN = {  # seeds 000: basicSession
    "auth0Id": USER,
    "projectId": "proj_123",
    "openedAt": "2025-10-19T08:00:00.000Z",
    "sectorId": "sector_001",
    "sector_name": "Lote A-1",
}
UPDATE = {  # seeds 000: update
    "auth0Id": USER,
    "samplingUnit": "kg",
    "pricePerUnit": 6,
    "bonus": BONUS,
    "notes": "Updated notes",
}

GOOD_REQUESTS: list[tuple[str, dict[str, Any]]] = [
    ("sessions.open", OPEN),
    (
        "sessions.open",  # seeds 000: fullSession
        {**OPEN, "samplingUnit": "box", "pricePerUnit": 5.5, "bonus": BONUS}
        | {"maxDurationHours": 12, "notes": "Good weather conditions"},
    ),
    ("sessions.open", {"projectId": "proj_123"}),  # auth0Id is optional here (SPEC §3)
    ("sessions.get", {}),
    ("sessions.get", {"sessionId": SID}),
    ("sessions.update", UPDATE),
    ("sessions.update", {"notes": None}),  # clears the notes
    ("sessions.update", {"bonus": {"type": "fixed", "value": 50}, "sessionId": SID}),
    ("sessions.close", {"auth0Id": USER}),
    ("sessions.extend", {"auth0Id": USER, "maxDurationHours": 18}),
    ("records.create", RECORD),
    ("records.create", {**RECORD, "units": 0, "idempotencyKey": "mobile-app-key-123456"}),
    ("records.create", {**RECORD, "units": 2.5, "orderId": "o-1"}),  # a field of the device's own
    (
        "records.create",  # MQTT 3.1.1: the envelope travels in the payload
        {**RECORD, "authorization": "Bearer a.b.c", "replyTo": "t/r", "requestId": 42},
    ),
    ("records.create", {**RECORD, "requestId": "r-1", "recordedAtUtc": "2025-10-19T14:30:00Z"}),
    ("records.bulk", {"auth0Id": USER, "records": BULK_ITEMS}),
    ("records.bulk", {"records": []}),
    ("records.get", {}),
    ("records.void", {"auth0Id": USER, "reason": "Duplicate entry"}),
    ("records.check-idempotency", {"key": f"client:{SID}:JS0315:evt_1234567890abcdef"}),
    ("records.check-idempotency", {"key": "mobile-app-key-timestamp-123456"}),
]


def _without(payload: dict[str, Any], field: str) -> dict[str, Any]:
    return {k: v for k, v in payload.items() if k != field}


BAD_REQUESTS: list[tuple[str, str, dict[str, Any]]] = [
    ("units -1", "records.create", {**RECORD, "units": -1}),
    ("units a string", "records.create", {**RECORD, "units": "5"}),
    ("units true", "records.create", {**RECORD, "units": True}),
    ("missing workerId", "records.create", _without(RECORD, "workerId")),
    ("missing worker_name", "records.create", _without(RECORD, "worker_name")),
    ("missing clientEventId", "records.create", _without(RECORD, "clientEventId")),
    ("missing recordedAtUtc", "records.create", _without(RECORD, "recordedAtUtc")),
    ("recordedAtUtc not a date", "records.create", {**RECORD, "recordedAtUtc": "yesterday"}),
    ("recordedAtUtc no zone", "records.create", {**RECORD, "recordedAtUtc": "2025-10-19"}),
    (
        "recordedAtUtc month 13",
        "records.create",
        {**RECORD, "recordedAtUtc": "2025-13-19T14:30:00Z"},
    ),
    ("workerId only spaces", "records.create", {**RECORD, "workerId": "   "}),
    ("workerId empty", "records.create", {**RECORD, "workerId": ""}),
    ("workerId too long", "records.create", {**RECORD, "workerId": "w" * 129}),
    ("workerId a number", "records.create", {**RECORD, "workerId": 315}),
    ("authorization without Bearer", "records.create", {**RECORD, "authorization": "a.b.c"}),
    ("requestId a boolean", "records.create", {**RECORD, "requestId": True}),
    ("replyTo a number", "records.create", {**RECORD, "replyTo": 7}),
    ("auth0Id a number", "records.create", {**RECORD, "auth0Id": 7}),
    ("update a forbidden field", "sessions.update", {**UPDATE, "maxDurationHours": 18}),
    ("update projectId", "sessions.update", {"projectId": "proj_9", "notes": "x"}),
    ("update nothing", "sessions.update", {"auth0Id": USER}),
    ("update samplingUnit null", "sessions.update", {"samplingUnit": None}),
    ("update pricePerUnit null", "sessions.update", {"pricePerUnit": None}),
    (
        "update bonus of a kind unknown",
        "sessions.update",
        {"bonus": {"type": "double", "value": 2}},
    ),
    ("update bonus with an extra field", "sessions.update", {"bonus": {**BONUS, "cap": 3}}),
    ("open without projectId", "sessions.open", _without(OPEN, "projectId")),
    ("open maxDurationHours 0", "sessions.open", {**OPEN, "maxDurationHours": 0}),
    ("open price beyond MONEY_MAX", "sessions.open", {**OPEN, "pricePerUnit": 2e9}),
    ("open bonus without value", "sessions.open", {**OPEN, "bonus": {"type": "fixed"}}),
    ("extend without maxDurationHours", "sessions.extend", {"auth0Id": USER}),
    ("extend by a negative", "sessions.extend", {"maxDurationHours": -1}),
    ("void without reason", "records.void", {"auth0Id": USER}),
    ("void reason only spaces", "records.void", {"reason": "  "}),
    ("bulk item without sessionId", "records.bulk", {"records": [_without(RECORD, "sessionId")]}),
    ("bulk item units -1", "records.bulk", {"records": [{**BULK_ITEMS[0], "units": -1}]}),
    ("bulk records not a list", "records.bulk", {"records": {"0": BULK_ITEMS[0]}}),
    ("bulk without records", "records.bulk", {"auth0Id": USER}),
    ("check without key", "records.check-idempotency", {}),
    ("check empty key", "records.check-idempotency", {"key": ""}),
    ("get with a blank sessionId", "sessions.get", {"sessionId": " "}),
]


@pytest.mark.parametrize(("name", "payload"), GOOD_REQUESTS, ids=lambda v: str(v)[:40])
def test_good_requests_fit(name: str, payload: dict[str, Any]) -> None:
    """The seeds' request examples (and SPEC's variants) fit their schemas."""
    assert_fits(f"{name}.request", payload)


MODELS: dict[str, type[BaseModel]] = {
    "sessions.open": OpenSession,
    "sessions.get": SessionCommand,
    "sessions.update": UpdateSession,
    "sessions.close": SessionCommand,
    "sessions.extend": ExtendSession,
    "records.create": CreateRecord,
    "records.bulk": BulkRecords,
    "records.get": RecordCommand,
    "records.void": VoidRecord,
    "records.check-idempotency": CheckIdempotency,
}


@pytest.mark.parametrize(("name", "payload"), GOOD_REQUESTS, ids=lambda v: str(v)[:40])
def test_good_requests_pass_the_gateways_models(name: str, payload: dict[str, Any]) -> None:
    """What the schema takes, the gateway's parser takes too (envelope aside, as it does)."""
    data = dict(payload)
    take_envelope(data).check()
    validate(MODELS[name], data)
    for item in data.get("records", []):
        validate(CreateRecord, item)


@pytest.mark.parametrize(("why", "name", "payload"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_do_not_fit(why: str, name: str, payload: dict[str, Any]) -> None:
    """What the gateway refuses, the schema refuses too."""
    assert problems(f"{name}.request", payload), why


TOTALS = {"units": 8, "records": 2, "voided": 0, "workers": 1, "amount": 48.4}
SESSION = {  # seeds 000: the open/get response, its elided bonus and totals filled in
    "sessionId": SID,
    "companyId": "comp_12345",
    "projectId": "proj_123",
    "auth0Id": USER,
    "sectorId": "sector_001",
    "sector_name": "Lote A-1",
    "timezone": "America/Mexico_City",
    "day": "2025-10-19T00:00:00.000Z",
    "status": "open",
    "openedAt": "2025-10-19T08:00:00.000Z",
    "closedAt": None,
    "maxDurationHours": 12,
    "samplingUnit": "box",
    "pricePerUnit": 5.5,
    "bonus": BONUS,
    "totals": TOTALS,
    "notes": "Good weather conditions",
}
CLOSED = {**SESSION, "status": "closed", "closedAt": "2025-10-19T18:00:00.000Z"}
PREVIEW = {k: v for k, v in RECORD.items() if k != "auth0Id"} | {"units": 5}
VOID_PREVIEW = {
    "recordId": "rec_2",
    "voidOf": "rec_1234567890abcdef",
    "sessionId": SID,
    "workerId": "JS0315",
    "units": -5,
    "reason": "Duplicate entry",
}
ERROR = {
    "status": "error",
    "error": {"code": "SESSION_CLOSED", "message": f"session {SID} is closed", "details": {}},
}


def _ok(data: dict[str, Any]) -> dict[str, Any]:
    return {"status": "success", "data": data}


def _event(type_: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"eventId": "ev_1", "type": type_, "at": SESSION["openedAt"], "sessionId": SID} | {
        "data": data
    }


def _bulk(results: list[dict[str, Any]], ok: int, failed: int) -> dict[str, Any]:
    summary = {"ok": ok, "duplicated": 0, "failed": failed}
    return {"status": "success", "results": results, "summary": summary}


def _status(**fields: Any) -> dict[str, Any]:
    return {
        "status": "online",
        "instance": "gw",
        "version": "1",
        "at": SESSION["openedAt"],
    } | fields


GOOD_MESSAGES: list[tuple[str, Any]] = [
    ("sessions.open.reply", _ok(SESSION)),
    ("sessions.open.reply", {**_ok({**SESSION, "idempotent": True}), "requestId": 3}),
    ("sessions.get.reply", _ok(SESSION)),
    ("sessions.get.reply", _ok(CLOSED | {"closeReason": "closed"})),
    ("sessions.update.reply", _ok({"updated": True})),
    (
        "sessions.close.reply",
        _ok({"sessionId": SID, "status": "closed", "closedAt": CLOSED["closedAt"]}),
    ),
    ("sessions.extend.reply", _ok({"maxDurationHours": 18})),
    # the seeds' replay example, with the recordId and the echoed clientEventId of SPEC §2, §4
    (
        "records.create.reply",
        {
            **_ok({"recordId": "rec_1", "payloadPreview": PREVIEW, "idempotent": True}),
            "clientEventId": RECORD["clientEventId"],
        },
    ),
    (
        "records.bulk.reply",
        {
            "status": "success",
            "results": [
                {"index": 0, "clientEventId": "evt_1", "status": "ok", "recordId": "rec_1"},
                {"index": 1, "clientEventId": "evt_2", "status": "duplicated", "recordId": "rec_2"},
                {"index": 2, "clientEventId": None, "status": "failed", "error": ERROR["error"]},
            ],
            "summary": {"ok": 1, "duplicated": 1, "failed": 1},
        },
    ),
    (
        "records.get.reply",  # seeds 001
        _ok(
            {
                "recordId": "rec_1234567890abcdef",
                "sessionId": SID,
                "workerId": "JS0315",
                "units": 5,
                "state": "inserted",
            }
        ),
    ),
    ("records.void.reply", _ok({"payloadPreview": VOID_PREVIEW})),
    ("records.check-idempotency.reply", _ok({"key": "k", "exists": False})),
    ("error.reply", ERROR),
    ("records.create.reply", {**ERROR, "clientEventId": "evt_1", "requestId": "r"}),
    ("sessions.state", SESSION),
    ("sessions.events", _event("session.opened", SESSION)),
    ("sessions.events", _event("session.closed", {**CLOSED, "closeReason": "closed"})),
    ("sessions.events", _event("session.updated", {**SESSION, "changed": ["notes"]})),
    ("sessions.events", _event("session.extended", {**SESSION, "previousMaxDurationHours": 8})),
    (
        "sessions.events",
        _event(
            "record.voided",
            {"recordId": "rec_1", "voidRecordId": "rec_2", "workerId": "JS0315", "units": 5}
            | {"reason": "Duplicate entry", "totals": TOTALS},
        ),
    ),
    ("gateway.status", _status()),
    ("gateway.status", _status(status="offline")),
]

VOID_ROW = {"recordId": "r", "sessionId": SID, "workerId": "w", "units": -5, "state": "inserted"}

BAD_MESSAGES: list[tuple[str, str, Any]] = [
    ("an error code unknown", "error.reply", {**ERROR, "error": {"code": "TEAPOT", "message": ""}}),
    ("an error without message", "error.reply", {**ERROR, "error": {"code": "INTERNAL"}}),
    ("success without data", "sessions.get.reply", {"status": "success"}),
    ("a session status unknown", "sessions.get.reply", _ok({**SESSION, "status": "paused"})),
    ("closed without closedAt", "sessions.state", {**SESSION, "status": "closed"}),
    ("open with a closedAt", "sessions.state", {**SESSION, "closedAt": CLOSED["closedAt"]}),
    ("totals without amount", "sessions.state", {**SESSION, "totals": _without(TOTALS, "amount")}),
    ("a day not at midnight", "sessions.state", {**SESSION, "day": "2025-10-19T08:00:00.000Z"}),
    ("an instant without ms", "sessions.state", {**SESSION, "openedAt": "2025-10-19T08:00:00Z"}),
    ("a session without totals", "sessions.get.reply", _ok(_without(SESSION, "totals"))),
    ("updated false", "sessions.update.reply", _ok({"updated": False})),
    (
        "create reply without recordId",
        "records.create.reply",
        {**_ok({"payloadPreview": PREVIEW, "idempotent": False}), "clientEventId": "e"},
    ),
    (
        "create reply without the echoed clientEventId",
        "records.create.reply",
        _ok({"recordId": "r", "payloadPreview": PREVIEW, "idempotent": False}),
    ),
    (
        "preview units -1",
        "records.create.reply",
        {
            **_ok({"recordId": "r", "payloadPreview": {**PREVIEW, "units": -1}}),
            "clientEventId": "e",
        },
    ),
    (
        "bulk failure without error",
        "records.bulk.reply",
        _bulk([{"index": 0, "clientEventId": None, "status": "failed"}], 0, 1),
    ),
    (
        "bulk ok without recordId",
        "records.bulk.reply",
        _bulk([{"index": 0, "clientEventId": "e", "status": "ok"}], 1, 0),
    ),
    ("bulk summary negative", "records.bulk.reply", _bulk([], -1, 0)),
    ("bulk results in data", "records.bulk.reply", _ok(_bulk([], 0, 0))),
    (
        "void preview positive units",
        "records.void.reply",
        _ok({"payloadPreview": {**VOID_PREVIEW, "units": 5}}),
    ),
    (
        "a void record without voidOf",
        "records.get.reply",
        _ok({**VOID_ROW, "kind": "void", "reason": "x"}),
    ),
    ("a record with negative units", "records.get.reply", _ok({**VOID_ROW, "kind": "record"})),
    ("check exists a string", "records.check-idempotency.reply", _ok({"key": "k", "exists": "1"})),
    ("an event type unknown", "sessions.events", _event("session.paused", SESSION)),
    ("session.closed of an open session", "sessions.events", _event("session.closed", SESSION)),
    (
        "session.expired closed by hand",
        "sessions.events",
        _event("session.expired", {**CLOSED, "closeReason": "closed"}),
    ),
    ("session.updated without changed", "sessions.events", _event("session.updated", SESSION)),
    ("record.voided without totals", "sessions.events", _event("record.voided", VOID_PREVIEW)),
    (
        "record.voided with the counter-movement's units",
        "sessions.events",
        _event("record.voided", {**VOID_PREVIEW, "voidRecordId": "r2", "totals": TOTALS}),
    ),
    ("status unknown", "gateway.status", _status(status="maybe")),
    ("status without instance", "gateway.status", _without(_status(), "instance")),
    ("status at not a date", "gateway.status", _status(at="now")),
]


@pytest.mark.parametrize(("name", "payload"), GOOD_MESSAGES, ids=lambda v: str(v)[:40])
def test_good_replies_events_state_status_fit(name: str, payload: Any) -> None:
    """The seeds' response examples (elisions filled) and SPEC §4's shapes fit."""
    assert_fits(name, payload)


@pytest.mark.parametrize(("why", "name", "payload"), BAD_MESSAGES, ids=[b[0] for b in BAD_MESSAGES])
def test_bad_replies_events_state_status_do_not_fit(why: str, name: str, payload: Any) -> None:
    """Shapes the gateway never sends are refused."""
    assert problems(name, payload), why
