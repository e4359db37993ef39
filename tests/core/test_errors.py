"""The error tree: each refusal maps to its SPEC §4 code and HTTP status in one place."""

from __future__ import annotations

import pytest

from gateway.errors import (
    ERROR_CODES,
    ConfigError,
    Forbidden,
    GatewayError,
    IdempotencyConflict,
    Internal,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    RequestError,
    SessionAlreadyOpen,
    SessionClosed,
    SessionExpired,
    StoreUnavailable,
    Unauthorized,
    Unavailable,
    as_request_error,
    error_body,
)

# SPEC §4, in its order, with the REST mirror's status.
SPEC_CODES = [
    ("VALIDATION_ERROR", 400),
    ("UNAUTHORIZED", 401),
    ("FORBIDDEN", 403),
    ("NOT_FOUND", 404),
    ("SESSION_CLOSED", 409),
    ("SESSION_EXPIRED", 409),
    ("SESSION_ALREADY_OPEN", 409),
    ("IDEMPOTENCY_CONFLICT", 409),
    ("PAYLOAD_TOO_LARGE", 413),
    ("RATE_LIMITED", 429),
    ("UNAVAILABLE", 503),
    ("INTERNAL", 500),
]

CLASSES: list[tuple[type[RequestError], str, int]] = [
    (InvalidRequest, "VALIDATION_ERROR", 400),
    (Unauthorized, "UNAUTHORIZED", 401),
    (Forbidden, "FORBIDDEN", 403),
    (NotFound, "NOT_FOUND", 404),
    (SessionClosed, "SESSION_CLOSED", 409),
    (SessionExpired, "SESSION_EXPIRED", 409),
    (SessionAlreadyOpen, "SESSION_ALREADY_OPEN", 409),
    (IdempotencyConflict, "IDEMPOTENCY_CONFLICT", 409),
    (PayloadTooLarge, "PAYLOAD_TOO_LARGE", 413),
    (RateLimited, "RATE_LIMITED", 429),
    (Unavailable, "UNAVAILABLE", 503),
    (Internal, "INTERNAL", 500),
]


def test_error_codes_are_the_spec_list() -> None:
    """ERROR_CODES is exactly SPEC §4's list."""
    assert list(ERROR_CODES) == [code for code, _ in SPEC_CODES]


@pytest.mark.parametrize(("cls", "code", "status"), CLASSES, ids=[c for _, c, _ in CLASSES])
def test_each_class_has_its_code_and_status(
    cls: type[RequestError], code: str, status: int
) -> None:
    """Each RequestError subclass carries its SPEC code and HTTP status."""
    assert (cls.code, cls.http_status) == (code, status)
    assert (code, status) in SPEC_CODES


@pytest.mark.parametrize(("cls", "code", "status"), CLASSES, ids=[c for _, c, _ in CLASSES])
def test_error_body(cls: type[RequestError], code: str, status: int) -> None:
    """error_body gives the code, the message and the details of a refusal."""
    exc = cls("session 65.. is closed", {"sessionId": "65.."})
    assert error_body(exc) == {
        "code": code,
        "message": "session 65.. is closed",
        "details": {"sessionId": "65.."},
    }
    assert as_request_error(exc) is exc


def test_error_body_without_details() -> None:
    """Without details the error object still has SPEC §4's details, empty: clients read
    error.details without checking for it."""
    assert error_body(NotFound("record rec_1 not found")) == {
        "code": "NOT_FOUND",
        "message": "record rec_1 not found",
        "details": {},
    }
    assert error_body(RuntimeError("boom"))["details"] == {}


@pytest.mark.parametrize(
    "exc",
    [
        Exception("password=hunter2 at db.internal:5432"),
        KeyError("secret_column"),
        RuntimeError("Traceback: /srv/gateway/store/postgres.py line 42"),
        StoreUnavailable("connection to 10.0.0.5 refused"),
        ConfigError("GATEWAY_JWT_SECRET=hunter2 is too short"),
        ValueError("hunter2"),
    ],
)
def test_unexpected_errors_become_internal(exc: Exception) -> None:
    """Anything that is not a RequestError is INTERNAL and leaks none of its message."""
    body = error_body(exc)
    assert body["code"] == "INTERNAL"
    assert set(body) <= {"code", "message", "details"}
    text = repr(body)
    for leak in ("hunter2", "secret_column", "postgres.py", "10.0.0.5", "db.internal"):
        assert leak not in text
    assert isinstance(as_request_error(exc), Internal)


def test_tree() -> None:
    """Every error is a GatewayError; only refusals are RequestErrors."""
    for cls, _, _ in CLASSES:
        assert issubclass(cls, RequestError)
        assert issubclass(cls, GatewayError)
    assert not issubclass(StoreUnavailable, RequestError)
    assert not issubclass(ConfigError, RequestError)
    assert issubclass(StoreUnavailable, GatewayError)
    assert issubclass(ConfigError, GatewayError)


def test_details_default_to_an_empty_dict() -> None:
    """A RequestError without details has an empty (not shared) dict."""
    a, b = InvalidRequest("a"), InvalidRequest("b")
    a.details["x"] = 1
    assert b.details == {}
    assert str(a) == "a"
