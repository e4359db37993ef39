"""From a batch of MQTT requests to one reply each: parse, authenticate, route, apply, answer.

The reply topic is decided first (SPEC §2: Response Topic, else ``replyTo``, else
``<topic>/reply``) so that every refusal, even of garbage bytes, reaches the device. Record
creates of the whole batch go to the store together; other operations run concurrently.
``StoreUnavailable`` escapes: the pipeline retries the batch, nothing has been answered yet.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.core import ordering
from gateway.core.auth import Claims, TokenVerifier, one_authorization
from gateway.core.idempotency import split_client_key
from gateway.core.models import (
    EMPTY_ENVELOPE,
    CheckIdempotency,
    CloseSession,
    CreateRecord,
    Envelope,
    ExtendSession,
    OpenSession,
    RecordCommand,
    SessionCommand,
    TooDeep,
    UpdateSession,
    VoidRecord,
    decode_object,
    parse_record_fast,
    same_id,
    take_envelope,
    validate,
)
from gateway.core.ratelimit import RateLimiter
from gateway.core.rules import Principal
from gateway.core.topics import Op, Route, Topics
from gateway.core.views import BULK_TRIM_STEPS, trim_bulk_results
from gateway.errors import (
    Internal,
    InvalidRequest,
    RateLimited,
    RequestError,
    StoreUnavailable,
    as_request_error,
    error_body,
)
from gateway.metrics import Metrics
from gateway.service import Bulk, RecordOutcome, RecordRequest, Service
from gateway.transport.mqtt import Inbound

log = logging.getLogger(__name__)
_BARE_INTERNAL = orjson.dumps({"status": "error", "error": error_body(RuntimeError())})


@dataclass(slots=True)
class Reply:
    topic: str | None  # None: no reply (an emptied retained request)
    payload: bytes
    correlation: bytes | None
    # a request published retained: its topic, whose stored copy (with the device's token,
    # handed to every later subscriber) the gateway clears once it has answered
    clear_retained: str | None = None


@dataclass(slots=True)
class Refusal:
    """What the dead-letter table keeps of a refused request."""

    msg: Inbound
    code: str
    message: str
    auth0_id: str | None
    payload: bytes | None = None  # what was refused, when it is part of the message (a bulk item)
    size: int | None = None  # the whole payload's size, when less of it was read (an HTTP body)


@dataclass(slots=True)
class _Request:
    msg: Inbound
    reply_topic: str
    route: Route | None = None
    envelope: Envelope = EMPTY_ENVELOPE
    data: dict[str, Any] | None = None
    record: CreateRecord | None = None  # parsed by the hot path
    claims: Claims | None = None
    who: Principal | None = None
    body: dict[str, Any] | None = None  # the success reply, without requestId/clientEventId
    error: RequestError | None = None
    ignored: bool = False  # not a request: an emptied retained copy (ours, clearing one)

    @property
    def open(self) -> bool:
        return self.error is None and self.body is None and not self.ignored

    def settle(self, outcome: RecordOutcome) -> None:
        """The outcome of this request's record create."""
        if isinstance(outcome, RequestError):
            self.error = outcome
        else:
            self.body = {"status": "success", "data": outcome.data()}


OpHandler = Callable[[_Request], Awaitable[dict[str, Any]]]
Sink = Callable[[RecordOutcome], None]


class Dispatcher:
    """Turns a batch of inbound requests into replies (and refusals for the dead-letter table)."""

    def __init__(
        self,
        service: Service,
        verifier: TokenVerifier,
        topics: Topics,
        *,
        max_payload_bytes: int,
        max_json_depth: int,
        on_refused: Callable[[Refusal], None] | None = None,
        limiter: RateLimiter | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.service = service
        self.verifier = verifier
        self.topics = topics
        self.max_payload_bytes = max_payload_bytes
        self.max_json_depth = max_json_depth
        self._on_refused = on_refused
        self._limiter = limiter if limiter is not None and limiter.enabled else None
        # gateway_requests_total{op, outcome}: one increment per reply built (_reply)
        self._answered = (
            metrics.pair_counter("gateway_requests_total", "op", "outcome")
            if metrics is not None
            else None
        )
        self._handlers: dict[Op, OpHandler] = {
            Op.OPEN_SESSION: self._open_session,
            Op.GET_SESSION: self._get_session,
            Op.UPDATE_SESSION: self._update_session,
            Op.CLOSE_SESSION: self._close_session,
            Op.EXTEND_SESSION: self._extend_session,
            Op.GET_RECORD: self._get_record,
            Op.VOID_RECORD: self._void_record,
            Op.CHECK_IDEMPOTENCY: self._check_idempotency,
        }

    def register(self, op: Op, handler: OpHandler) -> None:
        self._handlers[op] = handler

    async def handle(self, batch: Sequence[Inbound]) -> list[Reply]:
        """One reply per message, in order. Raises StoreUnavailable with nothing answered."""
        reqs = [self._prepare(m) for m in batch]
        await self._resolve_principals(reqs)
        if self._limiter is not None:
            self._rate_limit(reqs)
        for r in reqs:
            if r.msg.settled is not None:  # applied before the database went away: keep it
                r.body, r.error = r.msg.settled
        todo = [r for r in reqs if r.open]
        if all(r.route is not None and r.route.op is Op.CREATE_RECORD for r in todo):
            await self._apply_wave(todo)  # the hot path: one wave, the store keeps order
        else:
            for wave in ordering.group(ordering.waves([_claims(r) for r in todo])):
                await self._apply_wave([todo[i] for i in wave])
        return [self._reply(r) for r in reqs]

    async def _apply_wave(self, wave: Sequence[_Request]) -> None:
        """Record creates of the wave together, its other requests concurrently. What is
        decided is kept (``Inbound.settled``) should a later wave meet the database gone: the
        retry then answers it the same way (not a create as a replay, a close as closed)."""
        records: list[tuple[Sink, RecordRequest]] = []
        bulks: list[tuple[_Request, Bulk]] = []
        others: list[_Request] = []
        for r in wave:
            assert r.route is not None
            try:
                if r.route.op is Op.CREATE_RECORD:
                    records.append((r.settle, self._record_request(r)))
                elif r.route.op is Op.BULK_RECORDS:
                    bulk = self._bulk(r, records)
                    bulks.append((r, bulk))
                else:
                    others.append(r)
            except RequestError as exc:
                r.error = exc
        results = await asyncio.gather(
            self._create_records(records),
            *(self._run(r) for r in others),
            return_exceptions=True,
        )
        if not isinstance(results[0], BaseException):  # every record of the wave decided
            for r, bulk in bulks:
                r.body = bulk.body()
                self._refuse_items(r, bulk)
        for r in wave:
            if r.body is not None or r.error is not None:
                r.msg.settled = (r.body, r.error)
        for result in results:
            if isinstance(result, StoreUnavailable):
                raise result
            if isinstance(result, BaseException) and not isinstance(result, Exception):
                raise result

    def fail_all(self, batch: Sequence[Inbound], exc: BaseException) -> list[Reply]:
        """Every request of a batch answered INTERNAL (a bug, never a data outage): acknowledged
        rather than redelivered for ever, and kept in the dead-letter table. A request an
        earlier wave of the batch already applied (``Inbound.settled``) keeps its own answer:
        a record committed there is not told INTERNAL."""
        replies = []
        for m in batch:
            r = _Request(m, self.topics.default_reply(m.topic), self.topics.parse(m.topic))
            if m.response_topic is not None and self.topics.reply_allowed(m.response_topic):
                r.reply_topic = m.response_topic
            if m.settled is not None:
                r.body, r.error = m.settled
            else:
                r.error = as_request_error(exc)
            try:
                replies.append(self._reply(r))
            except Exception:  # the last word on a batch must not fail too: a bare INTERNAL
                log.exception("reply to %.200r could not be built; answering INTERNAL", m.topic)
                replies.append(Reply(r.reply_topic, _BARE_INTERNAL, m.correlation))
        return replies

    # stage 1: bytes -> request ------------------------------------------------------------

    def _prepare(self, m: Inbound) -> _Request:
        topics = self.topics
        bad_response_topic = False
        if m.response_topic is not None and topics.reply_allowed(m.response_topic):
            reply_topic = m.response_topic
        else:
            bad_response_topic = m.response_topic is not None
            reply_topic = topics.default_reply(m.topic)
        r = _Request(m, reply_topic)
        route = r.route = topics.parse(m.topic)
        if m.retained and not m.payload:
            # the broker's copy of a retained request being cleared (by us, after answering
            # it): nothing to answer, nothing refused
            r.ignored = True
            return r
        if (
            route is not None
            and route.op is Op.CREATE_RECORD
            and not bad_response_topic
            and self._fast_record(r)
        ):
            return r
        try:
            too_deep: TooDeep | None = None
            try:
                r.data = decode_object(
                    m.payload, max_bytes=self.max_payload_bytes, max_depth=self.max_json_depth
                )
            except TooDeep as exc:  # refused, but its replyTo and requestId are readable
                r.data, too_deep = exc.data, exc
            r.envelope = take_envelope(r.data)
            if m.response_topic is None and r.envelope.reply_to is not None:
                if topics.reply_allowed(r.envelope.reply_to):
                    r.reply_topic = r.envelope.reply_to
                else:
                    raise InvalidRequest(topics.reply_refusal("replyTo", r.envelope.reply_to))
            if bad_response_topic:
                assert m.response_topic is not None
                raise InvalidRequest(topics.reply_refusal("Response Topic", m.response_topic))
            if too_deep is not None:
                raise too_deep
            if r.route is None:
                raise InvalidRequest(f"{m.topic} is not a request topic (the README lists them)")
            r.envelope.check()
            r.claims = self.verifier.verify(
                one_authorization(m.authorization, r.envelope.authorization)
            )
        except RequestError as exc:
            r.error = exc
        return r

    def _fast_record(self, r: _Request) -> bool:
        """The hot path for a well-formed record create: one validation of the raw bytes.

        False means "take the general path" (which also explains any refusal)."""
        raw = r.msg.payload
        if len(raw) > self.max_payload_bytes:
            return False
        record = parse_record_fast(raw)
        if record is None:
            return False
        envelope = record.envelope()
        if r.msg.response_topic is None and envelope.reply_to is not None:
            if not self.topics.reply_allowed(envelope.reply_to):
                return False
            r.reply_topic = envelope.reply_to
        r.envelope = envelope
        r.record = record
        try:
            r.claims = self.verifier.verify(
                one_authorization(r.msg.authorization, envelope.authorization)
            )
        except RequestError as exc:
            r.error = exc
        return True

    def _rate_limit(self, reqs: Sequence[_Request]) -> None:
        """GATEWAY_RATE_LIMIT_PER_S per user: refused requests are answered, never dropped."""
        assert self._limiter is not None
        now = time.monotonic()
        for r in reqs:
            if not r.open or r.who is None:
                continue
            decided = r.msg.admission
            if decided is not None:  # a retried batch: decided the first time
                if not isinstance(decided, bool):
                    r.error = decided
                continue
            cost = 1
            if r.route is not None and r.route.op is Op.BULK_RECORDS and r.data is not None:
                items = r.data.get("records")
                cost = max(1, len(items)) if isinstance(items, list) else 1
            wait = self._limiter.admit(r.who.sub, cost, now)
            if wait > 0:
                r.error = r.msg.admission = RateLimited(
                    f"too many requests for user {r.who.sub}: retry in {wait:.1f} s "
                    f"(GATEWAY_RATE_LIMIT_PER_S = {self._limiter.rate:g})",
                    {"retryAfterS": round(wait, 3)},
                )
            else:
                r.msg.admission = True

    async def _resolve_principals(self, reqs: Sequence[_Request]) -> None:
        asking = [r for r in reqs if r.open and r.claims is not None]
        if not asking:
            return
        found = await self.service.principals(
            [(r.claims, r.envelope.auth0_id) for r in asking if r.claims is not None]
        )
        for r, who in zip(asking, found, strict=True):
            if isinstance(who, RequestError):
                r.error = who
            else:
                r.who = who

    # stage 2: apply -----------------------------------------------------------------------

    def _record_request(self, r: _Request) -> RecordRequest:
        assert r.route is not None and r.route.session_id is not None and r.who is not None
        cmd = r.record if r.record is not None else validate(CreateRecord, r.data)
        return RecordRequest(r.who, cmd, r.route.session_id, r.msg.received_at)

    def _bulk(self, r: _Request, records: list[tuple[Sink, RecordRequest]]) -> Bulk:
        """Validate a bulk and its items; valid items join the batch's records."""
        assert r.who is not None
        bulk = Bulk.prepare(r.who, r.data, r.msg.received_at, self.service.limits.max_bulk)
        records.extend((bulk.sink(i), rr) for i, rr in bulk.requests)
        return bulk

    def _refuse_items(self, r: _Request, bulk: Bulk) -> None:
        """Each failed item of a bulk goes to the dead-letter table on its own."""
        if self._on_refused is None:
            return
        for code, message, raw in bulk.failures():
            self._on_refused(Refusal(r.msg, code, message, _sub(r), payload=raw))

    async def _create_records(self, records: list[tuple[Sink, RecordRequest]]) -> None:
        if not records:
            return
        try:
            outcomes = await self.service.create_records([rr for _, rr in records])
        except StoreUnavailable:
            raise
        except Exception as exc:
            log.exception("creating %d records failed", len(records))
            outcomes = [as_request_error(exc)] * len(records)
        for (sink, _), outcome in zip(records, outcomes, strict=True):
            sink(outcome)

    async def _run(self, r: _Request) -> None:
        assert r.route is not None
        handler = self._handlers.get(r.route.op)
        try:
            if handler is None:
                raise InvalidRequest(f"operation {r.route.op} is not available")
            r.body = await handler(r)
        except (RequestError, StoreUnavailable) as exc:
            if isinstance(exc, StoreUnavailable):
                raise
            r.error = exc
        except Exception as exc:
            log.exception("operation %s on %s failed", r.route.op, r.msg.topic)
            r.error = as_request_error(exc)

    # stage 3: replies ---------------------------------------------------------------------

    def _reply(self, r: _Request) -> Reply:
        if r.ignored:
            return Reply(None, b"", None)
        if r.body is not None:
            body = r.body
            outcome = "ok"
        else:
            err = r.error or as_request_error(RuntimeError("no outcome"))
            body = {"status": "error", "error": error_body(err)}
            outcome = body["error"]["code"]
            if self._on_refused is not None:
                try:  # keeping the refusal must never stop the answer
                    self._on_refused(Refusal(r.msg, outcome, body["error"]["message"], _sub(r)))
                except Exception:
                    log.exception("a refusal of %.200r was not kept as a dead letter", r.msg.topic)
        if r.envelope.request_id is not None:
            body["requestId"] = r.envelope.request_id
        if r.record is not None:
            body["clientEventId"] = r.record.clientEventId
        elif r.data is not None and r.route is not None and r.route.op is Op.CREATE_RECORD:
            event_id = r.data.get("clientEventId")
            if isinstance(event_id, str):
                body["clientEventId"] = event_id
        try:
            payload = orjson.dumps(body)
            if len(payload) > self.max_payload_bytes and isinstance(body.get("results"), list):
                payload = self._fit_bulk_reply(body)
        except TypeError:  # something that is not JSON slipped into the reply: say so plainly
            log.exception("reply to %s could not be encoded", r.msg.topic)
            payload = orjson.dumps({"status": "error", "error": error_body(RuntimeError())})
            outcome = Internal.code
        if self._answered is not None:
            self._answered.inc(r.route.op if r.route is not None else "unknown", outcome)
        return Reply(
            r.reply_topic,
            payload,
            r.msg.correlation,
            r.msg.topic if r.msg.retained else None,
        )

    def _fit_bulk_reply(self, body: dict[str, Any]) -> bytes:
        """A bulk reply within GATEWAY_MAX_PAYLOAD_BYTES (what the broker takes, per SPEC §6):
        a thousand items with detailed errors passed 1 MiB, and the broker refused the reply
        while the request was acknowledged. Failed items' errors are cut down in steps."""
        results = body["results"]
        payload = b""
        for step in range(1, BULK_TRIM_STEPS + 1):
            payload = orjson.dumps({**body, "results": trim_bulk_results(results, step)})
            if len(payload) <= self.max_payload_bytes:
                break
        log.warning(
            "bulk reply cut to %d bytes (error details left out; the dead letters keep them)",
            len(payload),
        )
        return payload

    # operations ---------------------------------------------------------------------------

    async def _open_session(self, r: _Request) -> dict[str, Any]:
        assert r.who is not None
        cmd = validate(OpenSession, r.data)
        data = await self.service.open_session(r.who, cmd, r.msg.received_at)
        return {"status": "success", "data": data}

    async def _get_session(self, r: _Request) -> dict[str, Any]:
        assert r.who is not None and r.route is not None and r.route.session_id is not None
        cmd = validate(SessionCommand, r.data)
        same_id(cmd.sessionId, r.route.session_id, "sessionId")
        data = await self.service.get_session(r.who, r.route.session_id, r.msg.received_at)
        return {"status": "success", "data": data}

    async def _update_session(self, r: _Request) -> dict[str, Any]:
        who, session_id = _session_target(r)
        cmd = validate(UpdateSession, r.data)
        same_id(cmd.sessionId, session_id, "sessionId")
        data = await self.service.update_session(who, session_id, cmd, r.msg.received_at)
        return {"status": "success", "data": data}

    async def _close_session(self, r: _Request) -> dict[str, Any]:
        who, session_id = _session_target(r)
        cmd = validate(CloseSession, r.data)
        same_id(cmd.sessionId, session_id, "sessionId")
        data = await self.service.close_session(who, session_id, r.msg.received_at)
        return {"status": "success", "data": data}

    async def _extend_session(self, r: _Request) -> dict[str, Any]:
        who, session_id = _session_target(r)
        cmd = validate(ExtendSession, r.data)
        same_id(cmd.sessionId, session_id, "sessionId")
        data = await self.service.extend_session(who, session_id, cmd, r.msg.received_at)
        return {"status": "success", "data": data}

    async def _get_record(self, r: _Request) -> dict[str, Any]:
        assert r.who is not None and r.route is not None and r.route.record_id is not None
        cmd = validate(RecordCommand, r.data)
        same_id(cmd.recordId, r.route.record_id, "recordId")
        data = await self.service.get_record(r.who, r.route.record_id)
        return {"status": "success", "data": data}

    async def _void_record(self, r: _Request) -> dict[str, Any]:
        assert r.who is not None and r.route is not None and r.route.record_id is not None
        cmd = validate(VoidRecord, r.data)
        same_id(cmd.recordId, r.route.record_id, "recordId")
        data = await self.service.void_record(r.who, r.route.record_id, cmd, r.msg.received_at)
        return {"status": "success", "data": data}

    async def _check_idempotency(self, r: _Request) -> dict[str, Any]:
        assert r.who is not None
        cmd = validate(CheckIdempotency, r.data)
        exists = await self.service.check_key(r.who, cmd.key)
        return {"status": "success", "data": {"key": cmd.key, "exists": exists}}


_SESSION_CHANGES = (Op.UPDATE_SESSION, Op.CLOSE_SESSION, Op.EXTEND_SESSION)


def _claims(r: _Request) -> list[ordering.Claim]:
    """What a request touches, for applying a batch in each device's order (core.ordering).

    Record creates of a session share a wave; an update, close or extend of it comes after the
    creates sent before it and before those sent after it; a get (a read) after those before
    it. Voids and opens, whose session is not in their topic, are ordered against every update,
    close and extend of the batch; a check after the creates of its key's session (or of its
    idempotencyKey).
    """
    assert r.route is not None and r.who is not None
    op, alone = r.route.op, object()  # a label of its own: nothing shares its wave on that key
    company = r.who.company_id
    if op is Op.CREATE_RECORD:
        key = r.record.idempotencyKey if r.record is not None else _text(r.data, "idempotencyKey")
        return [
            (("s", r.route.session_id), "create"),
            *([(("idem", company, key), "create")] if key else []),
        ]
    if op is Op.BULK_RECORDS:
        items = r.data.get("records") if r.data is not None else None
        claims: set[ordering.Claim] = set()
        for item in items if isinstance(items, list) else ():
            if isinstance(item, dict):
                if sid := _text(item, "sessionId"):
                    claims.add((("s", sid), "create"))
                if key := _text(item, "idempotencyKey"):
                    claims.add((("idem", company, key), "create"))
        return list(claims)
    if op is Op.GET_SESSION:
        return [(("s", r.route.session_id), ordering.READ)]
    if op in _SESSION_CHANGES:
        return [(("s", r.route.session_id), alone), ("sessions", "change")]
    if op is Op.VOID_RECORD:
        return [(("r", r.route.record_id), alone), ("sessions", "void")]
    if op is Op.GET_RECORD:
        return [(("r", r.route.record_id), ordering.READ)]
    if op is Op.OPEN_SESSION:
        where = (_text(r.data, "projectId"), _text(r.data, "sectorId"))
        return [(("open", company, *where), alone), ("sessions", "open")]
    key = _text(r.data, "key") or ""
    split = split_client_key(key)
    return [((("s", split[0]) if split else ("idem", company, key)), ordering.READ)]


def _text(data: dict[str, Any] | None, field: str) -> str | None:
    value = data.get(field) if data is not None else None
    return value if isinstance(value, str) else None


def _session_target(r: _Request) -> tuple[Principal, str]:
    assert r.who is not None and r.route is not None and r.route.session_id is not None
    return r.who, r.route.session_id


def _sub(r: _Request) -> str | None:
    if r.who is not None:
        return r.who.sub
    return r.claims.sub if r.claims is not None else None
