"""JSON Schemas (draft 2020-12) of the MQTT wire format, for device and integrator developers.

Request schemas are generated from the pydantic request models of ``gateway.core.models`` (the
ones the gateway validates with), plus the envelope fields of SPEC §4. Replies, events, the
retained state and the gateway status are written here, after what ``gateway.service``,
``gateway.core.views``, ``gateway.core.events`` and ``gateway.transport.dispatch`` send.

    python -m gateway.wireschema            (re)write schemas/ (and its README.md)
    python -m gateway.wireschema --check    exit 1, naming each file that differs
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaValue
from pydantic_core import core_schema

from gateway.core.events import EventType
from gateway.core.models import (
    NAME_MAX,
    BulkRecords,
    CheckIdempotency,
    CloseSession,
    CreateRecord,
    ExtendSession,
    OpenSession,
    RecordCommand,
    SessionCommand,
    UpdateSession,
    VoidRecord,
)
from gateway.errors import ERROR_CODES
from gateway.resources import data_dir

DIALECT = "https://json-schema.org/draft/2020-12/schema"
ID_BASE = "urn:hydrobit:gateway:v2:schema:"
SCHEMA_SUFFIX = ".schema.json"

Schema = dict[str, Any]

# Validators of the request models that refuse what a JSON Schema keyword can also refuse.
_NOT_BLANK = {"pattern": r"\S"}  # "must not be only spaces"
_VALIDATOR_KEYWORDS: dict[str, Schema] = {"_not_blank": _NOT_BLANK, "_said": _NOT_BLANK}

# What the seeds say of each field, shown to developers in their editors.
_DESCRIPTIONS: dict[str, str] = {
    "projectId": "Project identifier; the project must belong to the caller's company.",
    "openedAt": "Session opening timestamp, ISO 8601 UTC (default: arrival time); its local "
    "date in the project's timezone is the session's day.",
    "sectorId": "Sector identifier (a sector of the project).",
    "sector_name": "Sector name (default: the sector's own name).",
    "samplingUnit": "Unit being counted, e.g. box or kg (default: the project's).",
    "pricePerUnit": "Price paid per unit (default: the project's).",
    "bonus": "Bonus: percent scales the amount, fixed adds once (default: the project's).",
    "maxDurationHours": "Hours the session may stay open (bounded by "
    "GATEWAY_MAX_SESSION_HOURS, default 48).",
    "notes": "Free text.",
    "sessionId": "Session identifier; when sent it must equal the one the topic names.",
    "workerId": "Worker identifier.",
    "worker_name": "Worker full name.",
    "units": "Number of units to record (defaults to 1; bounded by GATEWAY_MAX_UNITS, "
    "default 100000).",
    "recordedAtUtc": "Timestamp when the record was created (ISO 8601 UTC); at most "
    "GATEWAY_CLOCK_SKEW_S (default 300 s) in the future.",
    "clientEventId": "Unique client-side event identifier for idempotency: the key is "
    "client:{sessionId}:{workerId}:{clientEventId}.",
    "idempotencyKey": "Idempotency key for deduplication, unique per company.",
    "recordId": "Record identifier; when sent it must equal the one the topic names.",
    "reason": "Reason for voiding the record.",
    "key": "Idempotency key to check: client:{sessionId}:{workerId}:{clientEventId}, or any "
    "other string taken as an idempotencyKey.",
}

ENVELOPE: dict[str, Schema] = {
    "authorization": {
        "type": "string",
        "pattern": "^[Bb][Ee][Aa][Rr][Ee][Rr] .+",
        "description": "Bearer <jwt>, for MQTT 3.1.1 devices; MQTT 5 devices send it as the "
        "user property authorization.",
    },
    "replyTo": {
        "type": "string",
        "minLength": 1,
        "description": "Topic for the reply when the request has no MQTT 5 Response Topic "
        "(default: the request topic followed by /reply).",
    },
    "requestId": {
        "type": ["string", "number"],
        "description": f"Echoed in the reply (a string cut to {NAME_MAX} characters).",
    },
    "auth0Id": {
        "type": "string",
        "description": "User identifier; optional, the token's sub. If sent it must equal sub "
        "(else FORBIDDEN).",
    },
}


class _Generator(GenerateJsonSchema):
    """pydantic's generator, plus the keywords of the models' own string validators."""

    def function_after_schema(self, schema: core_schema.AfterValidatorFunctionSchema) -> Schema:
        out: JsonSchemaValue = self.generate_inner(schema["schema"])
        name = getattr(schema["function"]["function"], "__name__", "")
        return {**out, **_VALIDATOR_KEYWORDS.get(name, {})}


def _tidy(node: Any) -> Any:
    """Drop pydantic's derived titles ("Workerid") and Python docstrings from a schema."""
    if isinstance(node, dict):
        return {
            k: _tidy(v)
            for k, v in node.items()
            if not (k in ("title", "description") and isinstance(v, str))
        }
    if isinstance(node, list):
        return [_tidy(v) for v in node]
    return node


def model_schema(model: type[BaseModel]) -> Schema:
    """The validation schema of ``model`` with descriptions, without pydantic's titles."""
    out: Schema = _tidy(model.model_json_schema(schema_generator=_Generator))
    for name, prop in out.get("properties", {}).items():
        if name in _DESCRIPTIONS:
            prop["description"] = _DESCRIPTIONS[name]
    return out


def request_schema(model: type[BaseModel]) -> Schema:
    """``model``'s schema with the envelope fields every request may carry (SPEC §4), and
    without the session fields it refuses rather than drop (a close's closedAt, ...)."""
    out = model_schema(model)
    out["properties"] = {**out["properties"], **copy.deepcopy(ENVELOPE)}
    refused = sorted(getattr(model, "not_here", {}))
    if refused:
        out["propertyNames"] = {"not": {"enum": refused}}
        out["description"] = (
            f"{', '.join(refused)}: VALIDATION_ERROR here (not silently dropped); the fields "
            "an update changes go in an update."
        )
    return out


# requests -----------------------------------------------------------------------------------


def _update_request() -> Schema:
    out = request_schema(UpdateSession)
    props = out["properties"]
    # the service refuses a null for these two (bonus and notes may be cleared with null)
    for name in ("samplingUnit", "pricePerUnit"):
        props[name] = {**props[name]["anyOf"][0], "description": _DESCRIPTIONS[name]}
    out["anyOf"] = [{"required": [n]} for n in ("samplingUnit", "pricePerUnit", "bonus", "notes")]
    out["description"] = (
        "Only samplingUnit, pricePerUnit, bonus and notes may change (at least one); any other "
        "field is VALIDATION_ERROR. A null bonus or notes clears it."
    )
    return out


def _record_request() -> Schema:
    out = request_schema(CreateRecord)
    out["description"] = (
        "Fields of your own are allowed and ignored, but one that looks like a slip of a known "
        "field (Units, unit, idempotency_key, ...) is VALIDATION_ERROR."
    )
    return out


def _bulk_request() -> Schema:
    item = model_schema(CreateRecord)
    props = item["properties"]
    props["sessionId"] = {
        **props["sessionId"]["anyOf"][0],
        "description": "Session identifier (required in a bulk).",
    }
    props["auth0Id"] = copy.deepcopy(ENVELOPE["auth0Id"])
    item["required"] = ["sessionId", *item["required"]]
    out = request_schema(BulkRecords)
    out["properties"]["records"] = {
        "type": "array",
        "items": item,
        "description": "Production records; each is validated and applied on its own. At "
        "most GATEWAY_MAX_BULK (default 1000) per request.",
    }
    return out


def _void_request() -> Schema:
    return request_schema(VoidRecord)


# replies, events, state, status ---------------------------------------------------------------

INSTANT_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$"
DAY_PATTERN = r"^\d{4}-\d{2}-\d{2}T00:00:00\.000Z$"

_SESSION_FIELDS = [
    "sessionId",
    "companyId",
    "projectId",
    "auth0Id",
    "sectorId",
    "sector_name",
    "timezone",
    "day",
    "status",
    "openedAt",
    "closedAt",
    "maxDurationHours",
    "samplingUnit",
    "pricePerUnit",
    "bonus",
    "totals",
    "notes",
]

DEFS: dict[str, Schema] = {
    "instant": {
        "type": "string",
        "format": "date-time",
        "pattern": INSTANT_PATTERN,
        "description": "UTC with milliseconds, e.g. 2025-10-19T08:00:00.000Z.",
    },
    "nullableInstant": {"anyOf": [{"$ref": "#/$defs/instant"}, {"type": "null"}]},
    "id": {"type": "string", "minLength": 1},
    "nullableText": {"type": ["string", "null"]},
    "count": {"type": "integer", "minimum": 0},
    "requestId": {
        "type": ["string", "number"],
        "description": "The request's requestId, when it had one.",
    },
    "bonus": {
        "type": "object",
        "required": ["type", "value"],
        "properties": {
            "type": {"enum": ["percent", "fixed"]},
            "value": {"type": "number", "minimum": 0},
            "note": {"type": "string"},
        },
    },
    "workerTotals": {
        "type": "object",
        "required": ["units", "records", "voided"],
        "properties": {
            "units": {"type": "number", "minimum": 0},
            "records": {"$ref": "#/$defs/count"},
            "voided": {"$ref": "#/$defs/count"},
        },
    },
    "totals": {
        "type": "object",
        "required": ["units", "records", "voided", "workers", "amount"],
        "properties": {
            "units": {"type": "number", "minimum": 0, "description": "Net: voids subtracted."},
            "records": {
                "$ref": "#/$defs/count",
                "description": "Records created, voided ones included, counter-movements not.",
            },
            "voided": {"$ref": "#/$defs/count"},
            "workers": {
                "$ref": "#/$defs/count",
                "description": "Distinct workerId among records not voided.",
            },
            "amount": {
                "type": ["number", "null"],
                "description": "Net units x pricePerUnit with the bonus; null only when the "
                "amount is beyond what a JSON number (a double) can hold.",
            },
            "byWorker": {
                "type": "object",
                "additionalProperties": {"$ref": "#/$defs/workerTotals"},
                "description": "Totals per workerId.",
            },
        },
    },
    "session": {
        "type": "object",
        "description": "A production session (the seeds' shape) with live totals.",
        "required": _SESSION_FIELDS,
        "properties": {
            "sessionId": {"$ref": "#/$defs/id"},
            "companyId": {"$ref": "#/$defs/id"},
            "projectId": {"$ref": "#/$defs/id"},
            "auth0Id": {"$ref": "#/$defs/id", "description": "The owner: who opened it."},
            "sectorId": {"type": ["string", "null"]},
            "sector_name": {"type": ["string", "null"]},
            "timezone": {"type": "string", "description": "IANA name of the project's zone."},
            "day": {
                "type": "string",
                "pattern": DAY_PATTERN,
                "description": "Local date of openedAt in the project's timezone, at T00:00Z.",
            },
            "status": {"enum": ["open", "closed"]},
            "openedAt": {"$ref": "#/$defs/instant"},
            "closedAt": {"$ref": "#/$defs/nullableInstant"},
            "closeReason": {"enum": ["closed", "expired", None]},
            "expiresAt": {
                "$ref": "#/$defs/instant",
                "description": "openedAt + maxDurationHours.",
            },
            "maxDurationHours": {"type": "number", "exclusiveMinimum": 0},
            "samplingUnit": {"type": "string"},
            "pricePerUnit": {"type": "number", "minimum": 0},
            "bonus": {"anyOf": [{"$ref": "#/$defs/bonus"}, {"type": "null"}]},
            "totals": {"$ref": "#/$defs/totals"},
            "notes": {"$ref": "#/$defs/nullableText"},
        },
        "if": {"properties": {"status": {"const": "closed"}}, "required": ["status"]},
        "then": {
            "properties": {
                "closedAt": {"$ref": "#/$defs/instant"},
                "closeReason": {"enum": ["closed", "expired"]},
            }
        },
        "else": {"properties": {"closedAt": {"type": "null"}, "closeReason": {"type": "null"}}},
    },
    "recordPreview": {
        "type": "object",
        "description": "The record as stored.",
        "required": [
            "sessionId",
            "workerId",
            "worker_name",
            "units",
            "recordedAtUtc",
            "clientEventId",
        ],
        "properties": {
            "sessionId": {"$ref": "#/$defs/id"},
            "workerId": {"$ref": "#/$defs/id"},
            "worker_name": {"type": "string"},
            "units": {"type": "number", "minimum": 0},
            "recordedAtUtc": {"$ref": "#/$defs/instant"},
            "clientEventId": {"$ref": "#/$defs/id"},
            "idempotencyKey": {"$ref": "#/$defs/id"},
        },
    },
    "record": {
        "type": "object",
        "description": "A ledger row: a record (kind record) or the counter-movement that "
        "voids one (kind void, negative units).",
        "required": ["recordId", "sessionId", "workerId", "units", "state"],
        "properties": {
            "recordId": {"$ref": "#/$defs/id"},
            "sessionId": {"$ref": "#/$defs/id"},
            "workerId": {"$ref": "#/$defs/id"},
            "worker_name": {"type": "string"},
            "units": {"type": "number"},
            "recordedAtUtc": {"$ref": "#/$defs/instant"},
            "clientEventId": {"$ref": "#/$defs/nullableText"},
            "idempotencyKey": {"$ref": "#/$defs/nullableText"},
            "kind": {"enum": ["record", "void"]},
            "state": {"enum": ["inserted", "voided"]},
            "createdAt": {"$ref": "#/$defs/instant"},
            "voidOf": {"$ref": "#/$defs/id", "description": "(kind void) the record voided."},
            "reason": {"type": "string", "description": "(kind void) why."},
            "voidRecordId": {
                "$ref": "#/$defs/id",
                "description": "(a voided record) its counter-movement.",
            },
        },
        "if": {"properties": {"kind": {"const": "void"}}, "required": ["kind"]},
        "then": {"required": ["voidOf", "reason"], "properties": {"units": {"maximum": 0}}},
        "else": {"properties": {"units": {"minimum": 0}}},
    },
    "error": {
        "type": "object",
        "required": ["code", "message", "details"],
        "properties": {
            "code": {"enum": list(ERROR_CODES)},
            "message": {"type": "string"},
            "details": {"type": "object"},
        },
    },
    "errorReply": {
        "type": "object",
        "required": ["status", "error"],
        "properties": {
            "status": {"const": "error"},
            "error": {"$ref": "#/$defs/error"},
            "requestId": {"$ref": "#/$defs/requestId"},
            "clientEventId": {"type": "string"},
        },
    },
}


def _success(data: Schema, *, echo_event: bool = False) -> Schema:
    out: Schema = {
        "type": "object",
        "required": ["status", "data", *(["clientEventId"] if echo_event else [])],
        "properties": {
            "status": {"const": "success"},
            "data": data,
            "requestId": {"$ref": "#/$defs/requestId"},
        },
    }
    if echo_event:
        out["properties"]["clientEventId"] = {
            "type": "string",
            "description": "The request's clientEventId.",
        }
    return out


def _reply(success: Schema, description: str) -> Schema:
    return {
        "description": description + " Or an error reply.",
        "oneOf": [success, {"$ref": "#/$defs/errorReply"}],
    }


def _object(required: Sequence[str], properties: Schema) -> Schema:
    return {"type": "object", "required": list(required), "properties": properties}


def _session_plus(required: Sequence[str], properties: Schema) -> Schema:
    return {"allOf": [{"$ref": "#/$defs/session"}, _object(required, properties)]}


def _open_reply() -> Schema:
    data = _session_plus(
        [],  # the seeds' example has no idempotent; the gateway always sends it
        {"idempotent": {"type": "boolean", "description": "true: the owner's open session."}},
    )
    return _reply(_success(data), "The session opened (or the owner's already open one).")


def _create_reply() -> Schema:
    data = _object(
        ["recordId", "payloadPreview", "idempotent"],
        {
            "recordId": {"$ref": "#/$defs/id"},
            "payloadPreview": {"$ref": "#/$defs/recordPreview"},
            "idempotent": {"type": "boolean", "description": "true: a replay, the original."},
        },
    )
    return _reply(_success(data, echo_event=True), "The record created (or replayed).")


def _bulk_reply() -> Schema:
    result = _object(
        ["index", "clientEventId", "status"],
        {
            "index": {"$ref": "#/$defs/count"},
            "clientEventId": {"$ref": "#/$defs/nullableText"},
            "status": {"enum": ["ok", "duplicated", "failed"]},
            "recordId": {"$ref": "#/$defs/id"},
            "error": {"$ref": "#/$defs/error"},
        },
    )
    result["if"] = {"properties": {"status": {"const": "failed"}}, "required": ["status"]}
    result["then"] = {"required": ["error"]}
    result["else"] = {"required": ["recordId"]}
    success = _object(
        ["status", "results", "summary"],
        {
            "status": {"const": "success"},
            "results": {"type": "array", "items": result},
            "summary": _object(
                ["ok", "duplicated", "failed"],
                {k: {"$ref": "#/$defs/count"} for k in ("ok", "duplicated", "failed")},
            ),
            "requestId": {"$ref": "#/$defs/requestId"},
        },
    )
    return _reply(success, "One result per record, in order (no data wrapper).")


def _void_reply() -> Schema:
    preview = _object(
        ["recordId", "voidOf", "sessionId", "workerId", "units", "reason"],
        {
            "recordId": {"$ref": "#/$defs/id", "description": "The counter-movement."},
            "voidOf": {"$ref": "#/$defs/id"},
            "sessionId": {"$ref": "#/$defs/id"},
            "workerId": {"$ref": "#/$defs/id"},
            "worker_name": {"type": "string"},
            "units": {"type": "number", "maximum": 0},
            "reason": {"type": "string"},
            "createdAt": {"$ref": "#/$defs/instant"},
        },
    )
    data = _object(
        ["payloadPreview"],
        {
            "recordId": {"$ref": "#/$defs/id"},
            "voidedRecordId": {"$ref": "#/$defs/id"},
            "payloadPreview": preview,
            "idempotent": {"type": "boolean", "description": "true: voided before, that void."},
        },
    )
    return _reply(_success(data), "The counter-movement written (or the earlier one).")


_CHANGEABLE = ["bonus", "notes", "pricePerUnit", "samplingUnit"]


def _event_data() -> dict[str, Schema]:
    session: Schema = {"$ref": "#/$defs/session"}
    closed_with = {
        reason: {
            "allOf": [
                session,
                {
                    "required": ["status", "closeReason"],
                    "properties": {"status": {"const": "closed"}, "closeReason": {"const": reason}},
                },
            ]
        }
        for reason in ("closed", "expired")
    }
    return {
        EventType.OPENED: session,
        EventType.UPDATED: _session_plus(
            ["changed"],
            {
                "changed": {
                    "type": "array",
                    "items": {"enum": _CHANGEABLE},
                    "minItems": 1,
                    "uniqueItems": True,
                }
            },
        ),
        EventType.EXTENDED: _session_plus(
            ["previousMaxDurationHours"],
            {"previousMaxDurationHours": {"type": "number", "exclusiveMinimum": 0}},
        ),
        EventType.CLOSED: closed_with["closed"],
        EventType.EXPIRED: closed_with["expired"],
        EventType.RECORD_VOIDED: _object(
            ["recordId", "voidRecordId", "workerId", "units", "reason", "totals"],
            {
                "recordId": {"$ref": "#/$defs/id"},
                "voidRecordId": {"$ref": "#/$defs/id"},
                "workerId": {"$ref": "#/$defs/id"},
                "units": {
                    "type": "number",
                    "minimum": 0,
                    "description": "The units voided (the original record's, so >= 0; the "
                    "counter-movement itself holds their negative).",
                },
                "reason": {"type": "string"},
                "totals": {"$ref": "#/$defs/totals", "description": "The session's new totals."},
            },
        ),
    }


def _events() -> Schema:
    cases = _event_data()
    out = _object(
        ["eventId", "type", "at", "sessionId", "data"],
        {
            "eventId": {"$ref": "#/$defs/id", "description": "Unique: deduplicate on it."},
            "type": {"enum": [t.value for t in EventType]},
            "at": {"$ref": "#/$defs/instant"},
            "sessionId": {"$ref": "#/$defs/id"},
            "data": {"type": "object"},
        },
    )
    out["allOf"] = [
        {
            "if": {"properties": {"type": {"const": t.value}}, "required": ["type"]},
            "then": {"properties": {"data": cases[t]}},
        }
        for t in EventType
    ]
    return out


def _status() -> Schema:
    return _object(
        ["status", "instance", "version", "at"],
        {
            "status": {"enum": ["online", "offline"]},
            "instance": {"type": "string", "description": "The gateway's MQTT client id."},
            "version": {"type": "string"},
            "at": {"$ref": "#/$defs/instant"},
        },
    )


# the catalogue ------------------------------------------------------------------------------

DEVICE_TO_GATEWAY = "device -> gateway"
REPLY = "gateway -> device (reply topic)"
BROADCAST = "gateway -> subscribers"


@dataclass(frozen=True, slots=True)
class Message:
    """One kind of message on the wire and the schema of its payload."""

    name: str  # the file is schemas/{name}.schema.json
    topic: str
    direction: str
    title: str
    build: Callable[[], Schema]

    @property
    def file(self) -> str:
        return self.name + SCHEMA_SUFFIX


def _request(model: type[BaseModel]) -> Callable[[], Schema]:
    return lambda: request_schema(model)


def _data(data: Schema, description: str) -> Callable[[], Schema]:
    return lambda: _reply(_success(data), description)


def _operation(
    name: str,
    topic: str,
    title: str,
    request: Callable[[], Schema],
    reply: Callable[[], Schema],
) -> tuple[Message, Message]:
    """A request topic's two messages: the request, and the reply on the reply topic."""
    return (
        Message(f"{name}.request", topic, DEVICE_TO_GATEWAY, title, request),
        Message(f"{name}.reply", f"reply to {topic}", REPLY, f"Reply: {title}", reply),
    )


_CLOSED = _object(
    ["sessionId", "status", "closedAt"],
    {
        "sessionId": {"$ref": "#/$defs/id"},
        "status": {"const": "closed"},
        "closedAt": {"$ref": "#/$defs/instant"},
    },
)
_EXTENDED = _object(
    ["maxDurationHours"], {"maxDurationHours": {"type": "number", "exclusiveMinimum": 0}}
)
_CHECKED = _object(["key", "exists"], {"key": {"type": "string"}, "exists": {"type": "boolean"}})

MESSAGES: tuple[Message, ...] = (
    *_operation(
        "sessions.open",
        "P/sessions/open",
        "open a production session",
        _request(OpenSession),
        _open_reply,
    ),
    *_operation(
        "sessions.get",
        "P/sessions/{sessionId}/get",
        "get a session",
        _request(SessionCommand),
        _data({"$ref": "#/$defs/session"}, "The session."),
    ),
    *_operation(
        "sessions.update",
        "P/sessions/{sessionId}/update",
        "update a session's metadata",
        _update_request,
        _data(_object(["updated"], {"updated": {"const": True}}), "Updated."),
    ),
    *_operation(
        "sessions.close",
        "P/sessions/{sessionId}/close",
        "close a session",
        _request(CloseSession),
        _data(_CLOSED, "Closed."),
    ),
    *_operation(
        "sessions.extend",
        "P/sessions/{sessionId}/extend",
        "extend a session's maxDurationHours",
        _request(ExtendSession),
        _data(_EXTENDED, "The new maximum duration."),
    ),
    *_operation(
        "records.create",
        "P/sessions/{sessionId}/records",
        "create a production record",
        _record_request,
        _create_reply,
    ),
    *_operation(
        "records.bulk",
        "P/records/bulk",
        "bulk create production records (offline sync)",
        _bulk_request,
        _bulk_reply,
    ),
    *_operation(
        "records.get",
        "P/records/{recordId}/get",
        "get a production record",
        _request(RecordCommand),
        _data({"$ref": "#/$defs/record"}, "The record."),
    ),
    *_operation(
        "records.void",
        "P/records/{recordId}/void",
        "void a production record",
        _void_request,
        _void_reply,
    ),
    *_operation(
        "records.check-idempotency",
        "P/records/check-idempotency",
        "does an idempotency key exist",
        _request(CheckIdempotency),
        _data(_CHECKED, "Whether the key exists in the caller's company."),
    ),
    Message(
        "error.reply",
        "reply to any request topic",
        REPLY,
        "Error reply to any request",
        lambda: {"$ref": "#/$defs/errorReply"},
    ),
    Message(
        "sessions.events", "P/sessions/{sessionId}/events", BROADCAST, "Session event", _events
    ),
    Message(
        "sessions.state",
        "P/sessions/{sessionId}/state",
        BROADCAST + ", retained",
        "Session state: the bare session object",
        lambda: {"$ref": "#/$defs/session"},
    ),
    Message(
        "gateway.status", "P/gateway/status", BROADCAST + ", retained", "Gateway status", _status
    ),
)


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            yield ref.removeprefix("#/$defs/")
        for value in node.values():
            yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def _with_defs(body: Schema) -> Schema:
    """``body`` with the shared definitions it refers to (each file stands alone)."""
    defs: Schema = dict(body.pop("$defs", {}))
    todo = list(_refs(body))
    while todo:
        name = todo.pop()
        if name not in defs:
            defs[name] = copy.deepcopy(DEFS[name])
            todo.extend(_refs(defs[name]))
    if defs:
        body["$defs"] = dict(sorted(defs.items()))
    return body


def build(message: Message) -> Schema:
    """The complete schema document of ``message``."""
    body = message.build()
    head: Schema = {"$schema": DIALECT, "$id": ID_BASE + message.name, "title": message.title}
    head["$comment"] = f"{message.topic} (P: the topic prefix); {message.direction}"
    return _with_defs({**head, **body})


def render(schema: Schema) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def readme() -> str:
    rows = "\n".join(f"| {m.topic} | [{m.file}]({m.file}) | {m.direction} |" for m in MESSAGES)
    return f"""# JSON Schemas of the MQTT wire format

Draft 2020-12, one file per kind of message; `P` is the topic prefix (`hydrobit/v2` by default).
Generated by `python -m gateway.wireschema` (`make schemas`) from the gateway's request models
and reply shapes: do not edit by hand; `python -m gateway.wireschema --check` tells if they drifted.

- Requests: every request may also carry the envelope fields `authorization`, `replyTo`,
  `requestId`, `auth0Id`. Update refuses unknown fields; the other requests ignore fields of
  a device's own but refuse, as VALIDATION_ERROR, one that looks like a slip of a known field
  (`unit`, `pricePerunit`, `Units`, `idempotency_key`: case, `_` or a letter `s` apart).
  Close and extend also refuse the session fields they do not set (`notes`, `closedAt`, ...)
  rather than drop them.
- Replies: each `*.reply` schema is the success reply of its request or the error reply
  (`error.reply`). The reply topic is the request's MQTT 5 Response Topic, else its `replyTo`,
  else the request topic followed by `/reply`. Replies, events, state and status may gain
  fields: extra ones are allowed, and fields beyond the seeds' examples are typed but optional.
- Events: `data` depends on `type`: the session object for `session.*` (plus `changed` for
  `session.updated`, `previousMaxDurationHours` for `session.extended`), the void and the new
  totals for `record.voided`.
- `format: date-time` is an annotation in draft 2020-12: turn on format assertion (e.g.
  `jsonschema.Draft202012Validator(schema, format_checker=...)`) to check it.
- Each file stands alone (shared definitions are copied into its `$defs`).

| topic | schema | direction |
|---|---|---|
{rows}
"""


def documents() -> dict[str, str]:
    """Every file of schemas/ by name, as it should read."""
    out = {m.file: render(build(m)) for m in MESSAGES}
    out["README.md"] = readme()
    return out


def differences(directory: Path) -> list[str]:
    """The files of ``directory`` that differ from what is generated (missing, changed, stale)."""
    wanted = documents()
    problems = [
        name
        for name, text in wanted.items()
        if not (directory / name).is_file() or (directory / name).read_text("utf-8") != text
    ]
    stale = sorted(p.name for p in directory.glob("*.json") if p.name not in wanted)
    return problems + [f"{name} (not generated: remove it)" for name in stale]


def write(directory: Path) -> list[str]:
    """(Re)write ``directory``; the names of the files changed or removed."""
    directory.mkdir(parents=True, exist_ok=True)
    wanted = documents()
    changed = []
    for name, text in wanted.items():
        path = directory / name
        if not path.is_file() or path.read_text("utf-8") != text:
            path.write_text(text, "utf-8")
            changed.append(name)
    for path in [*directory.glob("*.json"), directory / ".keep"]:
        if path.is_file() and path.name not in wanted:
            path.unlink()
            changed.append(f"{path.name} (removed)")
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.wireschema", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if any file differs")
    parser.add_argument("--dir", type=Path, default=None, help="default: the schemas/ folder")
    args = parser.parse_args(argv)
    directory: Path = args.dir if args.dir is not None else data_dir("schemas")
    if args.check:
        problems = differences(directory)
        for name in problems:
            print(f"{directory / name}: differs from python -m gateway.wireschema", file=sys.stderr)
        return 1 if problems else 0
    for name in write(directory):
        print(f"wrote {directory / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
