"""The HTTP sidecar: the HEAD idempotency check, health, readiness, metrics and the REST mirror
of the seeds' endpoints under ``/api/control/production``.

Backed by the same ``Service`` as MQTT, and by the MQTT dispatcher's rate limiter and
dead-letter writer, so a user has one budget and every refusal is kept whichever way it came.
Errors map to HTTP statuses through the error tree (``StoreUnavailable`` is the REST mirror's
503 ``UNAVAILABLE``); aiohttp's own refusals (404, 405, ...) get the same JSON envelope.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict

from gateway.core.auth import AMBIGUOUS_AUTHORIZATION, TokenVerifier
from gateway.core.models import (
    CheckIdempotency,
    CloseSession,
    CreateRecord,
    ExtendSession,
    OpenSession,
    UpdateSession,
    VoidRecord,
    decode_object,
    same_id,
    take_envelope,
    validate,
)
from gateway.core.ratelimit import RateLimiter
from gateway.core.rules import Principal
from gateway.core.topics import MAX_ID_LENGTH, valid_id
from gateway.errors import (
    Forbidden,
    Internal,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestError,
    StoreUnavailable,
    Unauthorized,
    Unavailable,
    as_request_error,
    error_body,
)
from gateway.logs import retrieved
from gateway.metrics import CONTENT_TYPE, Metrics
from gateway.service import Bulk, RecordRequest, Service
from gateway.transport.dispatch import Refusal
from gateway.transport.mqtt import Inbound

log = logging.getLogger(__name__)

API = "/api/control/production"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# a record id in a path: any segment but "bulk", which names the POST-only bulk endpoint
RECORD_ID = r"(?!bulk\Z)[^{}/]+"


# label values of gateway_http_requests_total stay bounded: any other method is "other"
METHODS = frozenset({"GET", "HEAD", "POST", "PATCH", "PUT", "DELETE", "OPTIONS"})

CORS_METHODS = "GET, HEAD, POST, PATCH, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"
_OURS = frozenset(h.strip().lower() for h in CORS_HEADERS.split(","))
# what a page may read beyond the safelisted headers: the replay flag, when to retry (429),
# why it was refused (401) and which methods a path takes (405)
CORS_EXPOSE = "X-Idempotent-Replay, Retry-After, WWW-Authenticate, Allow"
CORS_MAX_AGE_S = "600"
UNAVAILABLE_RETRY_AFTER_S = 2


def parse_origins(value: str) -> frozenset[str] | None:
    """``GATEWAY_CORS_ORIGINS``: ``*`` (None: any origin), or a comma-separated list (empty:
    no browser origin may call the sidecar)."""
    items = {o.strip().rstrip("/") for o in value.split(",") if o.strip()}
    return None if "*" in items else frozenset(items)


def cors_headers(origin: str | None, allowed: frozenset[str] | None) -> dict[str, str]:
    """The CORS headers of a response to a request from ``origin`` (none if not allowed).

    Tokens travel in the Authorization header, never in cookies, so no credentials are
    allowed and ``*`` exposes nothing a script could not already send with its own token.
    """
    if not origin:  # a list varies by Origin: a cache must not hand this answer to a page
        return {} if allowed is None or not allowed else {"Vary": "Origin"}
    if allowed is None:
        return {"Access-Control-Allow-Origin": "*", "Access-Control-Expose-Headers": CORS_EXPOSE}
    if origin.rstrip("/") not in allowed:
        return {"Vary": "Origin"}
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Expose-Headers": CORS_EXPOSE,
        "Vary": "Origin",
    }


_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")  # an RFC 9110 token


def cors_answer(
    request: web.Request, allowed: frozenset[str] | None
) -> tuple[dict[str, str], web.Response | None]:
    """The CORS headers for ``request``'s answer, and the whole answer if it is a preflight."""
    headers = cors_headers(request.headers.get("Origin"), allowed)
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return headers, None
    if "Access-Control-Allow-Origin" in headers:
        headers |= {
            "Access-Control-Allow-Methods": CORS_METHODS,
            "Access-Control-Allow-Headers": allow_headers(
                request.headers.get("Access-Control-Request-Headers")
            ),
            "Access-Control-Max-Age": CORS_MAX_AGE_S,
        }
    return headers, web.Response(status=204, headers=headers)


def allow_headers(requested: str | None) -> str:
    """The request headers a preflight allows: ours, plus whatever well-formed header names
    the page asked for (a request id, say): with no cookies involved, an extra header the
    sidecar ignores gives a page nothing it could not do without it."""
    names = [n.strip() for n in (requested or "").split(",")]
    extra = [n for n in names if _HEADER_NAME.match(n) and n.lower() not in _OURS][:20]
    return ", ".join([CORS_HEADERS, *extra])


def authorization_of(request: web.Request) -> str | None:
    """The request's Authorization header; two different ones are refused, not one picked."""
    values = request.headers.getall("Authorization", [])
    if len(values) > 1 and len(set(values)) > 1:
        return AMBIGUOUS_AUTHORIZATION
    return values[0] if values else None


def bearer_header(value: str | None) -> str:
    """The Authorization header of a request, which must carry a token in the Bearer scheme
    (the verifier also takes a bare JWT, which 3.1.1 devices may put in a payload)."""
    if value == AMBIGUOUS_AUTHORIZATION:
        raise Unauthorized("two different Authorization headers were sent: send exactly one")
    if not value:
        raise Unauthorized("missing token: send the header Authorization: Bearer <jwt>")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(
            "the Authorization header must use the Bearer scheme: "
            "send the header Authorization: Bearer <jwt>"
        )
    return value


def www_authenticate(authorization: str | None) -> str:
    """The challenge of a 401 (RFC 6750 §3): ``invalid_token`` when a bearer token was sent
    and refused, the bare scheme when none was."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return 'Bearer error="invalid_token"'
    return "Bearer"


def _arrival(request: web.Request) -> datetime:
    """When the call arrived: what its rules are judged on (a deadline, the clock skew), the
    same on a retry after a transient database failure as on the first attempt."""
    return _call(request).at


def _now() -> datetime:
    return datetime.now(UTC)


def _in_mirror(path: str) -> bool:
    """A request to the REST mirror (not health, metrics, or a path that was never ours)."""
    return path == API or path.startswith(f"{API}/")


def json_response(body: dict[str, Any], status: int = 200, **headers: str) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), status=status, content_type="application/json", headers=headers
    )


def refusal_of(exc: BaseException) -> RequestError:
    """What the REST mirror answers for ``exc`` (``StoreUnavailable`` is its 503)."""
    if isinstance(exc, StoreUnavailable):
        return Unavailable("the database is unavailable; retry later")
    return as_request_error(exc)


def error_response(
    exc: BaseException,
    status: int | None = None,
    headers: dict[str, str] | None = None,
    echo: dict[str, Any] | None = None,
) -> web.Response:
    """The SPEC §4 error envelope; ``status`` overrides the code's own (405 has no code)."""
    err = refusal_of(exc)
    return json_response(
        {"status": "error", "error": error_body(err), **(echo or {})},
        status=status or err.http_status,
        **(headers or {}),
    )


_PLACEHOLDER = re.compile(r"\{[^}:]+(?::([^}]+))?\}")


def _template_pattern(canonical: str) -> tuple[re.Pattern[str], str]:
    """A route template (``/sessions/{session_id}``) as a pattern over paths, with it."""
    parts, at = [], 0
    for m in _PLACEHOLDER.finditer(canonical):
        parts += [re.escape(canonical[at : m.start()]), f"(?:{m.group(1) or '[^/]+'})"]
        at = m.end()
    parts.append(re.escape(canonical[at:]))
    return re.compile("".join(parts)), canonical


@dataclass(slots=True)
class _Call:
    """What the sidecar learns of a request while serving it, for its answer and, if it is
    refused, its dead letter."""

    at: datetime = field(default_factory=_now)
    raw: bytes | None = None  # the body as read (at most max_payload_bytes + 1)
    sub: str | None = None  # the token's user, once verified
    request_id: str | int | float | None = None
    client_event_id: str | None = None
    retry_after_s: int | None = None  # when refused RATE_LIMITED
    read_at: float | None = None  # monotonic time the body was read
    admitted: bool = False  # by the rate limit: a retry of the call is not charged again

    def echo(self) -> dict[str, Any]:
        """What every answer repeats of the request, as MQTT replies do (SPEC §2)."""
        out: dict[str, Any] = {}
        if self.request_id is not None:
            out["requestId"] = self.request_id
        if self.client_event_id is not None:
            out["clientEventId"] = self.client_event_id
        return out


CALL = web.RequestKey("call", _Call)


def _call(request: web.Request) -> _Call:
    call = request.get(CALL)
    if call is None:
        call = request[CALL] = _Call()
    return call


_BY_STATUS: dict[int, type[RequestError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    413: PayloadTooLarge,
    429: RateLimited,
    503: Unavailable,
}
# aiohttp's own headers of a refusal that describe its plain-text body, not ours
_BODY_HEADERS = frozenset({"content-type", "content-length", "content-encoding"})


def http_refusal(
    method: str, path: str, exc: web.HTTPException
) -> tuple[RequestError, dict[str, str]]:
    """An error aiohttp raised itself (no such route, wrong method, ...) as a SPEC §4 error,
    with the headers to keep (``Allow`` of a 405). SPEC §4 has no code for 405: the request
    is malformed for that path, so ``VALIDATION_ERROR``, answered with status 405."""
    headers = {k: v for k, v in exc.headers.items() if k.lower() not in _BODY_HEADERS}
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = sorted(exc.allowed_methods)
        return InvalidRequest(
            f"method {method} is not allowed on {path}; allowed: {', '.join(allowed)}",
            {"method": method, "path": path, "allowed": allowed},
        ), headers
    if isinstance(exc, web.HTTPNotFound):
        return NotFound(
            f"no endpoint {method} {path}: the REST mirror is under {API}/ (routes in the README)",
            {"method": method, "path": path},
        ), headers
    kind = _BY_STATUS.get(exc.status, InvalidRequest if exc.status < 500 else Internal)
    return kind(exc.reason, {"method": method, "path": path}), headers


class HttpSidecar:
    """An aiohttp application around the service; ``ready()`` decides ``/readyz``."""

    def __init__(
        self,
        service: Service,
        verifier: TokenVerifier,
        metrics: Metrics,
        *,
        ready: Callable[[], Awaitable[dict[str, bool]]],
        max_payload_bytes: int = 262_144,
        max_json_depth: int = 16,
        cors_origins: frozenset[str] | None = frozenset(),
        limiter: RateLimiter | None = None,
        on_refused: Callable[[Refusal], None] | None = None,
    ) -> None:
        self.cors_origins = cors_origins
        # the MQTT dispatcher's limiter: one budget per user whichever way a request comes
        self._limiter = limiter if limiter is not None and limiter.enabled else None
        # the MQTT dispatcher's dead-letter writer: REST refusals are kept the same way
        self._on_refused = on_refused
        self.max_payload_bytes = max_payload_bytes
        self.max_json_depth = max_json_depth
        self.service = service
        self.verifier = verifier
        self.metrics = metrics
        self._ready = ready
        self.app = web.Application(
            middlewares=[_head_without_length, self._count, self._cors, self._errors],
            client_max_size=max_payload_bytes + 1,
        )
        self.app.router.add_get("/healthz", self.healthz)
        self.app.router.add_get("/readyz", self.readyz)
        self.app.router.add_get("/metrics", self.render_metrics)
        r = self.app.router
        # add_get also answers HEAD
        r.add_get(f"{API}/records/check-idempotency", self.check_idempotency)
        r.add_post(f"{API}/sessions", self.open_session)
        r.add_get(f"{API}/sessions/{{session_id}}", self.get_session)
        r.add_patch(f"{API}/sessions/{{session_id}}", self.update_session)
        r.add_post(f"{API}/sessions/{{session_id}}/close", self.close_session)
        r.add_post(f"{API}/sessions/{{session_id}}/extend", self.extend_session)
        r.add_post(f"{API}/records", self.create_record)
        r.add_post(f"{API}/records/bulk", self.bulk_records)
        # GET .../records/bulk is a wrong method (405), not a record named bulk
        r.add_get(f"{API}/records/{{record_id:{RECORD_ID}}}", self.get_record)
        r.add_post(f"{API}/records/{{record_id}}/void", self.void_record)
        self._templates = [_template_pattern(res.canonical) for res in r.resources()]

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """gateway_http_requests_total by method, route template (never the raw path) and
        status."""
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            self._counted(request, exc.status)
            raise
        self._counted(request, response.status)
        return response

    def _route_label(self, request: web.Request) -> str:
        """The route template the request matched; a wrong method (405) matched none, but its
        path names one."""
        resource = request.match_info.route.resource
        if resource is not None:
            return resource.canonical
        path = request.path
        for pattern, canonical in self._templates:
            if pattern.fullmatch(path):
                return canonical
        return "unmatched"

    def _counted(self, request: web.Request, status: int) -> None:
        labels = (
            ("method", request.method if request.method in METHODS else "other"),
            ("route", self._route_label(request)),
            ("status", str(status)),
        )
        self.metrics.inc_labels("gateway_http_requests_total", labels)

    @web.middleware
    async def _cors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Browsers: answer preflights, and let allowed origins read the responses."""
        headers, preflight = cors_answer(request, self.cors_origins)
        if preflight is not None:
            return preflight
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(headers)
            raise
        response.headers.update(headers)
        return response

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        _call(request)  # from now on: its arrival time
        try:
            return await self._in_time(request, handler)
        except web.HTTPException as exc:
            if exc.status < 400:  # a redirect is no refusal
                raise
            err, headers = http_refusal(request.method, request.path, exc)
            return await self._refuse(request, err, exc.status, headers)
        except (RequestError, StoreUnavailable) as exc:
            return await self._refuse(request, exc)
        except Exception as exc:
            log.exception("HTTP %s %s failed", request.method, request.path)
            return await self._refuse(request, exc)

    async def _in_time(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The handler's answer, or 503 UNAVAILABLE when the database has not given it within
        ``ANSWER_DEADLINE_S`` of the body's arrival. A hung PostgreSQL (stopped, not refusing)
        held a call a minute or more: the work is left to finish or fail alone (a retry of a
        write is answered as a replay), while a slow upload is never cut short."""
        call = _call(request)
        task = asyncio.ensure_future(_retrying(request, handler))
        started = time.monotonic()
        while True:
            done, _ = await asyncio.wait({task}, timeout=ANSWER_DEADLINE_S)
            if done:
                return task.result()
            if call.read_at is None and request.body_exists and request.method in BODY_METHODS:
                continue  # the body is still arriving: that is the client's time
            waited = time.monotonic() - (call.read_at or started)
            if waited >= ANSWER_DEADLINE_S:
                task.add_done_callback(retrieved)
                raise StoreUnavailable(
                    f"PostgreSQL did not answer within {ANSWER_DEADLINE_S:.0f} s; "
                    "retry later (a retry with the same ids is safe)"
                )

    async def _refuse(
        self,
        request: web.Request,
        exc: BaseException,
        status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> web.Response:
        """The error answer to ``request``; a request to the REST mirror also leaves a dead
        letter, as a refused MQTT request does."""
        if self._on_refused is not None and _in_mirror(request.path):
            err = refusal_of(exc)
            with contextlib.suppress(Exception):  # the client may be gone: keep what was read
                await self._read(request)
            self._dead_letter(request, err.code, err.message)
        headers = dict(headers or {})
        response = error_response(exc, status, headers, _call(request).echo())
        if response.status == 401:
            response.headers["WWW-Authenticate"] = www_authenticate(
                request.headers.get("Authorization")
            )
        retry_after = _call(request).retry_after_s
        if isinstance(exc, RateLimited) and retry_after is not None:
            response.headers["Retry-After"] = str(retry_after)
        elif response.status == 503:  # the database is away: a client should come back soon
            response.headers["Retry-After"] = str(UNAVAILABLE_RETRY_AFTER_S)
        return response

    async def principal(
        self, request: web.Request, auth0_id: str | None = None, cost: int = 1
    ) -> Principal:
        """The caller, admitted by the rate limit (a bulk costs its records, as over MQTT)."""
        claims = self.verifier.verify(bearer_header(authorization_of(request)))
        _call(request).sub = claims.sub
        who = await self.service.principal(claims, auth0_id)
        if self._limiter is not None and not _call(request).admitted:
            wait = self._limiter.admit(who.sub, cost, time.monotonic())
            if wait > 0:
                _call(request).retry_after_s = math.ceil(wait)
                # the MQTT reply's message and details (gateway/transport/dispatch.py)
                raise RateLimited(
                    f"too many requests for user {who.sub}: retry in {wait:.1f} s "
                    f"(GATEWAY_RATE_LIMIT_PER_S = {self._limiter.rate:g})",
                    {"retryAfterS": round(wait, 3)},
                )
            _call(request).admitted = True
        return who

    def _dead_letter(
        self, request: web.Request, code: str, message: str, payload: bytes | None = None
    ) -> None:
        """Hand a refusal to the dead-letter writer (it buffers; nothing waits here)."""
        assert self._on_refused is not None
        call = _call(request)
        query = f"?{request.query_string}" if request.query_string else ""
        msg = Inbound(
            topic=f"HTTP {request.method} {request.path}{query}",
            payload=call.raw or b"",
            qos=0,
            mid=0,
            response_topic=None,
            correlation=None,
            authorization=None,  # tokens stay out of the dead-letter table
            received_at=call.at,
            epoch=0,
        )
        size = None
        if payload is None and len(msg.payload) > self.max_payload_bytes:
            size = request.content_length  # what was read stops past the limit
        try:  # keeping the refusal must never stop the answer
            self._on_refused(Refusal(msg, code, message, call.sub, payload=payload, size=size))
        except Exception:
            log.exception("a refusal of %.200r was not kept as a dead letter", msg.topic)

    async def _read(self, request: web.Request) -> bytes:
        """The body, read once and at most ``max_payload_bytes + 1`` bytes of it (what a dead
        letter keeps of an oversize body)."""
        call = _call(request)
        if call.raw is None:
            limit = self.max_payload_bytes
            raw = bytearray()
            try:
                while len(raw) <= limit:
                    try:
                        chunk = await asyncio.wait_for(
                            request.content.read(limit + 1 - len(raw)), BODY_STALL_S
                        )
                    except TimeoutError:
                        raise InvalidRequest(
                            f"the body stopped arriving ({len(raw)} bytes in, nothing for "
                            f"{BODY_STALL_S:.0f} s): send the request again"
                        ) from None
                    if not chunk:
                        break
                    raw += chunk
            finally:  # what arrived before the client went away is kept too
                call.raw = bytes(raw)
                call.read_at = time.monotonic()
        return call.raw

    async def body(
        self, request: web.Request, *, bulk: bool = False, record: bool = False
    ) -> tuple[dict[str, Any], Principal]:
        """The JSON object body (envelope fields set aside) and the caller. For a ``record``,
        its ``clientEventId`` is echoed by every answer, refusals of the token included.

        A missing or bad token is answered 401 before anything the body holds (as a client
        that refreshes its token on 401 expects), echoing what the body let us read."""
        unauthorized: RequestError | None = None
        try:
            self.verifier.verify(bearer_header(authorization_of(request)))
        except RequestError as exc:
            unauthorized = exc
        try:
            data = self._decode(request, await self._read(request))
            envelope = take_envelope(data)
            call = _call(request)
            call.request_id = envelope.request_id
            if record and isinstance(event_id := data.get("clientEventId"), str):
                call.client_event_id = event_id
            if unauthorized is not None:
                raise unauthorized
            envelope.check()
        except RequestError:
            if unauthorized is not None:
                raise unauthorized from None
            raise
        cost = 1
        if bulk and isinstance(items := data.get("records"), list):
            cost = max(1, len(items))
        return data, await self.principal(request, envelope.auth0_id, cost)

    def _decode(self, request: web.Request, raw: bytes) -> dict[str, Any]:
        if len(raw) > self.max_payload_bytes:
            limit = self.max_payload_bytes
            size = request.content_length  # what was read stops at the limit
            if size is not None and size > limit:
                raise PayloadTooLarge(
                    f"body is {size} bytes; the limit is {limit}", {"size": size, "limit": limit}
                )
            raise PayloadTooLarge(f"body over the limit of {limit} bytes", {"limit": limit})
        return decode_object(
            raw or b"{}", max_bytes=self.max_payload_bytes, max_depth=self.max_json_depth
        )

    def answer(
        self, request: web.Request, body: dict[str, Any], status: int = 200, **headers: str
    ) -> web.Response:
        """A success answer, echoing what the request asked to have echoed."""
        return json_response({**body, **_call(request).echo()}, status, **headers)

    # the REST mirror ----------------------------------------------------------------------

    async def open_session(self, request: web.Request) -> web.Response:
        data, who = await self.body(request)
        session = await self.service.open_session(
            who, validate(OpenSession, data), _arrival(request)
        )
        if session["idempotent"]:  # the owner's open session, as for a replayed record
            body = {"status": "success", "data": session}
            return self.answer(request, body, 200, **{"X-Idempotent-Replay": "true"})
        return self.answer(request, {"status": "success", "data": session}, 201)

    async def get_session(self, request: web.Request) -> web.Response:
        who = await self.principal(request)
        data = await self.service.get_session(
            who, path_id(request, "session_id"), _arrival(request)
        )
        return self.answer(request, {"status": "success", "data": data})

    async def update_session(self, request: web.Request) -> web.Response:
        data, who = await self.body(request)
        session_id = path_id(request, "session_id")
        cmd = validate(UpdateSession, data)
        same_id(cmd.sessionId, session_id, "sessionId")
        out = await self.service.update_session(who, session_id, cmd, _arrival(request))
        return self.answer(request, {"status": "success", "data": out})

    async def close_session(self, request: web.Request) -> web.Response:
        data, who = await self.body(request)
        session_id = path_id(request, "session_id")
        same_id(validate(CloseSession, data).sessionId, session_id, "sessionId")
        out = await self.service.close_session(who, session_id, _arrival(request))
        return self.answer(request, {"status": "success", "data": out})

    async def extend_session(self, request: web.Request) -> web.Response:
        data, who = await self.body(request)
        session_id = path_id(request, "session_id")
        cmd = validate(ExtendSession, data)
        same_id(cmd.sessionId, session_id, "sessionId")
        out = await self.service.extend_session(who, session_id, cmd, _arrival(request))
        return self.answer(request, {"status": "success", "data": out})

    async def create_record(self, request: web.Request) -> web.Response:
        data, who = await self.body(request, record=True)
        cmd = validate(CreateRecord, data)
        if cmd.sessionId is None:
            raise InvalidRequest(
                "sessionId is required",
                {"fields": [{"field": "sessionId", "message": "required"}]},
            )
        (outcome,) = await self.service.create_records(
            [RecordRequest(who, cmd, cmd.sessionId, _arrival(request))]
        )
        if isinstance(outcome, RequestError):
            raise outcome
        body = {"status": "success", "data": outcome.data()}
        if outcome.idempotent:
            return self.answer(request, body, 200, **{"X-Idempotent-Replay": "true"})
        return self.answer(request, body, 201)

    async def bulk_records(self, request: web.Request) -> web.Response:
        data, who = await self.body(request, bulk=True)
        bulk = await self.service.bulk_records(who, data, _arrival(request))
        body = bulk.body()
        self._refuse_items(request, bulk)
        return self.answer(request, body, 207)

    def _refuse_items(self, request: web.Request, bulk: Bulk) -> None:
        """Each failed item of a bulk leaves its own dead letter, as over MQTT."""
        if self._on_refused is None:
            return
        for code, message, raw in bulk.failures():
            self._dead_letter(request, code, message, raw)

    async def get_record(self, request: web.Request) -> web.Response:
        who = await self.principal(request)
        data = await self.service.get_record(who, path_id(request, "record_id"))
        return self.answer(request, {"status": "success", "data": data})

    async def void_record(self, request: web.Request) -> web.Response:
        data, who = await self.body(request)
        record_id = path_id(request, "record_id")
        cmd = validate(VoidRecord, data)
        same_id(cmd.recordId, record_id, "recordId")
        out = await self.service.void_record(who, record_id, cmd, _arrival(request))
        headers = {"X-Idempotent-Replay": "true"} if out["idempotent"] else {}
        return self.answer(request, {"status": "success", "data": out}, 200, **headers)

    async def healthz(self, _request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(self, _request: web.Request) -> web.Response:
        checks = await self._ready()
        ok = all(checks.values())
        return json_response(
            {"status": "ready" if ok else "not ready", "checks": checks}, 200 if ok else 503
        )

    async def render_metrics(self, _request: web.Request) -> web.Response:
        return metrics_response(self.metrics)

    async def check_idempotency(self, request: web.Request) -> web.Response:
        who = await self.principal(request)
        keys = request.query.getall("key", [])
        if len(keys) > 1:  # answering for one of them would tell the device nothing of the rest
            raise InvalidRequest(
                f"query parameter key is given {len(keys)} times; check one key per request"
            )
        key = keys[0] if keys else None
        if not key:
            raise InvalidRequest(
                "query parameter key is required, e.g. ?key=client:SESSION:WORKER:EVENT"
            )
        if "\x00" in key:  # PostgreSQL text cannot hold NUL: no key has one
            raise InvalidRequest("query parameter key must not contain NUL (%00)")
        key = validate(CheckIdempotency, {"key": key}).key  # the limits of the MQTT check
        exists = await self.service.check_key(who, key)
        return self.answer(
            request,
            {"status": "success", "data": {"key": key, "exists": exists}},
            200 if exists else 404,
        )


@web.middleware
async def _head_without_length(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A HEAD answer without Content-Length, on a connection then closed.

    HTTP lets a HEAD answer carry the Content-Length a GET would have had, and aiohttp sends
    it; but the seeds' own example of the check is ``curl -i -X HEAD``, and curl, told so,
    then waits for those bytes until the connection times out. Without the length (allowed:
    RFC 9110 §8.6 "MAY") and with the connection closed after the headers, a real HEAD client
    and that command both finish at once: 200 or 404 is all the check says."""
    response = await handler(request)
    if request.method != "HEAD" or not isinstance(response, web.Response):
        return response
    headers = CIMultiDict(response.headers)
    headers.popall("Content-Length", None)
    bare = web.Response(status=response.status, reason=response.reason, headers=headers)
    bare.force_close()
    return bare


TRANSIENT_RETRIES_S = (0.02, 0.05, 0.1, 0.2, 0.4)  # then 503 UNAVAILABLE


async def _retrying(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The handler, run again after a short wait when the database failed it transiently (a
    deadlock with a concurrent batch, a dropped connection): the MQTT pipeline retries such a
    failure with its batch, and so does a REST call before it answers 503. A call whose commit
    went through unseen is answered as a replay (or SESSION_CLOSED for a close) the second time,
    as a device's retry would be."""
    for wait in (*TRANSIENT_RETRIES_S, None):
        try:
            return await handler(request)
        except StoreUnavailable as exc:
            if wait is None:
                raise
            log.info("HTTP %s %s: %s; retrying in %.2f s", request.method, request.path, exc, wait)
            await asyncio.sleep(wait)
    raise AssertionError("unreachable")


MAX_HEADER_BYTES = 32_768
ANSWER_DEADLINE_S = 10.0  # the database's time to answer a REST call, once its body is in
# A connection that sends no (complete) request for this long is closed: idle keep-alives and
# slow-header clients (slowloris) held sockets for aiohttp's default hour, and 20,000 of them
# exhausted the process's file descriptors.
IDLE_CLOSE_S = 15.0
# A body that stops arriving for this long is refused (a slow rural upload keeps going; one
# that stalls held its buffer, up to GATEWAY_MAX_PAYLOAD_BYTES, for good).
BODY_STALL_S = 30.0
# The methods whose handlers read a body: a GET or HEAD that sends one anyway is not waited for
# (its handler never reads it, so the deadline never started: held for ever while PostgreSQL hung).
BODY_METHODS = frozenset({"POST", "PATCH", "PUT"})


def path_id(request: web.Request, name: str) -> str:
    """A session or record id from the path, held to the limits of an id in a topic (1-128
    characters, no NUL), so that no id reaches PostgreSQL that it cannot store."""
    value = request.match_info[name]
    if not valid_id(value):
        field = "sessionId" if name == "session_id" else "recordId"
        raise InvalidRequest(
            f"{field} in the path must be 1-{MAX_ID_LENGTH} characters without NUL (%00)",
            {"fields": [{"field": field, "message": "not a valid id"}]},
        )
    return value


def metrics_response(metrics: Metrics) -> web.Response:
    """GET /metrics: the Prometheus text of ``metrics``."""
    return web.Response(body=metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE})


def starting_app(
    metrics: Metrics, cors_origins: frozenset[str] | None = frozenset()
) -> web.Application:
    """The sidecar while the gateway starts (loading keys, waiting for PostgreSQL): the process
    is alive (``/healthz`` 200, so a liveness probe does not restart it for waiting), not ready
    (``/readyz`` 503), and every other call is 503 ``UNAVAILABLE`` with ``Retry-After``. A
    browser is answered with the CORS headers of the real sidecar, so that a page reads the 503
    and its Retry-After instead of an opaque CORS failure."""

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        headers, preflight = cors_answer(request, cors_origins)
        if preflight is not None:
            return preflight
        response = await handler(request)
        response.headers.update(headers)
        return response

    async def healthz(_request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        checks = {"database": False, "broker": False}
        return json_response({"status": "starting", "checks": checks}, 503)

    async def render_metrics(_request: web.Request) -> web.Response:
        return metrics_response(metrics)

    async def unavailable(_request: web.Request) -> web.Response:
        return error_response(
            Unavailable("the gateway is starting (waiting for PostgreSQL); retry later"),
            headers={"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)},
        )

    app = web.Application(middlewares=[_head_without_length, cors])
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", render_metrics)
    app.router.add_route("*", "/{anything:.*}", unavailable)
    return app


async def start_http(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner (for cleanup) and the bound port (useful with port 0)."""
    # aiohttp refuses a header over 8190 bytes with a plain-text 400 of its own; a large JWT
    # (many claims) then never reaches the JSON 401 every other bad token gets
    runner = web.AppRunner(
        app,
        access_log=None,
        keepalive_timeout=IDLE_CLOSE_S,
        max_field_size=MAX_HEADER_BYTES,
        max_line_size=MAX_HEADER_BYTES,  # a long id or key in the URL: a JSON 400 too
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    await site.start()
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    bound = sockets[0].getsockname()[1] if sockets else port
    return runner, int(bound)
