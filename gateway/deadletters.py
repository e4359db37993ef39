"""Dead letters: every refused request, written in the background so good traffic never waits."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import deque

from gateway.errors import StoreUnavailable
from gateway.metrics import Metrics
from gateway.store.postgres import DeadLetter, PostgresStore
from gateway.transport.dispatch import Refusal

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 0.5
FLUSH_AT = 500
MAX_BUFFERED = 50_000
WARN_EVERY_S = 30.0


class DeadLetterWriter:
    """Buffers refusals and inserts them in batches; bounded, so an outage cannot eat memory."""

    def __init__(self, store: PostgresStore, metrics: Metrics, *, payload_cap: int) -> None:
        self._store = store
        self._metrics = metrics
        self._cap = payload_cap
        self._buffer: deque[DeadLetter] = deque()
        self._wake = asyncio.Event()
        self._stopping = False
        self._warned_at = -WARN_EVERY_S

    def __call__(self, refusal: Refusal) -> None:
        m = refusal.msg
        payload = refusal.payload if refusal.payload is not None else m.payload
        size = refusal.size if refusal.size is not None else len(payload)
        payload = redact_tokens(payload)
        if len(self._buffer) >= MAX_BUFFERED:
            self._buffer.popleft()
            self._metrics.inc("gateway_dead_letters_dropped_total")
        self._buffer.append(
            DeadLetter(
                received_at=m.received_at,
                # an HTTP refusal's "topic" is its URL, which may carry a token (?access_token=)
                topic=_text(capped_topic(_redacted(m.topic))),
                reason=refusal.code,
                message=_text(_redacted(refusal.message[:1000])),
                auth0_id=_text(refusal.auth0_id) if refusal.auth0_id else None,
                payload=payload[: self._cap],
                payload_size=size,
                truncated=size > self._cap,
            )
        )
        self._metrics.inc_labelled("gateway_refused_total", "code", refusal.code)
        if len(self._buffer) >= FLUSH_AT:
            self._wake.set()

    async def run(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FLUSH_EVERY_S)
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        while self._buffer:
            batch = [self._buffer[i] for i in range(min(len(self._buffer), 1000))]
            try:
                await self._store.add_dead_letters(batch)
            except StoreUnavailable as exc:
                now = time.monotonic()
                if now - self._warned_at >= WARN_EVERY_S:  # once in a while, not every flush
                    self._warned_at = now
                    log.warning("%d dead letters wait for the database: %s", len(self._buffer), exc)
                return
            except Exception:
                await self._one_by_one(batch)
            for _ in batch:
                self._buffer.popleft()
            self._metrics.inc("gateway_dead_letters_total", len(batch))

    async def _one_by_one(self, batch: list[DeadLetter]) -> None:
        """A batch the database refused: keep every row it accepts, log the others."""
        for row in batch:
            try:
                await self._store.add_dead_letters([row])
            except StoreUnavailable:
                log.warning("dead letters wait for the database")
                return
            except Exception:
                log.exception("dead letter for %s could not be written", row.topic)
                self._metrics.inc("gateway_dead_letters_dropped_total")

    async def close(self) -> None:
        self._stopping = True
        self._wake.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.flush(), 5)


# A JWT (header.claims.signature, base64url): what a 3.1.1 device puts in "authorization".
# Its header is a JSON object, so it starts "ey" whatever follows the "{" ('eyJ' for '{"',
# 'eyA' for '{ ', ...).
# Its dots may be JSON escapes (\u002e), which the gateway reads as dots all the same.
_DOT = rb"(?:\.|\\u002[eE])"
_JWT = re.compile(
    rb"(ey[A-Za-z0-9_-]{8,}" + _DOT + rb"[A-Za-z0-9_-]{2,}" + _DOT + rb")[A-Za-z0-9_-]+"
)
# Whatever else follows a Bearer scheme (a token in another form): all of it; not the words
# of our own messages ("expected 'Bearer <jwt>'", "must use the Bearer scheme: send ...").
_BEARER = re.compile(
    rb"([Bb][Ee][Aa][Rr][Ee][Rr]\s+)(?!ey[A-Za-z0-9_-]*"
    + _DOT
    + rb"|<jwt>|scheme[:\s])[^\s\"'\\&]+"
)
MAX_TOPIC = 1024


def redact_tokens(payload: bytes) -> bytes:
    """``payload`` with every JWT's signature replaced: whoever reads the dead letters can
    still see whose token it was (the claims), but cannot replay it; anything else sent as
    a bearer token is replaced whole."""
    return _BEARER.sub(rb"\1<redacted>", _JWT.sub(rb"\1<redacted>", payload))


def capped_topic(topic: str) -> str:
    """A topic as kept: a very long one (refused for that) is cut, its length said."""
    if len(topic) <= MAX_TOPIC:
        return topic
    return f"{topic[:MAX_TOPIC]}... ({len(topic)} characters)"


def _text(value: str) -> str:
    """Text PostgreSQL can store: NUL shown as \\u0000, a lone surrogate (no UTF-8 holds
    one) as "?"."""
    if not value.isascii():
        value = value.encode(errors="replace").decode()
    return value.replace("\x00", "\\u0000") if "\x00" in value else value


def _redacted(text: str) -> str:
    """``text`` with tokens redacted; never fails, whatever characters it holds."""
    return redact_tokens(text.encode(errors="replace")).decode(errors="replace")
