"""The error tree. Each class carries its SPEC §4 code and the REST mirror's HTTP status.

    GatewayError
    ├── RequestError            a request the gateway refuses; answered with an error reply
    │   ├── InvalidRequest       VALIDATION_ERROR      400
    │   ├── Unauthorized         UNAUTHORIZED          401
    │   ├── Forbidden            FORBIDDEN             403
    │   ├── NotFound             NOT_FOUND             404
    │   ├── SessionClosed        SESSION_CLOSED        409
    │   ├── SessionExpired       SESSION_EXPIRED       409
    │   ├── SessionAlreadyOpen   SESSION_ALREADY_OPEN  409
    │   ├── IdempotencyConflict  IDEMPOTENCY_CONFLICT  409
    │   ├── PayloadTooLarge      PAYLOAD_TOO_LARGE     413
    │   ├── RateLimited          RATE_LIMITED          429
    │   ├── Unavailable          UNAVAILABLE           503 (REST mirror only)
    │   └── Internal             INTERNAL              500
    ├── StoreUnavailable        the database cannot be reached; retry, never answer
    └── ConfigError             bad settings at startup

``error_body`` is the one place that turns an exception into the wire's error object; anything
that is not a ``RequestError`` becomes ``INTERNAL`` without leaking internals.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration cannot work; the message says which variable and how to fix it."""


class StoreUnavailable(GatewayError):
    """PostgreSQL is unreachable or refused a transient operation; the caller should retry."""


class RequestError(GatewayError):
    """A refusal that is answered to the device with a SPEC error code."""

    code: ClassVar[str] = "INTERNAL"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}


class InvalidRequest(RequestError):
    code = "VALIDATION_ERROR"
    http_status = 400


class Unauthorized(RequestError):
    code = "UNAUTHORIZED"
    http_status = 401


class Forbidden(RequestError):
    code = "FORBIDDEN"
    http_status = 403


class NotFound(RequestError):
    code = "NOT_FOUND"
    http_status = 404


class SessionClosed(RequestError):
    code = "SESSION_CLOSED"
    http_status = 409


class SessionExpired(RequestError):
    code = "SESSION_EXPIRED"
    http_status = 409


class SessionAlreadyOpen(RequestError):
    code = "SESSION_ALREADY_OPEN"
    http_status = 409


class IdempotencyConflict(RequestError):
    code = "IDEMPOTENCY_CONFLICT"
    http_status = 409


class PayloadTooLarge(RequestError):
    code = "PAYLOAD_TOO_LARGE"
    http_status = 413


class RateLimited(RequestError):
    code = "RATE_LIMITED"
    http_status = 429


class Unavailable(RequestError):
    code = "UNAVAILABLE"
    http_status = 503


class Internal(RequestError):
    code = "INTERNAL"
    http_status = 500


ERROR_CODES: tuple[str, ...] = tuple(
    cls.code
    for cls in (
        InvalidRequest,
        Unauthorized,
        Forbidden,
        NotFound,
        SessionClosed,
        SessionExpired,
        SessionAlreadyOpen,
        IdempotencyConflict,
        PayloadTooLarge,
        RateLimited,
        Unavailable,
        Internal,
    )
)


def as_request_error(exc: BaseException) -> RequestError:
    """The request error to answer for ``exc``: itself, or a generic INTERNAL."""
    if isinstance(exc, RequestError):
        return exc
    return Internal("internal error: retry later; a retry with the same ids is safe")


def error_body(exc: BaseException) -> dict[str, Any]:
    """The ``error`` object of an error reply: ``details`` always there (SPEC §4's envelope),
    empty when the code and message say it all."""
    err = as_request_error(exc)
    return {"code": err.code, "message": err.message, "details": err.details or {}}
