"""Edges of the HTTP sidecar and of the MQTT rate limit, in process over stand-in services: a
GET or HEAD with a body during a database hang, a HEAD while the gateway starts, and a batch
retried after a database outage."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, cast

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.core.auth import Claims, KeyRing, TokenVerifier, mint_token
from gateway.core.ratelimit import RateLimiter
from gateway.core.rules import Principal
from gateway.core.topics import Topics
from gateway.errors import StoreUnavailable
from gateway.metrics import Metrics
from gateway.service import Service
from gateway.transport import http as http_mod
from gateway.transport.dispatch import Dispatcher, Reply
from gateway.transport.http import API, HttpSidecar
from gateway.transport.mqtt import Inbound

SECRET = "k" * 48
SUB = "user_123456789"


class HungService:
    """A service whose database never answers (a stopped, not refusing, PostgreSQL)."""

    async def principal(self, claims: Claims, auth0_id: str | None = None) -> Principal:
        return Principal(claims.sub, "comp_1")

    async def get_session(self, *_a: Any, **_k: Any) -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError

    async def check_key(self, *_a: Any, **_k: Any) -> bool:
        await asyncio.Event().wait()
        raise AssertionError


async def _ready() -> dict[str, bool]:
    return {"database": True, "broker": True}


def _sidecar(service: Any) -> HttpSidecar:
    verifier = TokenVerifier(KeyRing(secret=SECRET))
    return HttpSidecar(service, verifier, Metrics(), ready=_ready)


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {mint_token(SECRET, SUB, ttl_s=3600)}"}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_a_get_with_a_body_still_gets_503_when_the_database_hangs(
    monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """A GET or HEAD sent with a (harmless) body against a hung PostgreSQL is answered 503 like
    one without: the deadline waited for a body its handler never reads, for ever."""
    monkeypatch.setattr(http_mod, "ANSWER_DEADLINE_S", 0.05)
    async with TestClient(TestServer(_sidecar(HungService()).app)) as client:
        # control: without a body the deadline answers 503
        resp = await asyncio.wait_for(
            client.request(method, f"{API}/records/check-idempotency?key=k", headers=_auth()), 5
        )
        assert resp.status == 503
        try:
            resp = await asyncio.wait_for(
                client.request(
                    method,
                    f"{API}/records/check-idempotency?key=k",
                    headers=_auth(),
                    data=b'{"x": 1}',
                ),
                5,
            )
        except TimeoutError:
            pytest.fail(f"{method} with a body never answered though the database hangs")
        assert resp.status == 503


async def test_head_check_while_starting_finishes_at_once() -> None:
    """While the gateway starts, a HEAD answer carries no Content-Length and closes its
    connection, as the running sidecar's does: with the length of a body never sent, the seeds'
    ``curl -i -X HEAD`` check hung for the whole start-up."""
    server = TestServer(http_mod.starting_app(Metrics()))
    await server.start_server()
    try:
        reader, writer = await asyncio.open_connection(server.host, server.port)
        writer.write(
            f"HEAD {API}/records/check-idempotency?key=k HTTP/1.1\r\nHost: x\r\n\r\n".encode()
        )
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(), timeout=5)  # to EOF, as curl reads
        except TimeoutError:
            answer = None
        finally:
            writer.close()
        assert answer is not None, "connection kept open after a HEAD answer with Content-Length"
        head = answer.partition(b"\r\n\r\n")[0].decode().split("\r\n")
        assert head[0].startswith("HTTP/1.1 503 "), head
        assert not [ln for ln in head if ln.lower().startswith("content-length:")], head
    finally:
        await server.close()


# --- MQTT: a batch retried after a database outage is not charged to the rate limit again ---


class FlakyService:
    """Knows every user; the database drops the first check, answers the next."""

    def __init__(self) -> None:
        self.checks = 0

    async def principals(self, asks: Any) -> list[Principal]:
        return [Principal(claims.sub, "c1") for claims, _ in asks]

    async def check_key(self, who: Principal, key: str) -> bool:
        self.checks += 1
        if self.checks == 1:
            raise StoreUnavailable("connection lost")
        return True


def test_a_retried_mqtt_batch_is_not_charged_twice_by_the_rate_limit() -> None:
    """The pipeline retries a batch after StoreUnavailable with the same messages: a request
    admitted the first time keeps its admission (Inbound.admission), as a REST call keeps its
    own (_Call.admitted). Charged again, it was answered RATE_LIMITED within its limit."""
    service = FlakyService()
    limiter = RateLimiter(rate_per_s=0.001, burst=1)  # one request, then a long wait
    d = Dispatcher(
        cast(Service, service),
        TokenVerifier(KeyRing(secret=SECRET)),
        Topics("hydrobit/v2"),
        max_payload_bytes=65_536,
        max_json_depth=16,
        limiter=limiter,
    )
    token = mint_token(SECRET, SUB, ttl_s=3600)
    msg = Inbound(
        "hydrobit/v2/records/check-idempotency",
        b'{"key": "k1"}',
        1,
        1,
        None,
        None,
        f"Bearer {token}",
        datetime.now(UTC),
        0,
    )

    async def twice() -> list[Reply]:
        with pytest.raises(StoreUnavailable):
            await d.handle([msg])  # the database went away: nothing answered
        return await d.handle([msg])  # the pipeline's retry of the same batch

    (reply,) = asyncio.run(twice())
    body = orjson.loads(reply.payload)
    assert body["status"] == "success", body
