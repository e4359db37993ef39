"""Request payloads: bytes -> envelope + typed request, with the seeds' field names.

Pure: no I/O. Every refusal is an ``InvalidRequest`` (or ``PayloadTooLarge``) whose message names
the field and what to send instead.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, date, datetime
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Self, TypeVar

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.errors import InvalidRequest, PayloadTooLarge

ENVELOPE_FIELDS = ("authorization", "replyTo", "requestId", "auth0Id")

ID_MAX = 128
NAME_MAX = 256
NOTES_MAX = 2_000
# A price per unit or a bonus value above this is a typo, not a wage: it would also push a
# session's amount past what a JSON number (a double) can hold.
MONEY_MAX = 1e9


def _parse_instant(value: object) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 date-time string such as 2025-10-19T14:30:00.000Z")
    text = value.strip().upper()  # RFC 3339 §5.6 allows a lowercase "t" and "z"
    if "T" not in text and " " not in text and _is_date(text):
        raise ValueError("must include a time, e.g. 2025-10-19T14:30:00.000Z")
    try:
        parsed = datetime.fromisoformat(text)
        parsed = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except (ValueError, OverflowError):
        raise ValueError(
            "must be an ISO 8601 date-time string such as 2025-10-19T14:30:00.000Z"
        ) from None
    # Milliseconds, as every reply writes it: a device that sends back what it was shown
    # (...00.123Z for ...00.1234Z) sends the same instant, not a conflicting one.
    return parsed.replace(microsecond=parsed.microsecond // 1000 * 1000)


def _is_date(text: str) -> bool:
    try:
        date.fromisoformat(text)
    except ValueError:
        return False
    return True


def as_stored(value: float) -> float:
    """A number as PostgreSQL keeps it (float8 -> numeric: 15 significant digits), so that
    a replay compares equal and a reply shows what a get will show."""
    return float(f"{value:.15g}")


def _not_blank(value: str) -> str:
    if value.isspace():
        raise ValueError("must not be only spaces")
    return value


def _no_nul(value: str) -> str:
    """PostgreSQL text cannot hold NUL: refused in the field that carries it, so that the
    rest of the payload (its envelope, the other items of a bulk) is still answered."""
    if "\x00" in value:
        raise ValueError("must not contain NUL characters (\\u0000)")
    return value


Instant = Annotated[datetime, BeforeValidator(_parse_instant)]
Text = Annotated[StrictStr, AfterValidator(_no_nul)]
Id = Annotated[Text, Field(min_length=1, max_length=ID_MAX), AfterValidator(_not_blank)]
Name = Annotated[Text, Field(min_length=1, max_length=NAME_MAX), AfterValidator(_not_blank)]
Notes = Annotated[Text, Field(max_length=NOTES_MAX)]
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
NonNegative = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0)]
Amount = Annotated[NonNegative, AfterValidator(as_stored)]  # units, prices: stored as numeric
Money = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=MONEY_MAX)]
Price = Annotated[Money, AfterValidator(as_stored)]
Positive = Annotated[float, Field(strict=True, allow_inf_nan=False, gt=0)]


class _Request(BaseModel):
    """A request's content. Unknown fields are left aside (devices may add their own) once
    checked for slips of ours: a misspelt ``unit`` or ``pricePerunit`` ignored would quietly
    give the default (1 unit, the project's price), and every unit is money."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=False)
    what_it_is: ClassVar[str] = "this request"
    # fields of the session this request does not set: sent here they would be dropped
    # silently (a closing note, a backdated closedAt), so they are refused, saying where to go
    not_here: ClassVar[Mapping[str, str]] = {}

    @model_validator(mode="after")
    def _no_misspelled_fields(self) -> Self:
        extra = self.__pydantic_extra__
        if extra:
            known = (*type(self).model_fields, *ENVELOPE_FIELDS)
            for name in extra:
                if name in known:  # an envelope field inside a bulk item
                    continue
                if name in self.not_here:
                    raise RefusedField(name, self.not_here[name])
                meant = near_miss(name, known, self.model_fields_set)
                if meant is not None:
                    raise MisspelledField(name, meant, self.what_it_is)
            object.__setattr__(self, "__pydantic_extra__", {})  # checked: not kept
        return self


class Bonus(BaseModel):
    """A session bonus: ``percent`` scales the amount, ``fixed`` adds once."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["percent", "fixed"]
    value: Money
    note: Annotated[Text, Field(max_length=NAME_MAX)] | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "value": number_out(self.value)}
        if self.note is not None:
            out["note"] = self.note
        return out


class OpenSession(_Request):
    what_it_is: ClassVar[str] = "a session open"

    projectId: Id
    openedAt: Instant | None = None
    sectorId: Id | None = None
    sector_name: Name | None = None
    samplingUnit: Name | None = None
    pricePerUnit: Price | None = None
    bonus: Bonus | None = None
    maxDurationHours: Positive | None = None
    notes: Notes | None = None


class UpdateSession(_Request):
    model_config = ConfigDict(extra="forbid", frozen=True)

    sessionId: Id | None = None
    samplingUnit: Name | None = None
    pricePerUnit: Price | None = None
    bonus: Bonus | None = None
    notes: Notes | None = None

    def changes(self) -> dict[str, Any]:
        """The fields the device actually sent (a ``null`` clears bonus or notes)."""
        return {k: getattr(self, k) for k in self.model_fields_set if k != "sessionId"}


_UPDATE_FIELDS = ("samplingUnit", "pricePerUnit", "bonus", "notes")
_SET_BY_THE_GATEWAY = ("openedAt", "closedAt", "status", "closeReason", "totals")


def _not_here(what: str, *also: str) -> Mapping[str, str]:
    out = dict.fromkeys(_UPDATE_FIELDS, f"is not changed by {what}: send it in an update")
    out |= dict.fromkeys(_SET_BY_THE_GATEWAY, f"is not changed by {what}: the gateway sets it")
    out |= dict.fromkeys(also, f"is not changed by {what}")
    return out


class ExtendSession(_Request):
    what_it_is: ClassVar[str] = "an extend"
    not_here: ClassVar[Mapping[str, str]] = _not_here("an extend")

    sessionId: Id | None = None
    maxDurationHours: Positive


class SessionCommand(_Request):
    """Get carries nothing but the (optional) matching sessionId."""

    sessionId: Id | None = None


class CloseSession(SessionCommand):
    """A close carries nothing but the (optional) matching sessionId; closedAt is the time
    the close arrives."""

    what_it_is: ClassVar[str] = "a close"
    not_here: ClassVar[Mapping[str, str]] = {
        **_not_here("a close", "maxDurationHours"),
        "closedAt": "is not sent: a session closes when its close arrives",
    }


class RefusedField(ValueError):
    """An unknown field refused under its own name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


class MisspelledField(RefusedField):
    """An unknown field that looks like a known one."""

    def __init__(self, field: str, meant: str, what: str) -> None:
        super().__init__(field, f"is not a field of {what}; did you mean {meant}?")


def near_miss(name: str, known: Sequence[str], given: Collection[str]) -> str | None:
    """The known field, not ``given``, that ``name`` is a slip of: the same but for case and
    '_', or a letter 's' (``unit``, ``Units``, ``idempotency_key``). Nothing looser: devices
    may add fields of their own (``orderId``, ``unitsKg``)."""
    folded = name.replace("_", "").lower()
    for field in known:
        if field in given:
            continue
        target = field.replace("_", "").lower()
        if folded in (target, f"{target}s") or f"{folded}s" == target:
            return field
    return None


class CreateRecord(_Request):
    what_it_is: ClassVar[str] = "a record"

    sessionId: Id | None = None
    workerId: Id
    worker_name: Name
    units: NonNegative = 1.0
    recordedAtUtc: Instant
    clientEventId: Id
    idempotencyKey: Id | None = None

    @field_validator("units")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("must be a finite number")
        return as_stored(value)  # 0.1 + 0.2 sent twice is one replay


class RecordWithEnvelope(CreateRecord):
    """A record create with its envelope fields: the hot path validates the raw JSON bytes in
    one pass (pydantic's parser), falling back to the general path for anything it refuses."""

    authorization: StrictStr | None = None
    replyTo: StrictStr | None = None
    requestId: (
        Annotated[StrictStr, Field(max_length=NAME_MAX)]
        | Annotated[int, Field(strict=True, ge=-(2**63), lt=2**64)]  # as orjson reads one
        | Annotated[float, Field(strict=True, allow_inf_nan=False)]
        | None
    ) = Field(default=None, union_mode="left_to_right")
    auth0Id: StrictStr | None = None

    def envelope(self) -> Envelope:
        request_id = self.requestId
        if isinstance(request_id, bool):  # pragma: no cover - strict types refuse it
            request_id = None
        return Envelope(self.authorization, self.replyTo, request_id, self.auth0Id)


def parse_record_fast(raw: bytes) -> RecordWithEnvelope | None:
    """The hot path's one-pass parse of a record create, or None: "take the general path".

    It must accept nothing the general path refuses: bytes that could hide NUL, NaN or
    Infinity (which pydantic's JSON parser allows) or nesting (the depth limit) go the long way.
    """
    if (
        raw.count(b"{") + raw.count(b"[") > 2
        or b"\\u0000" in raw
        or b"NaN" in raw
        or b"Infinity" in raw
    ):
        return None
    try:
        return RecordWithEnvelope.model_validate_json(raw)
    except ValidationError:
        return None


class BulkRecords(_Request):
    what_it_is: ClassVar[str] = "a bulk"

    records: list[Any]


class RecordCommand(_Request):
    recordId: Id | None = None


class VoidRecord(RecordCommand):
    what_it_is: ClassVar[str] = "a void"

    reason: Annotated[Text, Field(min_length=1, max_length=NOTES_MAX)]

    @field_validator("reason")
    @classmethod
    def _said(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must say why (not only spaces)")
        return value


class CheckIdempotency(_Request):
    what_it_is: ClassVar[str] = "a check"

    key: Annotated[Text, Field(min_length=1, max_length=1024)]


class Envelope(NamedTuple):
    """Fields allowed in every payload that are never part of its content (a tuple: one is
    made per request on the hot path)."""

    authorization: str | None = None
    reply_to: str | None = None
    request_id: str | int | float | None = None
    auth0_id: str | None = None
    invalid: tuple[str, ...] = ()

    def check(self) -> None:
        """Refuse envelope fields of the wrong type (they were set aside, not trusted)."""
        if self.invalid:
            fields = [
                {"field": n, "message": "must be a string or a number"}
                if n == "requestId"  # echoed as sent
                else {"field": n, "message": "must be a string"}
                for n in self.invalid
            ]
            summary = "; ".join(f"{f['field']} {f['message']}" for f in fields)
            raise InvalidRequest(f"envelope field(s): {summary}", {"fields": fields})


EMPTY_ENVELOPE = Envelope()


def number_out(value: float) -> float | int:
    """A JSON number as a person wrote it: 5, not 5.0."""
    if value.is_integer() and abs(value) < 2**53:  # inf and nan are not integers
        return int(value)
    return value


def _depth_exceeds(value: object, limit: int) -> bool:
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values() if isinstance(v, dict | list))
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node if isinstance(v, dict | list))
    return False


BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark, which some editors and browsers' Blobs prepend
BOM_HINT = "starts with a byte order mark"


def json_type(value: object) -> str:
    """The JSON name of a decoded value's type (not Python's: "null", not "NoneType")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def decode_object(raw: bytes, *, max_bytes: int, max_depth: int) -> dict[str, Any]:
    """The payload as a JSON object, or the error that refuses it."""
    if len(raw) > max_bytes:
        raise PayloadTooLarge(
            f"payload is {len(raw)} bytes; the limit is {max_bytes}",
            {"size": len(raw), "limit": max_bytes},
        )
    data: object = None
    problem: str | None = None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # RFC 8259 §8.1: a parser may ignore a (one) leading byte order mark
        if raw.startswith(BOM * 2):
            problem = "payload starts with two byte order marks: send JSON text, one at most"
        elif raw.startswith(BOM):
            problem = BOM_HINT
        elif "UTF-8" in str(exc):  # orjson's words for it ("surrogates not allowed") help nobody
            problem = NOT_UTF8
        elif "number is infinity" in str(exc):
            # valid JSON (RFC 8259 sets no range) that orjson will not read: read it with the
            # standard library, so that the field is refused by name and the envelope answered
            problem = OUT_OF_RANGE
        else:
            problem = f"payload is not valid JSON: {exc}"
    if problem is BOM_HINT:  # decoded outside the except: no exception chain kept alive
        return decode_object(raw[len(BOM) :], max_bytes=max_bytes, max_depth=max_depth)
    if problem is OUT_OF_RANGE:
        data, problem = _decode_out_of_range(raw), None
    if problem is not None:  # raised outside the except: no exception chain kept alive
        raise InvalidRequest(problem)
    if not isinstance(data, dict):
        raise InvalidRequest(
            f'payload must be a JSON object, got {json_type(data)}: send {{"field": value, ...}}'
        )
    # Counting brackets is C-speed; only a payload that could be too deep gets walked.
    if raw.count(b"{") + raw.count(b"[") > max_depth and _depth_exceeds(data, max_depth):
        raise TooDeep(f"payload nests deeper than {max_depth} levels", data)
    return data


OUT_OF_RANGE = "a number beyond a double's range"


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _int_as_orjson_reads_it(text: str) -> int | float:
    """An integer as orjson reads one: exact within 64 bits, else a double (infinity beyond a
    double's range), never an integer no JSON writer of ours can write back (echoed in a
    reply, a 400-digit requestId failed to encode: INTERNAL)."""
    value = int(text)
    if -(2**63) <= value < 2**64:
        return value
    return float(text)


def _decode_out_of_range(raw: bytes) -> object:
    """``raw`` with a number beyond a double's range read as infinity (for the validators to
    refuse where it stands); NaN and Infinity literals stay refused, as orjson refuses them,
    and so does a lone surrogate escape (``"\\ud800"``), which the standard library takes
    and no UTF-8 writer (a reply, a dead letter, PostgreSQL) can write back."""
    try:
        data = json.loads(raw, parse_constant=_no_constant, parse_int=_int_as_orjson_reads_it)
    except (ValueError, RecursionError) as exc:
        raise InvalidRequest(f"payload is not valid JSON: {exc}") from None
    if _holds_a_surrogate(data):
        raise InvalidRequest(NOT_UTF8)
    return data


NOT_UTF8 = "payload is not valid UTF-8: send JSON text encoded as UTF-8"


def _holds_a_surrogate(data: object) -> bool:
    """Is there a lone surrogate in any key or string of ``data``? (Iterative: the depth
    limit is checked after this.)"""
    todo = [data]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            todo.extend(item)
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return False


class TooDeep(InvalidRequest):
    """A JSON object nested too deep: refused, but it parsed, so its envelope (``replyTo``,
    ``requestId``) can still say where and how to answer."""

    def __init__(self, message: str, data: dict[str, Any]) -> None:
        super().__init__(message)
        self.data = data


def take_envelope(data: dict[str, Any]) -> Envelope:
    """Remove the envelope fields from ``data`` and return them (ill-typed ones are dropped)."""
    if (
        "authorization" not in data
        and "replyTo" not in data
        and "requestId" not in data
        and "auth0Id" not in data
    ):
        return EMPTY_ENVELOPE
    invalid: list[str] = []
    texts: dict[str, str | None] = {}
    for name in ("authorization", "replyTo", "auth0Id"):
        value = data.pop(name, None)
        if value is None or isinstance(value, str):
            texts[name] = value
        else:
            texts[name] = None
            invalid.append(name)
    request_id = data.pop("requestId", None)
    if (
        isinstance(request_id, bool)
        or not isinstance(request_id, str | int | float | None)
        or (isinstance(request_id, float) and not math.isfinite(request_id))  # 1e400
    ):
        invalid.append("requestId")
        request_id = None
    elif isinstance(request_id, str) and len(request_id) > NAME_MAX:
        request_id = request_id[:NAME_MAX]
    return Envelope(
        authorization=texts["authorization"],
        reply_to=texts["replyTo"],
        request_id=request_id,
        auth0_id=texts["auth0Id"],
        invalid=tuple(invalid),
    )


def validation_error(
    exc: ValidationError, prefix: str = "", what: str = "payload"
) -> InvalidRequest:
    """One readable InvalidRequest from pydantic's errors, naming every bad field of ``what``."""
    fields = []
    for err in exc.errors(include_url=False, include_context=True, include_input=False):
        loc = ".".join(str(p) for p in err["loc"]) or "payload"
        cause = err.get("ctx", {}).get("error")
        if isinstance(cause, RefusedField):
            loc = ".".join(str(p) for p in (*err["loc"], cause.field))
        msg = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "is not a field you may send here"
        elif err["type"] == "model_type":  # "...or instance of Bonus": our class, not theirs
            msg = "must be a JSON object"
        fields.append({"field": prefix + loc, "message": msg})
    summary = "; ".join(f"{f['field']}: {f['message']}" for f in fields[:5])
    return InvalidRequest(f"invalid {what}: {summary}", {"fields": fields})


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: object, prefix: str = "") -> M:
    """``model`` from ``data``, or an InvalidRequest naming the bad fields."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = validation_error(exc, prefix)
    # Raised outside the except block on purpose: chained to pydantic's error (which
    # pydantic-core keeps alive out of the garbage collector's sight), the whole batch behind
    # this frame leaked with every refused date.
    raise error


def same_id(given: str | None, topic_id: str, name: str) -> None:
    """An id repeated in the payload must be the one the topic (or path) names."""
    if given is not None and given != topic_id:
        raise InvalidRequest(
            f"{name} {given} does not match {topic_id}, the one the topic (or URL) names",
            {"fields": [{"field": name, "message": "must match the topic or URL"}]},
        )
