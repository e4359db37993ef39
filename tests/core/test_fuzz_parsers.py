"""Fuzzing the pure parsers: payload bytes, request models, topics and MQTT 5 packets.

Whatever arrives, only the gateway's typed errors may come out: ``InvalidRequest`` /
``PayloadTooLarge`` from the payload parser, pydantic's ``ValidationError`` from the hot path's
one-pass parser, ``None`` from the topic parser, ``ProtocolError`` from the packet reader.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import math
import weakref
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, cast

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from gateway.core import mqtt5
from gateway.core.auth import AMBIGUOUS_AUTHORIZATION, KeyRing, TokenVerifier
from gateway.core.models import (
    ENVELOPE_FIELDS,
    NAME_MAX,
    BulkRecords,
    CheckIdempotency,
    CreateRecord,
    Envelope,
    ExtendSession,
    OpenSession,
    RecordCommand,
    RecordWithEnvelope,
    SessionCommand,
    TooDeep,
    UpdateSession,
    VoidRecord,
    decode_object,
    parse_record_fast,
    take_envelope,
    validate,
)
from gateway.core.topics import MAX_ID_LENGTH, Op, Route, Topics
from gateway.errors import ERROR_CODES, InvalidRequest, PayloadTooLarge, RequestError
from gateway.service import Service
from gateway.transport.dispatch import Dispatcher, Refusal
from gateway.transport.mqtt import Inbound

P = "hydrobit/v2"
MAX_BYTES = 262_144
MAX_DEPTH = 16

FUZZ = settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(FUZZ, max_examples=300)
SLOW = settings(FUZZ, max_examples=120)  # each example runs an event loop or a full gc

REQUEST_MODELS: list[type[BaseModel]] = [
    OpenSession,
    UpdateSession,
    ExtendSession,
    SessionCommand,
    CreateRecord,
    BulkRecords,
    VoidRecord,
    RecordCommand,
    CheckIdempotency,
]

# --- strategies -------------------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
json_values = st.recursive(
    json_scalars,
    lambda kids: (
        st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=12), kids, max_size=5)
    ),
    max_leaves=15,
)
# What orjson itself produces: no NaN/inf, integers within 64 bits.
wire_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
wire_values = st.recursive(
    wire_scalars,
    lambda kids: (
        st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=12), kids, max_size=5)
    ),
    max_leaves=15,
)

PARSED_MODELS: list[type[BaseModel]] = [*REQUEST_MODELS, RecordWithEnvelope]
ALL_FIELD_NAMES = sorted(
    {name for model in PARSED_MODELS for name in model.model_fields} | set(ENVELOPE_FIELDS)
)
# Values of the right type and of every wrong one: what a confused device sends.
field_values = json_values | st.sampled_from(
    [
        "",
        "x" * 129,
        "x" * 2_001,
        "2025-10-19T14:30:00.000Z",
        "2025-10-19",
        "9999-12-31T23:59:59-14:00",
        "0001-01-01T00:00:00+14:00",
        "\x00",
        "\ud7ff\ue000",
        -1,
        0,
        1e308,
        -0.0,
        2**64,
        10**400,
        float("nan"),
        float("inf"),
        True,
        [],
        {},
        {"type": "percent", "value": 10},
        {"type": "fixed", "value": -1},
        {"type": "bogus", "value": 1, "note": 5},
    ]
)
model_shaped = st.dictionaries(st.sampled_from(ALL_FIELD_NAMES), field_values, max_size=10)
any_dict = st.dictionaries(st.text(max_size=12), json_values, max_size=8)


def dumps(value: object, *, ascii_only: bool = True) -> bytes:
    """JSON as a (careless) device writes it: stdlib json, NaN and huge integers included."""
    return json.dumps(value, ensure_ascii=ascii_only).encode()


def depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((depth(v) for v in value), default=0)
    return 0


def decode(raw: bytes, max_bytes: int = MAX_BYTES) -> dict[str, Any] | RequestError:
    """decode_object's answer: the object, or the typed error (anything else fails the test)."""
    refused: RequestError | None = None
    try:
        data = decode_object(raw, max_bytes=max_bytes, max_depth=MAX_DEPTH)
    except (InvalidRequest, PayloadTooLarge) as exc:
        refused = exc
    if refused is not None:
        assert type(refused) in (InvalidRequest, TooDeep, PayloadTooLarge)
        if isinstance(refused, TooDeep):  # it parsed: the object it carries is the payload's
            assert refused.data == orjson.loads(raw)
        assert refused.code in ("VALIDATION_ERROR", "PAYLOAD_TOO_LARGE")
        assert isinstance(refused.message, str)
        assert refused.message
        return refused
    assert isinstance(data, dict)
    assert depth(data) <= MAX_DEPTH, "decode_object let a too-deep payload through"
    return data


# --- decode_object ----------------------------------------------------------------------------


@FUZZ
@given(raw=st.binary(max_size=2_000), max_bytes=st.sampled_from([MAX_BYTES, 64, 1]))
@example(raw=b"", max_bytes=MAX_BYTES)
@example(raw=b"\xef\xbb\xbf{}", max_bytes=MAX_BYTES)
@example(raw=b'{"a": "\\ud800"}', max_bytes=MAX_BYTES)
@example(raw=b'{"a": NaN}', max_bytes=MAX_BYTES)
@example(raw=b'{"a": 1e400}', max_bytes=MAX_BYTES)
@example(raw=b'{"a": 1}\x00', max_bytes=MAX_BYTES)
def test_decode_object_on_arbitrary_bytes(raw: bytes, max_bytes: int) -> None:
    """Arbitrary bytes: a dict, or InvalidRequest / PayloadTooLarge, never another exception."""
    got = decode(raw, max_bytes)
    if len(raw) > max_bytes:
        assert isinstance(got, PayloadTooLarge)


@FUZZ
@given(value=json_values, ascii_only=st.booleans())
def test_decode_object_on_arbitrary_json(value: object, ascii_only: bool) -> None:
    """Any JSON document (NaN and huge integers too): objects come back, the rest is refused."""
    got = decode(dumps(value, ascii_only=ascii_only))
    if not isinstance(value, dict):
        assert isinstance(got, InvalidRequest)


@FEW
@given(value=st.dictionaries(st.text(max_size=12), wire_values, max_size=6))
def test_decode_object_round_trips_wire_json(value: dict[str, Any]) -> None:
    """A JSON object within the limits decodes to exactly what was encoded (NUL included: the
    field that carries one is refused by the models, not the whole payload here)."""
    raw = orjson.dumps(value)
    got = decode(raw)
    if depth(value) <= MAX_DEPTH:
        assert got == value
    else:
        assert isinstance(got, InvalidRequest)


@FUZZ
@given(
    levels=st.integers(min_value=1, max_value=3_000),
    kinds=st.lists(st.sampled_from(["{", "["]), min_size=1, max_size=8),
    leaf=st.sampled_from([b"1", b'"x"', b"null", b"[]", b"{}", b"", b"NaN"]),
)
def test_decode_object_on_deep_nesting(levels: int, kinds: list[str], leaf: bytes) -> None:
    """Nesting thousands deep (objects, arrays, mixed, unclosed): a refusal or a shallow dict."""
    opening = b""
    closing = b""
    for i in range(levels):
        kind = kinds[i % len(kinds)]
        if kind == "{":
            opening += b'{"k":'
            closing = b"}" + closing
        else:
            opening += b"["
            closing = b"]" + closing
    for raw in (b'{"a":' + opening + leaf + closing + b"}", opening + leaf + closing, opening):
        got = decode(raw)
        if isinstance(got, dict):
            assert depth(got) <= MAX_DEPTH


@FUZZ
@given(
    size=st.integers(min_value=0, max_value=MAX_BYTES + 4_096),
    char=st.sampled_from([b"x", b"\\u00e9", "é".encode(), b"\\\\", b"\xff"]),
    wrap=st.sampled_from(["string", "array", "keys"]),
)
def test_decode_object_on_huge_inputs(size: int, char: bytes, wrap: str) -> None:
    """Payloads up to and past the size limit: a dict, InvalidRequest or PayloadTooLarge."""
    if wrap == "string":
        raw = b'{"a":"' + char * (size // len(char)) + b'"}'
    elif wrap == "array":
        raw = b'{"a":[' + b",".join([b"1"] * (size // 2)) + b"]}"
    else:
        raw = b"{" + b",".join(b'"k%d":0' % i for i in range(size // 8)) + b"}"
    got = decode(raw)
    if len(raw) > MAX_BYTES:
        assert isinstance(got, PayloadTooLarge)
        assert got.details == {"size": len(raw), "limit": MAX_BYTES}


# --- envelope and request models ---------------------------------------------------------------


def check_refusal(exc: InvalidRequest, model: type[BaseModel], data: dict[str, Any]) -> None:
    """A validation refusal names each bad field: a model field, a key sent, or the payload."""
    assert type(exc) is InvalidRequest
    assert exc.code == "VALIDATION_ERROR"
    assert exc.message
    fields = exc.details.get("fields")
    assert isinstance(fields, list)
    assert fields, exc.details
    known = set(model.model_fields) | set(data) | {"payload"}
    for f in fields:
        assert isinstance(f, dict)
        assert isinstance(f["field"], str)
        assert f["field"]
        assert isinstance(f["message"], str)
        assert f["message"]
        name = f["field"]
        assert name in known or any(name.startswith(f"{k}.") for k in known), (f, known)
    orjson.dumps(exc.details)  # it goes on the wire as is


def refusal(call: Callable[[], object]) -> InvalidRequest | None:
    """The InvalidRequest ``call`` raises, or None (any other exception fails the test)."""
    try:
        call()
    except InvalidRequest as exc:
        return exc
    return None


def parse_request(model: type[BaseModel], payload: dict[str, Any]) -> BaseModel | InvalidRequest:
    """What the dispatcher does with a decoded object: envelope aside, then the model."""
    data = dict(payload)
    envelope = take_envelope(data)
    assert isinstance(envelope, Envelope)
    assert not set(ENVELOPE_FIELDS) & set(data), "an envelope field stayed in the content"
    rid = envelope.request_id
    assert rid is None or (isinstance(rid, str | int | float) and not isinstance(rid, bool))
    assert not isinstance(rid, str) or len(rid) <= NAME_MAX
    for text in (envelope.authorization, envelope.reply_to, envelope.auth0_id):
        assert text is None or isinstance(text, str)
    bad_envelope = refusal(envelope.check)
    if bad_envelope is not None:
        assert bad_envelope.details["fields"]
        assert {f["field"] for f in bad_envelope.details["fields"]} <= set(ENVELOPE_FIELDS)
        assert set(envelope.invalid) <= set(ENVELOPE_FIELDS)
        return bad_envelope
    assert not envelope.invalid
    result: list[BaseModel] = []
    bad = refusal(lambda: result.append(validate(model, data)))
    if bad is not None:
        check_refusal(bad, model, data)
        return bad
    assert isinstance(result[0], model)
    return result[0]


@FUZZ
@given(model=st.sampled_from(REQUEST_MODELS), payload=any_dict | model_shaped)
@example(model=CreateRecord, payload={"units": 10**400})
@example(model=CreateRecord, payload={"recordedAtUtc": "0001-01-01T00:00:00+14:00"})
@example(model=OpenSession, payload={"openedAt": "9999-12-31T23:59:59-14:00", "projectId": "p"})
@example(model=UpdateSession, payload={"": 1, "bonus": {"type": "fixed", "value": -1}})
@example(model=CreateRecord, payload={"requestId": True, "authorization": 1})
def test_request_models_on_arbitrary_dicts(model: type[BaseModel], payload: dict[str, Any]) -> None:
    """Arbitrary objects for every request model: a model, or InvalidRequest naming fields."""
    parse_request(model, payload)


@FEW
@given(
    model=st.sampled_from(REQUEST_MODELS),
    payload=st.fixed_dictionaries(
        {},
        optional=dict.fromkeys(ALL_FIELD_NAMES, field_values),
    ),
)
def test_request_models_on_their_own_fields_with_wrong_types(
    model: type[BaseModel], payload: dict[str, Any]
) -> None:
    """The models' own field names with values of any type: a model or a named refusal."""
    got = parse_request(model, payload)
    if isinstance(got, BaseModel) and isinstance(got, CreateRecord):
        assert got.units >= 0
        assert math.isfinite(got.units)
        assert got.recordedAtUtc.tzinfo is not None


@FUZZ
@given(model=st.sampled_from(REQUEST_MODELS), value=json_values)
def test_request_models_on_non_objects(model: type[BaseModel], value: object) -> None:
    """validate() on anything at all raises only InvalidRequest with named fields."""
    bad = refusal(lambda: validate(model, value))
    assert bad is None or bad.details["fields"]


class _Batch:
    """Stands for the dispatcher's batch: what a refusal's traceback must not keep alive."""

    error: InvalidRequest | None = None


def _refuse_into(batch: _Batch, model: type[BaseModel], payload: dict[str, Any]) -> None:
    # as the dispatcher does: the refusal is kept on the request (a cycle through this frame)
    batch.error = refusal(lambda: validate(model, payload))


@SLOW
@given(model=st.sampled_from(REQUEST_MODELS), payload=model_shaped)
@example(model=CreateRecord, payload={"recordedAtUtc": "yesterday"})
@example(model=OpenSession, payload={"projectId": "p", "openedAt": 5})
def test_refusals_leave_nothing_uncollectable(
    model: type[BaseModel], payload: dict[str, Any]
) -> None:
    """A refusal kept next to its request is freed with it: nothing leaks per bad payload."""
    batch = _Batch()
    _refuse_into(batch, model, payload)
    alive = weakref.ref(batch)
    del batch
    gc.collect()
    assert alive() is None, f"refusing {payload!r} as {model.__name__} leaks its caller"


# --- the hot path's one-pass parser ----------------------------------------------------------

RECORD = {
    "workerId": "JS0315",
    "worker_name": "John Smith",
    "units": 5,
    "recordedAtUtc": "2025-10-19T14:30:00.000Z",
    "clientEventId": "evt_1",
}
record_shaped = st.fixed_dictionaries(
    {k: st.just(v) | field_values for k, v in RECORD.items()},
    optional={n: field_values for n in ALL_FIELD_NAMES if n not in RECORD},
)


def fast_parse(raw: bytes) -> RecordWithEnvelope | None:
    return parse_record_fast(raw)


@FUZZ
@given(raw=st.binary(max_size=1_000))
@example(raw=b"")
@example(raw=b"\xff\xfe")
@example(raw=b'{"workerId": "\\ud800"}')
def test_hot_path_parser_on_arbitrary_bytes(raw: bytes) -> None:
    """RecordWithEnvelope.model_validate_json on any bytes raises only ValidationError."""
    fast_parse(raw)


@FEW
@given(value=record_shaped | json_values, ascii_only=st.booleans())
def test_hot_path_parser_on_json(value: object, ascii_only: bool) -> None:
    """...and on any JSON document, record-shaped or not."""
    fast_parse(dumps(value, ascii_only=ascii_only))


BASE_RECORD = (
    b'"workerId":"W","worker_name":"n","recordedAtUtc":"2025-01-01T00:00:00Z","clientEventId":"e"'
)


@FEW
@given(value=record_shaped, ascii_only=st.booleans())
@example(value=dict(RECORD, requestId=2**64), ascii_only=True)
@example(value=dict(RECORD, requestId=True), ascii_only=True)
@example(value=dict(RECORD, requestId=float("nan")), ascii_only=True)
@example(value=dict(RECORD, anything=float("inf")), ascii_only=True)
def test_hot_path_accepts_only_what_the_general_path_accepts(
    value: dict[str, Any], ascii_only: bool
) -> None:
    """A payload the hot path accepts is valid JSON that the general path accepts alike, and
    its envelope can be echoed in a reply (SPEC §4: what is not JSON is VALIDATION_ERROR)."""
    raw = dumps(value, ascii_only=ascii_only)
    fast = fast_parse(raw)
    if fast is None:
        return
    request_id = fast.envelope().request_id
    try:
        orjson.dumps({"requestId": request_id})
    except TypeError as exc:
        raise AssertionError(f"hot path took requestId {request_id!r}; no reply echoes it") from exc
    data = decode(raw)
    assert isinstance(data, dict), f"hot path accepted {raw!r}, the general path refuses: {data}"
    envelope = take_envelope(data)
    assert not envelope.invalid, f"hot path accepted {raw!r}, whose envelope is refused"
    general = validate(CreateRecord, data)
    assert general == CreateRecord.model_validate(fast.model_dump(exclude=set(ENVELOPE_FIELDS)))
    assert fast.envelope() == envelope


# --- the dispatcher: bytes to replies, without a database --------------------------------------


class _NoService:
    """Every request below is refused before the service is asked."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the service was asked ({name}) for an unauthenticated request")


REQUEST_SUFFIXES = [
    "sessions/open",
    "sessions/s1/get",
    "sessions/s1/update",
    "sessions/s1/close",
    "sessions/s1/extend",
    "sessions/s1/records",
    "records/bulk",
    "records/r1/get",
    "records/r1/void",
    "records/check-idempotency",
    "not/a/request",
]
payloads = (
    st.binary(max_size=600)
    | st.builds(dumps, json_values)
    | st.builds(dumps, record_shaped)
    | st.builds(dumps, model_shaped)
)


@SLOW
@given(
    messages=st.lists(
        st.tuples(
            st.sampled_from(REQUEST_SUFFIXES),
            payloads,
            st.none() | st.sampled_from([f"{P}/clients/c1/replies", f"{P}/sessions/open", "a/+"]),
            st.none() | st.sampled_from(["Bearer not-a-jwt", "Bearer", "", "\x00"]),
        ),
        min_size=1,
        max_size=8,
    )
)
@example(
    messages=[
        (
            "sessions/s1/records",
            b"{" + BASE_RECORD + b',"requestId":' + b"9" * 30 + b"}",
            None,
            None,
        )
    ]
)
@example(messages=[("sessions/s1/records", b"{" + BASE_RECORD + b',"requestId":NaN}', None, None)])
@example(  # found by hypothesis: a 300-digit integer, read by the stdlib fallback, echoed
    messages=[("sessions/open", b'{"":"","requestId":1' + b"0" * 310 + b"}", None, None)]
)
def test_dispatcher_answers_every_payload_with_one_error_reply(
    messages: list[tuple[str, bytes, str | None, str | None]],
) -> None:
    """Any batch of unauthenticated requests: one error reply each, one dead letter each."""
    topics = Topics(P)
    refused: list[Refusal] = []
    dispatcher = Dispatcher(
        cast(Service, _NoService()),
        TokenVerifier(KeyRing(secret="s" * 40)),
        topics,
        max_payload_bytes=MAX_BYTES,
        max_json_depth=MAX_DEPTH,
        on_refused=refused.append,
    )
    now = datetime.now(UTC)
    batch = [
        Inbound(f"{P}/{suffix}", raw, 1, i + 1, response, b"c%d" % i, auth, now, 0)
        for i, (suffix, raw, response, auth) in enumerate(messages)
    ]
    replies = asyncio.run(dispatcher.handle(batch))
    assert len(replies) == len(batch)
    for msg, reply in zip(batch, replies, strict=True):
        assert reply.correlation == msg.correlation
        assert reply.topic is not None  # only a retained copy goes unanswered
        assert reply.topic == f"{msg.topic}/reply" or topics.reply_allowed(reply.topic)
        assert topics.parse(reply.topic) is None
        body = orjson.loads(reply.payload)
        assert body["status"] == "error", body
        assert body["error"]["code"] in ERROR_CODES
        assert body["error"]["code"] not in ("INTERNAL", "UNAVAILABLE"), body
    assert len(refused) == len(batch)


def test_a_retained_request_is_answered_and_its_copy_cleared() -> None:
    """A request published retained is answered as any other, and its reply says to clear the
    broker's copy (it holds the token); the emptied copy coming back is no request at all:
    neither answered nor refused."""
    refused: list[Refusal] = []
    dispatcher = Dispatcher(
        cast(Service, _NoService()),
        TokenVerifier(KeyRing(secret="s" * 40)),
        Topics(P),
        max_payload_bytes=MAX_BYTES,
        max_json_depth=MAX_DEPTH,
        on_refused=refused.append,
    )
    now = datetime.now(UTC)
    token = "Bearer not-a-jwt"
    topic = f"{P}/sessions/open"
    retained = Inbound(topic, b'{"projectId":"p"}', 1, 1, None, b"c1", token, now, 0)
    retained.retained = True
    emptied = Inbound(topic, b"", 1, 2, None, None, None, now, 0)
    emptied.retained = True
    live = Inbound(topic, b'{"projectId":"p"}', 1, 3, None, b"c3", token, now, 0)
    first, second, third = asyncio.run(dispatcher.handle([retained, emptied, live]))
    assert (first.topic, first.clear_retained) == (f"{topic}/reply", topic)
    assert (second.topic, second.clear_retained) == (None, None)
    assert (third.topic, third.clear_retained) == (f"{topic}/reply", None)
    assert [r.msg for r in refused] == [retained, live]  # the token is not a JWT


# --- topics ---------------------------------------------------------------------------------

SUBSCRIPTIONS = [f.removeprefix("$share/g/") for f in Topics(P).subscriptions("g")]
LEVELS = [
    "hydrobit",
    "v2",
    "sessions",
    "records",
    "open",
    "get",
    "update",
    "close",
    "extend",
    "records",
    "bulk",
    "void",
    "check-idempotency",
    "events",
    "state",
    "gateway",
    "status",
    "clients",
    "reply",
    "+",
    "#",
    "$SYS",
    "",
    "\x00",
    "a\x00b",
    "s" * 128,
    "s" * 129,
    "ü/ñ",
    "🙂",
]
levels = st.sampled_from(LEVELS) | st.text(max_size=10)
topic_texts = (
    st.text(max_size=200)
    | st.lists(levels, max_size=7).map("/".join)
    | st.lists(levels, max_size=4).map(lambda ls: "/".join([P, *ls]))
    | st.lists(levels, max_size=3).map(lambda ls: "/".join([P, "sessions", *ls]))
    | st.lists(levels, max_size=3).map(lambda ls: "/".join([P, "records", *ls]))
    | st.tuples(st.sampled_from(["sessions", "records"]), levels, levels).map(
        lambda t: f"{P}/{t[0]}/{t[1]}/{t[2]}"
    )
    | st.integers(min_value=1_000, max_value=70_000).map(lambda n: f"{P}/sessions/{'x' * n}/get")
    | st.integers(min_value=1_000, max_value=70_000).map(lambda n: "a/" * n)
)


def filter_matches(topic: str, topic_filter: str) -> bool:
    """MQTT topic-filter matching (MQTT 5 §4.7), for topics as a device may publish them."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    t = topic.split("/")
    f = topic_filter.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t):
            return False
        if level not in ("+", t[i]):
            return False
    return len(t) == len(f)


def test_filter_matching_helper() -> None:
    """The test's own MQTT matcher agrees with aiomqtt on plain topics."""
    import aiomqtt

    cases = [f"{P}/sessions/x/get", f"{P}/sessions//get", f"{P}/sessions/open", f"{P}/a", "x"]
    for topic in cases:
        for f in [*SUBSCRIPTIONS, f"{P}/#", "#", "+/+"]:
            assert filter_matches(topic, f) == aiomqtt.Topic(topic).matches(f), (topic, f)


@FUZZ
@given(topic=topic_texts)
@example(topic=f"{P}/sessions//get")
@example(topic=f"{P}/records/{'r' * 129}/void")
@example(topic=f"{P}/sessions/a\x00b/records")
@example(topic=f"{P}/sessions/open/")
@example(topic=f"/{P}/sessions/open")
@example(topic=P)
def test_topics_parse_and_reply_allowed_on_arbitrary_text(topic: str) -> None:
    """parse gives None or a Route with 1..128-char ids; reply_allowed gives a bool; a request
    topic, or anything the gateway's subscriptions match, is never a place for a reply."""
    topics = Topics(P)
    route = topics.parse(topic)
    assert route is None or isinstance(route, Route)
    allowed = topics.reply_allowed(topic)
    assert type(allowed) is bool
    assert topics.parse(topic) == route  # the cached answer is the same
    assert topics.reply_allowed(topic) is allowed
    matched = any(filter_matches(topic, f) for f in SUBSCRIPTIONS)
    if route is not None:
        assert isinstance(route.op, Op)
        assert not allowed, f"reply allowed to request topic {topic!r}"
        assert matched, f"{topic!r} parses to {route} but no subscription delivers it"
        ids = [i for i in (route.session_id, route.record_id) if i is not None]
        needs_id = route.op not in (Op.OPEN_SESSION, Op.BULK_RECORDS, Op.CHECK_IDEMPOTENCY)
        assert len(ids) == (1 if needs_id else 0), route
        for value in ids:
            assert 0 < len(value) <= MAX_ID_LENGTH
            assert value in topic.split("/")
    if matched:
        assert not allowed, f"reply allowed to {topic!r}, which the gateway subscribes to"
    if allowed:
        assert topic
        assert not topic.startswith("$")
        assert not {"+", "#", "\x00"} & set(topic)


@FEW
@given(
    prefix=st.lists(
        st.text(min_size=1, max_size=6).filter(lambda s: not set(s) & set("/+#\x00$")),
        min_size=1,
        max_size=3,
    ).map("/".join),
    topic=topic_texts,
)
def test_subscriptions_never_match_an_allowed_reply_under_any_prefix(
    prefix: str, topic: str
) -> None:
    """Under any prefix, no topic the subscriptions match is one the gateway would reply to."""
    topics = Topics(prefix)
    filters = [f.removeprefix("$share/g/") for f in topics.subscriptions("g")]
    for candidate in (topic, f"{prefix}/{topic}"):
        if any(filter_matches(candidate, f) for f in filters):
            assert not topics.reply_allowed(candidate), (prefix, candidate)
        if topics.parse(candidate) is not None:
            assert not topics.reply_allowed(candidate), (prefix, candidate)


# --- MQTT 5 packets ----------------------------------------------------------------------------


def feed_all(chunks: list[bytes]) -> tuple[list[mqtt5.Packet], mqtt5.ProtocolError | None]:
    """Feed ``chunks`` to one reader: the packets out, and the ProtocolError that ended it."""
    reader = mqtt5.PacketReader()
    out: list[mqtt5.Packet] = []
    for chunk in chunks:
        try:
            got = reader.feed(chunk)
        except mqtt5.ProtocolError as exc:
            return out, exc
        assert isinstance(got, list)
        for packet in got:
            assert isinstance(
                packet,
                mqtt5.Publish | mqtt5.Ack | mqtt5.Connack | mqtt5.Disconnect | mqtt5.PingResp,
            )
        out.extend(got)
    return out, None


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@FUZZ
@given(data=st.binary(max_size=2_000), cuts=st.lists(st.integers(min_value=0), max_size=10))
@example(data=b"\x30\xff\xff\xff\xff\x7f", cuts=[])
@example(data=b"\x36\x05\x00\x01a\x00\x01", cuts=[])
@example(data=b"\x32\x03\x00\x01a", cuts=[])
@example(data=b"\x30\x04\x00\x00\x01\x0b", cuts=[])
@example(data=b"\x90\x02\x00\x01", cuts=[])
@example(data=b"\x20\x03\x00\x00\x05", cuts=[])
@example(data=b"\xe0\x03\x00\x01\x1f", cuts=[])
def test_packet_reader_on_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    """Arbitrary bytes in arbitrary chunks: packets, or ProtocolError, never another exception."""
    feed_all(split(data, cuts))


@FUZZ
@given(
    first=st.integers(min_value=0x30, max_value=0x3F),
    body=st.binary(max_size=600),
)
def test_decode_publish_on_arbitrary_bodies(first: int, body: bytes) -> None:
    """decode_publish on any body raises only ProtocolError, and slices within the body."""
    try:
        pkt = mqtt5.decode_publish(first, body, 0, len(body))
    except mqtt5.ProtocolError:
        return
    assert len(pkt.payload) <= len(body)
    assert pkt.qos in (0, 1, 2)


@FUZZ
@given(body=st.binary(max_size=600), pos=st.integers(min_value=0, max_value=8))
def test_decode_properties_on_arbitrary_bytes(body: bytes, pos: int) -> None:
    """decode_properties on any bytes raises only ProtocolError and never reads past the end."""
    try:
        props, stop = mqtt5.decode_properties(body, pos, len(body))
    except mqtt5.ProtocolError:
        return
    assert pos < stop <= len(body)
    assert isinstance(props, mqtt5.Properties)


publish_specs = st.tuples(
    st.text(max_size=60),  # topic
    st.binary(max_size=300)
    | st.integers(min_value=16_370, max_value=16_400).map(lambda n: bytes(range(256)) * (n // 256)),
    st.integers(min_value=1, max_value=65_535),  # packet id
    st.sampled_from([0, 1]),  # qos
    st.none() | st.binary(max_size=40),  # correlation
    st.none() | st.integers(min_value=0, max_value=2**32 - 1),  # message expiry
    st.booleans(),  # retain
)
other_packets = st.sampled_from(
    [
        mqtt5.encode_puback(7),
        b"\xd0\x00",  # PINGRESP
        mqtt5.encode_disconnect(),
        mqtt5.encode_disconnect(0x8E),
        b"\x20\x03\x01\x00\x00",  # CONNACK, session present, no properties
        b"\x90\x04\x00\x02\x00\x01",  # SUBACK
    ]
)


def encode(spec: tuple[str, bytes, int, int, bytes | None, int | None, bool]) -> bytes:
    topic, payload, packet_id, qos, correlation, expiry, retain = spec
    return mqtt5.encode_publish(
        mqtt5.topic_header(topic),
        payload,
        packet_id=packet_id,
        qos=qos,
        retain=retain,
        correlation=correlation,
        expiry_s=expiry,
    )


@FUZZ
@given(
    packets=st.lists(publish_specs | other_packets, min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
)
def test_packet_reader_round_trips_publishes_in_any_chunking(
    packets: list[tuple[str, bytes, int, int, bytes | None, int | None, bool] | bytes],
    cuts: list[int],
) -> None:
    """encode_publish -> feed in random chunks: the same topic, payload, packet id, correlation."""
    stream = b"".join(p if isinstance(p, bytes) else encode(p) for p in packets)
    got, error = feed_all(split(stream, cuts))
    assert error is None
    assert len(got) == len(packets)
    for sent, pkt in zip(packets, got, strict=True):
        if isinstance(sent, bytes):
            assert not isinstance(pkt, mqtt5.Publish)
            continue
        topic, payload, packet_id, qos, correlation, _expiry, retain = sent
        assert isinstance(pkt, mqtt5.Publish)
        assert pkt.topic == topic
        assert pkt.payload == payload
        assert pkt.packet_id == (packet_id if qos else 0)
        assert pkt.qos == qos
        assert pkt.retain is retain
        assert pkt.correlation == correlation
        assert pkt.response_topic is None
        assert pkt.authorization is None


mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "insert", "delete", "set"]),
        st.integers(min_value=0),
        st.integers(min_value=0, max_value=255),
    ),
    min_size=1,
    max_size=6,
)


def mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, where, value in ops:
        i = where % (len(buf) + 1)
        if op == "insert":
            buf.insert(i, value)
        elif not buf or i == len(buf):
            continue
        elif op == "flip":
            buf[i] ^= 1 << (value % 8)
        elif op == "delete":
            del buf[i]
        else:
            buf[i] = value
    return bytes(buf)


@FUZZ
@given(
    packets=st.lists(publish_specs | other_packets, min_size=1, max_size=4),
    ops=mutations,
    cuts=st.lists(st.integers(min_value=0), max_size=6),
)
def test_packet_reader_on_mutated_packets(
    packets: list[tuple[str, bytes, int, int, bytes | None, int | None, bool] | bytes],
    ops: list[tuple[str, int, int]],
    cuts: list[int],
) -> None:
    """Valid packets with bytes flipped, inserted or deleted: packets or ProtocolError only."""
    stream = b"".join(p if isinstance(p, bytes) else encode(p) for p in packets)
    feed_all(split(mutate(stream, ops), cuts))


@FUZZ
@given(
    topic=st.text(max_size=30),
    payload=st.binary(max_size=100),
    response=st.text(max_size=30),
    correlation=st.binary(max_size=20),
    user=st.lists(st.tuples(st.text(max_size=15), st.text(max_size=15)), max_size=3),
    ops=st.none() | mutations,
)
def test_packet_reader_on_publishes_with_device_properties(
    topic: str,
    payload: bytes,
    response: str,
    correlation: bytes,
    user: list[tuple[str, str]],
    ops: list[tuple[str, int, int]] | None,
) -> None:
    """A device's PUBLISH (Response Topic, Correlation Data, user properties), intact or mutated."""
    props = mqtt5.encode_properties(
        {mqtt5.P_RESPONSE_TOPIC: response, mqtt5.P_CORRELATION: correlation}, user
    )
    body = mqtt5.topic_header(topic) + b"\x00\x05" + props + payload
    stream = bytes((0x32,)) + mqtt5.varint(len(body)) + body
    got, error = feed_all([mutate(stream, ops) if ops else stream])
    if ops is None:
        assert error is None
        [pkt] = got
        assert isinstance(pkt, mqtt5.Publish)
        assert (pkt.topic, pkt.payload, pkt.packet_id) == (topic, payload, 5)
        assert (pkt.response_topic, pkt.correlation) == (response, correlation)
        tokens = {v for k, v in user if k.lower() == "authorization"}
        if len(tokens) > 1:  # two different tokens: neither is picked
            assert pkt.authorization == AMBIGUOUS_AUTHORIZATION
        else:
            assert pkt.authorization == (tokens.pop() if tokens else None)


U8 = [0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A]
U16 = [0x13, 0x21, 0x22, 0x23]
U32 = [0x02, 0x11, 0x18, 0x27]
STR = [0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F]
BIN = [0x09, 0x16]
property_values: list[tuple[list[int], st.SearchStrategy[Any]]] = [
    (U8, st.integers(0, 255)),
    (U16, st.integers(0, 65_535)),
    (U32, st.integers(0, 2**32 - 1)),
    (STR, st.text(max_size=30)),
    (BIN, st.binary(max_size=30)),
    ([mqtt5.P_SUBSCRIPTION_ID], st.integers(0, mqtt5.MAX_REMAINING)),
]
properties = st.one_of(
    *(st.dictionaries(st.sampled_from(ids), values, max_size=3) for ids, values in property_values)
)


@FUZZ
@given(
    values=properties,
    user=st.lists(st.tuples(st.text(max_size=15), st.text(max_size=15)), max_size=3),
)
def test_properties_round_trip(values: dict[int, Any], user: list[tuple[str, str]]) -> None:
    """encode_properties -> decode_properties gives the same values and user properties."""
    raw = mqtt5.encode_properties(values, user)
    props, stop = mqtt5.decode_properties(raw, 0, len(raw))
    assert stop == len(raw)
    assert props.values == values
    assert props.user == user


@FUZZ
@given(
    packet_id=st.integers(min_value=0, max_value=65_535),
    reason=st.integers(min_value=0, max_value=255),
    client_id=st.text(max_size=40),
    filters=st.lists(st.text(max_size=40), min_size=1, max_size=5),
)
def test_encoders_frame_their_packets(
    packet_id: int, reason: int, client_id: str, filters: list[str]
) -> None:
    """Every encoder's remaining length is exact; PUBACK and DISCONNECT decode back."""
    for raw in (
        mqtt5.encode_connect(
            client_id, keepalive=30, clean_start=False, session_expiry=60, receive_maximum=100
        ),
        mqtt5.encode_subscribe(packet_id, filters),
        mqtt5.encode_puback(packet_id),
        mqtt5.encode_disconnect(reason),
    ):
        vi = mqtt5.read_varint(raw, 1)
        assert vi is not None
        length, start = vi
        assert start + length == len(raw)
    [ack] = mqtt5.PacketReader().feed(mqtt5.encode_puback(packet_id))
    assert isinstance(ack, mqtt5.Ack)
    assert (ack.kind, ack.packet_id) == (mqtt5.PUBACK, packet_id)
    [bye] = mqtt5.PacketReader().feed(mqtt5.encode_disconnect(reason))
    assert isinstance(bye, mqtt5.Disconnect)
    assert bye.reason == reason


@pytest.mark.parametrize("n", [0, 127, 128, 16_383, 16_384, 2_097_151, 2_097_152, 268_435_455])
def test_varint_round_trips(n: int) -> None:
    """Variable byte integers at every length boundary decode to what was encoded."""
    raw = mqtt5.varint(n)
    assert mqtt5.read_varint(raw, 0) == (n, len(raw))
