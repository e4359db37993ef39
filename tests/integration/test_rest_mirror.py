"""The REST mirror of the seeds' endpoints: same service, HTTP statuses from the error codes."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest

from gateway.app import Gateway
from gateway.errors import StoreUnavailable
from gateway.store.postgres import PostgresStore
from tests.conftest import gateway_settings, running_gateway
from tests.support.devices import Device
from tests.support.servers import Servers
from tests.support.tenants import Tenant, make_tenant, record

API = "/api/control/production"


class Rest:
    def __init__(self, http: aiohttp.ClientSession, base: str, token: str) -> None:
        self.http = http
        self.base = base
        self.headers = {"Authorization": f"Bearer {token}"}

    async def call(
        self, method: str, path: str, body: Any = None, *, raw: bytes | None = None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        kwargs: dict[str, Any] = {"headers": self.headers}
        if raw is not None:
            kwargs["data"] = raw
        elif body is not None:
            kwargs["json"] = body
        async with self.http.request(method, f"{self.base}{API}{path}", **kwargs) as resp:
            payload = await resp.json() if resp.content_type == "application/json" else {}
            return resp.status, payload, dict(resp.headers)


@pytest.fixture
async def rest(gateway: Gateway, tenant: Tenant) -> AsyncIterator[Rest]:
    async with aiohttp.ClientSession() as http:
        yield Rest(http, f"http://127.0.0.1:{gateway.http_port}", tenant.token())


async def test_rest_session_and_record_flow(rest: Rest, tenant: Tenant) -> None:
    """POST /sessions, POST /records (twice), GET, PATCH, extend, void, bulk, close."""
    status, opened, headers = await rest.call("POST", "/sessions", tenant.open_payload())
    assert status == 201
    assert "X-Idempotent-Replay" not in headers
    sid = opened["data"]["sessionId"]
    status, again, headers = await rest.call("POST", "/sessions", tenant.open_payload())
    assert status == 200
    assert headers["X-Idempotent-Replay"] == "true"
    assert again["data"]["sessionId"] == sid
    assert again["data"]["idempotent"] is True

    rec = record(sessionId=sid, units=5, auth0Id=tenant.user)
    status, created, headers = await rest.call("POST", "/records", rec)
    assert status == 201
    assert "X-Idempotent-Replay" not in headers
    status, replay, headers = await rest.call("POST", "/records", rec)
    assert status == 200
    assert headers["X-Idempotent-Replay"] == "true"
    assert replay["data"]["recordId"] == created["data"]["recordId"]
    assert replay["data"]["idempotent"] is True

    status, body, _ = await rest.call("PATCH", f"/sessions/{sid}", {"pricePerUnit": 6})
    assert (status, body["data"]) == (200, {"updated": True})
    status, body, _ = await rest.call("POST", f"/sessions/{sid}/extend", {"maxDurationHours": 18})
    assert (status, body["data"]) == (200, {"maxDurationHours": 18})
    status, body, _ = await rest.call("GET", f"/records/{created['data']['recordId']}")
    assert body["data"]["state"] == "inserted"

    status, bulk, _ = await rest.call(
        "POST", "/records/bulk", {"records": [record(sessionId=sid), rec]}
    )
    assert status == 207
    assert bulk["summary"] == {"ok": 1, "duplicated": 1, "failed": 0}

    rid = created["data"]["recordId"]
    status, wrong, _ = await rest.call(
        "POST", f"/records/{rid}/void", {"reason": "typo", "recordId": "rec_another"}
    )
    assert (status, wrong["error"]["code"]) == (400, "VALIDATION_ERROR"), wrong
    status, void, _ = await rest.call("POST", f"/records/{rid}/void", {"reason": "typo"})
    assert status == 200
    assert void["data"]["payloadPreview"]["units"] == -5
    status, session, _ = await rest.call("GET", f"/sessions/{sid}")
    assert session["data"]["totals"]["units"] == 5
    assert session["data"]["totals"]["voided"] == 1

    status, closed, _ = await rest.call("POST", f"/sessions/{sid}/close", {})
    assert status == 200
    assert closed["data"]["status"] == "closed"
    status, late, _ = await rest.call("POST", "/records", record(sessionId=sid))
    assert status == 409
    assert late["error"]["code"] == "SESSION_CLOSED"


async def test_an_oversize_body_is_described_as_over_mqtt(rest: Rest, gateway: Gateway) -> None:
    """413's details carry the limit, and the size when the client declared it (as the MQTT
    reply does); a chunked body, whose size is unknown past the limit, gets the limit."""
    limit = gateway.settings.max_payload_bytes
    raw = b'{"a": "' + b"x" * (limit + 10) + b'"}'
    status, payload, _ = await rest.call("POST", "/records", raw=raw)
    assert status == 413
    assert payload["error"]["details"] == {"size": len(raw), "limit": limit}

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(raw), 65_536):
            yield raw[i : i + 65_536]

    async with rest.http.post(
        f"{rest.base}{API}/records", data=chunks(), headers=rest.headers
    ) as resp:
        assert resp.status == 413
        assert (await resp.json())["error"]["details"] == {"limit": limit}


@pytest.mark.parametrize(
    ("method", "path", "body", "raw", "status", "code"),
    [
        ("POST", "/sessions", None, b"not json", 400, "VALIDATION_ERROR"),
        ("POST", "/sessions", None, b"[1, 2]", 400, "VALIDATION_ERROR"),
        ("POST", "/sessions", {"projectId": "proj_nope"}, None, 404, "NOT_FOUND"),
        ("GET", "/sessions/000000000000000000000000", None, None, 404, "NOT_FOUND"),
        ("POST", "/records", {"workerId": "x"}, None, 400, "VALIDATION_ERROR"),
        (
            "POST",
            "/records",
            None,
            b"{" + b'"a":' * 1 + b"1" + b" " * 300_000 + b"}",
            413,
            "PAYLOAD_TOO_LARGE",
        ),
        ("GET", "/records/rec_nope", None, None, 404, "NOT_FOUND"),
    ],
)
async def test_rest_errors_map_to_statuses(
    rest: Rest, method: str, path: str, body: Any, raw: bytes | None, status: int, code: str
) -> None:
    """Each error code has its HTTP status (SPEC §4)."""
    got, payload, _ = await rest.call(method, path, body, raw=raw)
    assert got == status, payload
    assert payload["error"]["code"] == code


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/sessions/%00", None),
        ("PATCH", "/sessions/a%00b", {"notes": "x"}),
        ("POST", "/sessions/%00/close", {}),
        ("GET", "/records/%00", None),
        ("POST", "/records/%00/void", {"reason": "x"}),
        ("GET", "/records/check-idempotency?key=%00abc", None),
        ("HEAD", "/records/check-idempotency?key=%00abc", None),
        ("GET", "/records/check-idempotency?key=" + "k" * 1025, None),
        ("GET", "/sessions/" + "s" * 129, None),
        ("GET", "/sessions/" + "s" * 20_000, None),  # past aiohttp's 8190-byte request line
        ("GET", "/records/check-idempotency?key=" + "k" * 20_000, None),
    ],
)
async def test_an_id_no_record_can_have_is_a_400_not_a_500(
    rest: Rest, method: str, path: str, body: Any
) -> None:
    """A NUL (%00) in a path id or key reached PostgreSQL (which cannot store one) and came back
    as 500 INTERNAL, "retry later"; a key over 1024 characters was a 404 (400 over MQTT)."""
    got, payload, _ = await rest.call(method, path, body)
    assert got == 400, payload
    if method != "HEAD":
        assert payload["error"]["code"] == "VALIDATION_ERROR"


async def test_rest_needs_a_valid_token(gateway: Gateway, tenant: Tenant) -> None:
    """No token, a forged token: 401; the payload's auth0Id must match the token: 403."""
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{gateway.http_port}{API}"
        async with http.post(f"{base}/sessions", json=tenant.open_payload()) as resp:
            assert resp.status == 401
            refused = await resp.json()
            assert refused["error"]["code"] == "UNAUTHORIZED"
            assert "Authorization: Bearer" in refused["error"]["message"]  # says what to send
        forged = Rest(http, f"http://127.0.0.1:{gateway.http_port}", tenant.token() + "x")
        assert (await forged.call("POST", "/sessions", tenant.open_payload()))[0] == 401
        # the token is judged before the body: a client that refreshes its token on 401 must
        # see 401, not the 400 or 413 of a body it will send again with the new token
        for raw in (b"not json", b"[1]", orjson.dumps({"units": "x"}), b" " * 300_000):
            for who in (forged, Rest(http, f"http://127.0.0.1:{gateway.http_port}", "")):
                status, refused, _ = await who.call("POST", "/records", raw=raw)
                assert (status, refused["error"]["code"]) == (401, "UNAUTHORIZED"), raw[:20]
        good = Rest(http, f"http://127.0.0.1:{gateway.http_port}", tenant.token())
        status, body, _ = await good.call(
            "POST", "/sessions", tenant.open_payload(auth0Id="someone_else")
        )
        assert status == 403
        assert body["error"]["code"] == "FORBIDDEN"


# --- browsers (CORS) ------------------------------------------------------------------------------


async def test_browser_preflight_and_request(gateway: Gateway, tenant: Tenant) -> None:
    """A page on another origin: the preflight for Authorization is granted, the answer is
    readable, and so is X-Idempotent-Replay (default GATEWAY_CORS_ORIGINS=*)."""
    page = "https://dashboard.farm.example"
    url = f"http://127.0.0.1:{gateway.http_port}{API}/records/check-idempotency?key=nope"
    async with aiohttp.ClientSession() as http:
        preflight = {
            "Origin": page,
            "Access-Control-Request-Method": "HEAD",
            "Access-Control-Request-Headers": "authorization,x-request-id,bad header",
        }
        async with http.options(url, headers=preflight) as resp:
            assert resp.status == 204
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            assert "HEAD" in resp.headers["Access-Control-Allow-Methods"]
            allowed = [h.strip() for h in resp.headers["Access-Control-Allow-Headers"].split(",")]
            # ours, and a page's own well-formed extra header (not a malformed name)
            assert allowed == ["Authorization", "Content-Type", "x-request-id"]
        headers = {"Origin": page, "Authorization": f"Bearer {tenant.token()}"}
        async with http.head(url, headers=headers) as resp:
            assert resp.status == 404
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            assert "X-Idempotent-Replay" in resp.headers["Access-Control-Expose-Headers"]
        async with http.get(f"{url}&x", headers={"Origin": page}) as resp:  # errors too
            assert resp.status == 401
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            # a page can read why (the challenge), and when to retry a 429
            exposed = resp.headers["Access-Control-Expose-Headers"]
            assert {"WWW-Authenticate", "Retry-After"} <= set(exposed.split(", "))
        async with http.get(url.replace("check-idempotency", "nothing/here")) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers  # no Origin, no CORS


async def test_cors_origins_list(servers: Servers, database: str, tenant: Tenant) -> None:
    """GATEWAY_CORS_ORIGINS as a list: listed pages may read answers, others may not."""
    # its own topics: a second gateway on the shared ones would keep (persistent session) a
    # share of the other tests' requests after it stops
    settings = gateway_settings(
        servers,
        database,
        cors_origins="http://localhost:3000",
        topic_prefix=f"hb-cors-{secrets.token_hex(3)}/v2",
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{gw.http_port}{API}/sessions/nope"
        for origin, allowed in (("http://localhost:3000", True), ("https://evil.example", False)):
            preflight = {"Origin": origin, "Access-Control-Request-Method": "GET"}
            async with http.options(url, headers=preflight) as resp:
                assert resp.status == 204
                got = resp.headers.get("Access-Control-Allow-Origin")
                assert got == (origin if allowed else None)
                assert ("Access-Control-Allow-Methods" in resp.headers) is allowed
            headers = {"Origin": origin, "Authorization": f"Bearer {tenant.token()}"}
            async with http.get(url, headers=headers) as resp:
                assert resp.status == 404
                assert resp.headers.get("Access-Control-Allow-Origin") == (
                    origin if allowed else None
                )
                assert resp.headers["Vary"] == "Origin"


# --- routing refusals -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/", "/api/control/production/nope", f"{API}/sessions/abc/nope", "/healthz/x"]
)
async def test_unknown_routes_are_json_not_found(gateway: Gateway, path: str) -> None:
    """A path no endpoint serves: 404 NOT_FOUND in the SPEC §4 envelope, CORS headers kept."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"http://127.0.0.1:{gateway.http_port}{path}", headers={"Origin": "https://a.example"}
        ) as resp,
    ):
        assert resp.status == 404
        assert resp.content_type == "application/json"
        assert resp.headers["Access-Control-Allow-Origin"] == "*"
        body = await resp.json()
    assert body["status"] == "error"
    assert body["error"]["code"] == "NOT_FOUND"
    assert body["error"]["details"] == {"method": "GET", "path": path}
    assert path in body["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/sessions/65a1b2c3d4e5f6a7b8c9d0e1", "GET, HEAD, PATCH"),
        ("PUT", "/sessions/65a1b2c3d4e5f6a7b8c9d0e1", "GET, HEAD, PATCH"),
        ("GET", "/sessions/65a1b2c3d4e5f6a7b8c9d0e1/close", "POST"),
        ("POST", "/records/check-idempotency", "GET, HEAD"),
        ("GET", "/records/bulk", "POST"),
        ("GET", "/sessions", "POST"),
    ],
)
async def test_wrong_methods_are_json_405(
    gateway: Gateway, tenant: Tenant, method: str, path: str, allowed: str
) -> None:
    """A known path with a method it does not serve: 405 with Allow, VALIDATION_ERROR saying
    which methods are; GET .../records/bulk is one of these, not a record named "bulk"."""
    headers = {"Origin": "https://a.example", "Authorization": f"Bearer {tenant.token()}"}
    url = f"http://127.0.0.1:{gateway.http_port}{API}{path}"
    async with aiohttp.ClientSession() as http:
        async with http.request(method, url, headers=headers, json={}) as resp:
            assert resp.status == 405
            assert resp.content_type == "application/json"
            assert resp.headers["Allow"].replace(" ", "") == allowed.replace(" ", "")
            assert resp.headers["Access-Control-Allow-Origin"] == "*"
            body = await resp.json()
        async with http.head(f"http://127.0.0.1:{gateway.http_port}{API}/records/bulk") as resp:
            assert resp.status == 405
            assert resp.headers["Allow"] == "POST"
    assert body["status"] == "error"
    assert body["error"]["code"] == "VALIDATION_ERROR"
    assert body["error"]["details"]["allowed"] == allowed.split(", ")
    assert f"method {method} is not allowed" in body["error"]["message"]
    assert allowed in body["error"]["message"]


# --- authentication challenges --------------------------------------------------------------------


def _expired(tenant: Tenant) -> str:
    return f"Bearer {tenant.token(ttl_s=-3600)}"


@pytest.mark.parametrize(
    ("authorization", "challenge", "says"),
    [
        (lambda t: None, "Bearer", "Authorization: Bearer <jwt>"),
        (lambda t: "Basic dXNlcjpwYXNz", "Bearer", "Authorization: Bearer <jwt>"),
        (lambda t: t.token(), "Bearer", "Authorization: Bearer <jwt>"),  # no scheme at all
        (lambda t: f"Token {t.token()}", "Bearer", "Authorization: Bearer <jwt>"),
        (lambda t: "Bearer ", "Bearer", "Authorization: Bearer <jwt>"),
        (lambda t: "Bearer not-a-jwt", 'Bearer error="invalid_token"', ""),
        (lambda t: f"Bearer {t.token()}x", 'Bearer error="invalid_token"', ""),
        (_expired, 'Bearer error="invalid_token"', "expired"),
    ],
    ids=["none", "basic", "bare-jwt", "other-scheme", "empty", "garbage", "forged", "expired"],
)
async def test_rest_401_is_a_bearer_challenge(
    gateway: Gateway, tenant: Tenant, authorization: Any, challenge: str, says: str
) -> None:
    """401 carries WWW-Authenticate (RFC 6750), invalid_token when a bearer token was refused;
    a header without the Bearer scheme is refused, even around a valid token."""
    header = authorization(tenant)
    headers = {} if header is None else {"Authorization": header}
    url = f"http://127.0.0.1:{gateway.http_port}{API}/sessions"
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, json=tenant.open_payload(), headers=headers) as resp,
    ):
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == challenge
        body = await resp.json()
    assert body["error"]["code"] == "UNAUTHORIZED"
    assert says in body["error"]["message"]


async def test_rest_bearer_scheme_is_case_insensitive(gateway: Gateway, tenant: Tenant) -> None:
    """`bearer` and `BEARER` are the Bearer scheme; a 403 is no challenge."""
    url = f"http://127.0.0.1:{gateway.http_port}{API}/sessions/000000000000000000000000"
    async with aiohttp.ClientSession() as http:
        for scheme in ("bearer", "BEARER"):
            headers = {"Authorization": f"{scheme} {tenant.token()}"}
            async with http.get(url, headers=headers) as resp:
                assert resp.status == 404, scheme
        ghost = {"Authorization": f"Bearer {tenant.token(sub='ghost_user')}"}
        async with http.get(url, headers=ghost) as resp:
            assert resp.status == 403
            assert "WWW-Authenticate" not in resp.headers


# --- echoes ---------------------------------------------------------------------------------------


async def test_rest_echoes_request_id_and_client_event_id(
    rest: Rest, tenant: Tenant, device: Device
) -> None:
    """Like MQTT replies (SPEC §2), REST answers echo requestId and, for records, clientEventId,
    on success and on error; nothing else in the shapes changes."""
    status, opened, _ = await rest.call("POST", "/sessions", tenant.open_payload(requestId="r-1"))
    assert status == 201
    assert opened["requestId"] == "r-1"
    assert "clientEventId" not in opened
    sid = opened["data"]["sessionId"]

    rec = record(sessionId=sid, requestId=42)
    status, created, _ = await rest.call("POST", "/records", rec)
    assert status == 201
    assert set(created) == {"status", "data", "requestId", "clientEventId"}
    assert (created["requestId"], created["clientEventId"]) == (42, rec["clientEventId"])
    status, replay, _ = await rest.call("POST", "/records", {**rec, "requestId": "again"})
    assert status == 200
    assert (replay["requestId"], replay["clientEventId"]) == ("again", rec["clientEventId"])

    status, body, _ = await rest.call("PATCH", f"/sessions/{sid}", {"notes": "n", "requestId": "p"})
    assert (status, body) == (
        200,
        {"status": "success", "data": {"updated": True}, "requestId": "p"},
    )
    status, bulk, _ = await rest.call(
        "POST", "/records/bulk", {"records": [record(sessionId=sid)], "requestId": "b"}
    )
    assert status == 207
    assert set(bulk) == {"status", "results", "summary", "requestId"}
    assert bulk["requestId"] == "b"

    # errors echo them too, exactly as the MQTT reply to the same payload does
    bad = record(sessionId=sid, requestId="r-bad")
    del bad["worker_name"]
    status, refused, _ = await rest.call("POST", "/records", bad)
    assert status == 400
    assert (refused["requestId"], refused["clientEventId"]) == ("r-bad", bad["clientEventId"])
    assert refused == await device.request(f"sessions/{sid}/records", bad)
    # refused for who sent it (auth0Id not the token's user, no token): still echoed
    other = record(sessionId=sid, requestId="r-who", auth0Id="someone-else")
    status, refused, _ = await rest.call("POST", "/records", other)
    assert (status, refused["error"]["code"]) == (403, "FORBIDDEN")
    assert (refused["requestId"], refused["clientEventId"]) == ("r-who", other["clientEventId"])
    assert refused == await device.request(f"sessions/{sid}/records", other)
    anonymous = Rest(rest.http, rest.base, "")
    anonymous.headers = {}
    del other["auth0Id"]
    status, refused, _ = await anonymous.call("POST", "/records", other)
    assert (status, refused["error"]["code"]) == (401, "UNAUTHORIZED")
    assert (refused["requestId"], refused["clientEventId"]) == ("r-who", other["clientEventId"])
    status, refused, _ = await rest.call("POST", "/sessions", {"requestId": "r-env", "auth0Id": 5})
    assert (status, refused["requestId"]) == (400, "r-env")
    status, refused, _ = await rest.call("POST", f"/sessions/{sid}/extend", {"requestId": "r-x"})
    assert (status, refused["requestId"]) == (400, "r-x")
    assert "clientEventId" not in refused
    status, refused, _ = await rest.call("POST", "/records", raw=b"{not json")
    assert status == 400
    assert "requestId" not in refused


# --- rate limit -----------------------------------------------------------------------------------


async def fetch_one(database: str, select: str, session_id: str) -> Any:
    conn = await asyncpg.connect(database)
    try:
        return await conn.fetchrow(f"{select} WHERE session_id = $1", session_id)
    finally:
        await conn.close()


async def records_of(database: str, session_id: str) -> int:
    row = await fetch_one(database, "SELECT count(*) FROM production_records", session_id)
    return int(row[0])


async def test_rest_shares_the_users_mqtt_rate_limit(
    servers: Servers, database: str, store: PostgresStore
) -> None:
    """One token bucket per user for MQTT and REST: past it, REST answers 429 RATE_LIMITED
    with MQTT's details and Retry-After, changes nothing; health and metrics stay open."""
    prefix = f"hb-rest-rate-{secrets.token_hex(3)}/v2"
    tenant = await make_tenant(store)
    # a token every 1000 s: nothing refills while the test runs
    settings = gateway_settings(
        servers, database, topic_prefix=prefix, rate_limit_per_s=0.001, rate_limit_burst=6
    )
    async with (
        running_gateway(settings) as gw,
        aiohttp.ClientSession() as http,
        Device(servers.mqtt_host, servers.ws_port, prefix, token=tenant.token()) as device,
    ):
        base = f"http://127.0.0.1:{gw.http_port}"
        rest = Rest(http, base, tenant.token())
        opened = await device.request("sessions/open", tenant.open_payload())  # 6 -> 5
        sid = opened["data"]["sessionId"]
        bulk = {"records": [record(sessionId=sid) for _ in range(3)]}
        assert (await rest.call("POST", "/records/bulk", bulk))[0] == 207  # 5 -> 2
        assert (await rest.call("POST", "/records", record(sessionId=sid)))[0] == 201  # 2 -> 1
        mqtt_ok = await device.request(f"sessions/{sid}/records", record())  # 1 -> 0
        assert mqtt_ok["status"] == "success", mqtt_ok

        limited = record(sessionId=sid)
        status, body, headers = await rest.call("POST", "/records", limited)
        assert status == 429
        assert body["error"]["code"] == "RATE_LIMITED"
        assert body["error"]["details"]["retryAfterS"] > 0
        assert "GATEWAY_RATE_LIMIT_PER_S" in body["error"]["message"]
        assert int(headers["Retry-After"]) >= body["error"]["details"]["retryAfterS"]
        mqtt_refused = await device.request(f"sessions/{sid}/records", limited)
        assert mqtt_refused["error"]["code"] == "RATE_LIMITED"
        assert set(mqtt_refused["error"]["details"]) == set(body["error"]["details"])
        key = f"client:{sid}:{limited['workerId']}:{limited['clientEventId']}"
        for method, path in (
            ("GET", f"/sessions/{sid}"),
            ("PATCH", f"/sessions/{sid}"),
            ("POST", f"/sessions/{sid}/close"),
            ("HEAD", f"/records/check-idempotency?key={key}"),
            ("GET", f"/records/check-idempotency?key={key}"),
        ):
            status, _, headers = await rest.call(method, path, {"notes": "x"})
            assert status == 429, (method, path)
            assert int(headers["Retry-After"]) >= 1
        for path in ("/healthz", "/readyz", "/metrics"):
            async with http.get(f"{base}{path}") as resp:
                assert resp.status == 200, path
        # another user has a budget of their own
        colleague = Rest(http, base, tenant.token(sub=tenant.other_user))
        assert (await colleague.call("GET", f"/records/check-idempotency?key={key}"))[0] == 404
        # nothing the refused requests asked for happened
        assert await records_of(database, sid) == 5
    # and each refusal is kept, as MQTT's are
    row = await dead_letter(
        database, f"HTTP POST {API}/records", "RATE_LIMITED", limited["clientEventId"].encode()
    )
    assert row["auth0_id"] == tenant.user
    check = f"HTTP HEAD {API}/records/check-idempotency?key={key}"
    row = await dead_letter(database, check, "RATE_LIMITED", b"")
    assert bytes(row["payload"]) == b'{"notes": "x"}'  # what it sent, though a check reads none
    row = await fetch_one(database, "SELECT status, notes FROM production_sessions", sid)
    assert (row["status"], row["notes"]) == ("open", None)


# --- dead letters ---------------------------------------------------------------------------------


async def dead_letter(database: str, topic: str, reason: str, marker: bytes) -> dict[str, Any]:
    """The dead letter of ``topic`` with ``reason`` whose kept payload contains ``marker``;
    written in the background, so this polls (up to 15 s)."""
    for _ in range(150):
        row = await fetch_dead_letter(database, topic, reason, marker)
        if row is not None:
            return row
        await asyncio.sleep(0.1)
    raise AssertionError(f"no dead letter ({reason}) for {topic} holding {marker!r}")


async def fetch_dead_letter(
    database: str, topic: str, reason: str, marker: bytes
) -> dict[str, Any] | None:
    conn = await asyncpg.connect(database)
    try:
        row = await conn.fetchrow(
            """SELECT topic, reason, message, auth0_id, payload, payload_size, truncated
               FROM dead_letters
               WHERE topic = $1 AND reason = $2 AND position($3::bytea in payload) > 0""",
            topic,
            reason,
            marker,
        )
    finally:
        await conn.close()
    return None if row is None else dict(row)


async def refused_counts(http: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """gateway_refused_total by code, from GET /metrics."""
    async with http.get(f"{base}/metrics") as resp:
        text = await resp.text()
    found = re.findall(r'^gateway_refused_total\{code="([A-Z_]+)"\} (\S+)$', text, re.M)
    return {code: float(value) for code, value in found}


async def test_rest_refusals_leave_dead_letters(
    gateway: Gateway, database: str, tenant: Tenant, session_id: str
) -> None:
    """Every refused REST request is kept in dead_letters (topic "HTTP <method> <path>",
    reason, payload capped, the token's user) and counted in gateway_refused_total."""
    base = f"http://127.0.0.1:{gateway.http_port}"
    mark = secrets.token_hex(8)
    good = {"Authorization": f"Bearer {tenant.token()}"}
    ghost = {"Authorization": f"Bearer {tenant.token(sub=f'ghost_{mark}')}"}
    body = f'{{"n": "{mark}"}}'.encode()
    # method, path, headers, body, status, reason, the user kept (once the token is verified)
    cases: list[tuple[str, str, dict[str, str], bytes, int, str, str | None]] = [
        ("POST", "/sessions", good, b"{" + body, 400, "VALIDATION_ERROR", None),
        ("POST", "/records", good, body, 400, "VALIDATION_ERROR", tenant.user),
        ("POST", "/sessions", {}, body, 401, "UNAUTHORIZED", None),
        ("POST", "/sessions", ghost, body, 403, "FORBIDDEN", f"ghost_{mark}"),
        ("PUT", f"/sessions/{session_id}", good, body, 405, "VALIDATION_ERROR", None),
        ("POST", "/records", good, body + b" " * 300_000, 413, "PAYLOAD_TOO_LARGE", None),
    ]
    async with aiohttp.ClientSession() as http:
        before = await refused_counts(http, base)
        for method, path, headers, raw, status, _, _ in cases:
            async with http.request(method, f"{base}{API}{path}", data=raw, headers=headers) as r:
                assert r.status == status, (method, path, await r.text())
        after = await refused_counts(http, base)
    for code in ("UNAUTHORIZED", "FORBIDDEN", "PAYLOAD_TOO_LARGE"):
        assert after[code] == before.get(code, 0) + 1, code
    assert after["VALIDATION_ERROR"] == before.get("VALIDATION_ERROR", 0) + 3
    for method, path, _, raw, _, reason, who in cases:
        row = await dead_letter(database, f"HTTP {method} {API}{path}", reason, mark.encode())
        assert row["auth0_id"] == who, (method, path)
        assert bytes(row["payload"]) == raw[: len(row["payload"])]
        # the whole body's size, also when only the limit's worth of it was read
        assert row["payload_size"] == len(raw), (method, path)
        assert row["truncated"] is (reason == "PAYLOAD_TOO_LARGE")


async def test_rest_bulk_failed_items_and_limits_leave_dead_letters(
    gateway: Gateway, database: str, tenant: Tenant, session_id: str
) -> None:
    """A bulk's failed items are kept one by one (the item as payload), as over MQTT; answers
    that are no refusal (a check that finds nothing) and paths outside the mirror are not."""
    base = f"http://127.0.0.1:{gateway.http_port}"
    good = {"Authorization": f"Bearer {tenant.token()}"}
    mark = secrets.token_hex(8)
    bad_item = record(sessionId=session_id, event=f"evt_{mark}", units=-1)
    bulk = {"records": [record(sessionId=session_id), bad_item]}
    async with aiohttp.ClientSession() as http:
        # first the requests that must leave nothing; the writer keeps arrival order
        async with http.get(f"{base}/nowhere/{mark}", headers=good) as r:
            assert r.status == 404
        check = f"{base}{API}/records/check-idempotency?key=nothing-{mark}"
        async with http.get(check, headers=good) as r:
            assert r.status == 404
        async with http.post(f"{base}{API}/records/bulk", json=bulk, headers=good) as r:
            assert r.status == 207
            assert (await r.json())["summary"] == {"ok": 1, "duplicated": 0, "failed": 1}
    row = await dead_letter(
        database, f"HTTP POST {API}/records/bulk", "VALIDATION_ERROR", mark.encode()
    )
    assert orjson.loads(bytes(row["payload"])) == bad_item
    assert row["auth0_id"] == tenant.user
    conn = await asyncpg.connect(database)
    try:
        others = await conn.fetch(
            """SELECT topic FROM dead_letters
               WHERE topic LIKE $1 OR position($2::bytea in payload) > 0""",
            f"%{mark}%",
            mark.encode(),
        )
    finally:
        await conn.close()
    assert [r["topic"] for r in others] == [f"HTTP POST {API}/records/bulk"]


async def test_a_transient_database_failure_is_retried_not_answered_503(
    rest: Rest, gateway: Gateway, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deadlock with a concurrent batch (seen under a race audit: a 503 in 40 ms with the
    database up) fails one attempt: the call is run again and answered, stored once. A database
    that stays away is still answered 503 UNAVAILABLE, after the short retries."""
    status, opened, _ = await rest.call("POST", "/sessions", tenant.open_payload())
    sid = opened["data"]["sessionId"]
    store = gateway.store
    assert store is not None
    real = store.insert_records
    failures = [StoreUnavailable("PostgreSQL unavailable: deadlock detected")]

    async def deadlocked_once(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "insert_records", deadlocked_once)
    rec = record(sessionId=sid)
    status, created, _ = await rest.call("POST", "/records", rec)
    assert (status, created["data"]["idempotent"]) == (201, False), created
    assert failures == []  # the first attempt did fail

    async def away(*_args: Any, **_kwargs: Any) -> Any:
        raise StoreUnavailable("PostgreSQL unavailable: connection refused")

    monkeypatch.setattr(store, "insert_records", away)
    status, refused, headers = await rest.call("POST", "/records", record(sessionId=sid))
    assert (status, refused["error"]["code"]) == (503, "UNAVAILABLE"), refused
    assert headers["Retry-After"]
    monkeypatch.setattr(store, "insert_records", real)
    status, session, _ = await rest.call("GET", f"/sessions/{sid}")
    assert session["data"]["totals"]["records"] == 1


async def test_a_lone_surrogate_next_to_a_huge_number_is_a_400(rest: Rest, tenant: Tenant) -> None:
    """It was a plain-text 500, kept nowhere (the standard library's parser, used for numbers
    beyond a double, takes a lone surrogate no UTF-8 writer can write back)."""
    _, opened, _ = await rest.call("POST", "/sessions", tenant.open_payload())
    sid = opened["data"]["sessionId"]
    for method, path in (
        ("POST", "/records"),
        ("POST", "/records/bulk"),
        ("POST", "/sessions"),
        ("PATCH", f"/sessions/{sid}"),
        ("POST", f"/sessions/{sid}/close"),
        ("POST", f"/sessions/{sid}/extend"),
    ):
        status, body, _ = await rest.call(method, path, raw=b'{"x":1e400,"sessionId":"\\ud800"}')
        assert status == 400, (path, status, body)
        assert body["error"]["code"] == "VALIDATION_ERROR"
