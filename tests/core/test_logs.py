"""Log set-up: asyncpg's pool warnings keep their line, not their traceback."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import orjson
import pytest

from gateway.logs import fatal, setup_logging


@pytest.fixture
def logging_as_set_up() -> Iterator[None]:
    """setup_logging() for one test; the root logger and asyncpg's filters restored after."""
    root = logging.getLogger()
    pool = logging.getLogger("asyncpg.pool")
    saved = (root.handlers[:], root.level, pool.filters[:])
    yield
    root.handlers[:], level, pool.filters[:] = saved
    root.setLevel(level)


def test_asyncpg_pool_warnings_carry_no_traceback(
    logging_as_set_up: None, capsys: pytest.CaptureFixture[str]
) -> None:
    setup_logging("INFO", "text")
    try:
        raise ConnectionRefusedError(111, "Connect call failed 50% of the time")
    except ConnectionRefusedError:
        logging.getLogger("asyncpg.pool").warning(
            "Failed to restore the pool connection floor", exc_info=True
        )
    err = capsys.readouterr().err
    assert "Failed to restore the pool connection floor" in err
    assert "Connect call failed 50% of the time" in err
    assert "Traceback" not in err


@pytest.mark.usefixtures("logging_as_set_up")
def test_a_fatal_error_is_written_as_the_logs_are(capsys: pytest.CaptureFixture[str]) -> None:
    """With JSON logs, the error a command ends on is a JSON line too (a shipper keeps it);
    with text logs, a plain ``error: ...`` line."""
    setup_logging("INFO", "json")
    fatal("no JWT key configured: set GATEWAY_JWT_SECRET")
    line = orjson.loads(capsys.readouterr().err)
    assert (line["level"], line["msg"]) == (
        "error",
        "no JWT key configured: set GATEWAY_JWT_SECRET",
    )
    setup_logging("INFO", "text")
    fatal("no JWT key configured")
    assert capsys.readouterr().err == "error: no JWT key configured\n"


@pytest.mark.usefixtures("logging_as_set_up")
def test_a_malformed_http_request_is_one_warning_line(caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp logs a client's oversize headers as an ERROR with a traceback; anyone could
    make the sidecar write those: one WARNING line instead."""
    from aiohttp.http_exceptions import LineTooLong

    setup_logging("INFO", "text")
    logger = logging.getLogger("aiohttp.server")
    try:
        raise LineTooLong(b"x" * 10, "32768", "100000")
    except LineTooLong as exc:
        record = logger.makeRecord(
            logger.name,
            logging.ERROR,
            __file__,
            1,
            "Error handling request from %s",
            ("127.0.0.1",),
            (type(exc), exc, exc.__traceback__),
        )
    assert logger.filter(record)
    assert record.levelno == logging.WARNING
    assert record.exc_info is None
    assert record.getMessage().startswith("Error handling request from 127.0.0.1: LineTooLong")
