"""Structured logs: one JSON object per line (GATEWAY_LOG_FORMAT=text for plain text)."""

from __future__ import annotations

import asyncio
import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "at": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


def fatal(message: str) -> None:
    """The last word of a command that fails: a JSON log line when logs are JSON (a shipper
    reading stderr keeps it), else ``error: message``."""
    if any(isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers):
        line = {
            "at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "level": "error",
            "logger": "gateway",
            "msg": message,
        }
        print(orjson.dumps(line).decode(), file=sys.stderr)
    else:
        print(f"error: {message}", file=sys.stderr)


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # paho logs every packet at DEBUG through aiomqtt's "mqtt" logger
    logging.getLogger("mqtt").setLevel(max(logging.WARNING, root.level))
    # asyncpg's pool warns with a full traceback every few seconds while PostgreSQL is away;
    # the gateway says so itself in one line: keep asyncpg's line, not the traceback
    logging.getLogger("asyncpg.pool").addFilter(_without_traceback)
    # a malformed HTTP request (headers over aiohttp's limits, garbage) is the client's fault:
    # one warning line, not an ERROR with a traceback anyone can make the sidecar write
    logging.getLogger("aiohttp.server").addFilter(_client_fault_in_one_line)


def _client_fault_in_one_line(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and type(exc).__module__ == "aiohttp.http_exceptions":
        cause = f"{type(exc).__name__}: {exc}"[:300]
        if record.args:  # msg is %-formatted with them later
            cause = cause.replace("%", "%%")
        record.msg = f"{record.msg}: {cause}"
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info = None
        record.exc_text = None
    return True


def _without_traceback(record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
        if record.exc_info and record.exc_info[1] is not None:
            cause = repr(record.exc_info[1])
            if record.args:  # msg is %-formatted with them later
                cause = cause.replace("%", "%%")
            record.msg = f"{record.msg} ({cause})"
        record.exc_info = None
        record.exc_text = None
    return True


def retrieved(fut: asyncio.Future[Any]) -> None:
    """A done callback for work nobody awaits: reads its outcome, so that a failure is not
    logged by asyncio as "exception was never retrieved"."""
    if not fut.cancelled():
        fut.exception()
