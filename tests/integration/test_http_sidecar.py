"""The HTTP sidecar (SPEC §6): health, readiness, metrics and the HEAD idempotency check."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from gateway.app import Gateway
from gateway.devstack import free_port
from gateway.store.postgres import PostgresStore
from gateway.transport import http as http_module
from tests.conftest import gateway_settings, running_gateway
from tests.support.devices import Device
from tests.support.extra_helpers import fetch
from tests.support.servers import Servers
from tests.support.tenants import Tenant, make_tenant, record

CHECK = "/api/control/production/records/check-idempotency"
TIMEOUT = aiohttp.ClientTimeout(total=15)


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[tuple[aiohttp.ClientSession, str]]:
    assert gateway.http_port
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        yield session, f"http://127.0.0.1:{gateway.http_port}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def check_url(base: str, key: str) -> URL:
    """The check URL with the key percent-encoded as in the seeds' curl example (%3A)."""
    return URL(f"{base}{CHECK}?key={quote(key, safe='')}", encoded=True)


async def stored_record(device: Device, session_id: str, **fields: Any) -> dict[str, Any]:
    rec = record(**fields)
    reply = await device.request(f"sessions/{session_id}/records", rec)
    assert reply["status"] == "success", reply
    return rec


async def test_healthz(http: tuple[aiohttp.ClientSession, str]) -> None:
    """GET /healthz answers 200 while the process is alive."""
    session, base = http
    async with session.get(f"{base}/healthz") as resp:
        assert resp.status == 200


async def test_readyz_reports_database_and_broker(http: tuple[aiohttp.ClientSession, str]) -> None:
    """GET /readyz answers 200 with checks database and broker true."""
    session, base = http
    async with session.get(f"{base}/readyz") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["checks"]["database"] is True
    assert body["checks"]["broker"] is True


async def test_check_idempotency_finds_a_stored_client_key(
    http: tuple[aiohttp.ClientSession, str], device: Device, tenant: Tenant, session_id: str
) -> None:
    """HEAD and GET with client:{sessionId}:{workerId}:{clientEventId}: 404 before, 200 after."""
    session, base = http
    rec = record()
    key = f"client:{session_id}:{rec['workerId']}:{rec['clientEventId']}"
    auth = bearer(tenant.token())
    async with session.head(check_url(base, key), headers=auth) as resp:
        assert resp.status == 404
    reply = await device.request(f"sessions/{session_id}/records", rec)
    assert reply["status"] == "success", reply
    async with session.head(check_url(base, key), headers=auth) as resp:
        assert resp.status == 200
        assert await resp.read() == b""
    async with session.get(check_url(base, key), headers=auth) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["data"] == {"key": key, "exists": True}
    # the key unencoded, as a person types it into curl, is the same key
    async with session.head(f"{base}{CHECK}", params={"key": key}, headers=auth) as resp:
        assert resp.status == 200


async def test_the_seeds_curl_x_head_example_finishes_at_once(
    gateway: Gateway, device: Device, tenant: Tenant, session_id: str
) -> None:
    """The seeds show the check as ``curl -i -X HEAD ...``: curl then reads as many body bytes
    as Content-Length says. The answer carries none and closes the connection, so that command
    ends at once with the status (here by hand: read to the end of the connection)."""
    rec = await stored_record(device, session_id)
    known = f"client:{session_id}:{rec['workerId']}:{rec['clientEventId']}"
    for key, status in ((known, 200), (f"{known}-never", 404), (None, 401)):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.http_port)
        auth = "" if key is None else f"Authorization: Bearer {tenant.token()}\r\n"
        target = f"{CHECK}?key={quote(key or known, safe='')}"
        writer.write(f"HEAD {target} HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode())
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(), timeout=15)  # to EOF
        finally:
            writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0].startswith(f"HTTP/1.1 {status} "), lines
        assert not [ln for ln in lines if ln.lower().startswith("content-length:")], lines
        assert body == b"", body
        assert any(ln.lower().startswith("content-type: application/json") for ln in lines)


async def test_check_idempotency_unknown_key_is_404(
    http: tuple[aiohttp.ClientSession, str], device: Device, tenant: Tenant, session_id: str
) -> None:
    """Keys that name nothing stored answer 404, to HEAD and GET."""
    session, base = http
    rec = await stored_record(device, session_id)
    auth = bearer(tenant.token())
    unknown = [
        f"client:{session_id}:{rec['workerId']}:evt_never_sent",
        f"client:{session_id}:OTHER:{rec['clientEventId']}",
        f"client:nosuchsession:{rec['workerId']}:{rec['clientEventId']}",
        f"client:{session_id}:{rec['workerId']}",
        rec["clientEventId"],
        "mobile-app-key-never-used",
    ]
    for key in unknown:
        async with session.head(check_url(base, key), headers=auth) as resp:
            assert resp.status == 404, key
        async with session.get(check_url(base, key), headers=auth) as resp:
            assert resp.status == 404, key


async def test_check_idempotency_only_sees_the_callers_company(
    http: tuple[aiohttp.ClientSession, str],
    device: Device,
    tenant: Tenant,
    session_id: str,
    store: PostgresStore,
) -> None:
    """Another company's keys (client keys and idempotencyKeys) are 404 for the caller."""
    session, base = http
    idem = f"mobile-app-key-{secrets.token_hex(6)}"
    rec = await stored_record(device, session_id, idempotencyKey=idem)
    key = f"client:{session_id}:{rec['workerId']}:{rec['clientEventId']}"
    other = await make_tenant(store)
    for k in (key, idem):
        async with session.head(check_url(base, k), headers=bearer(tenant.token())) as resp:
            assert resp.status == 200, k
        async with session.head(check_url(base, k), headers=bearer(other.token())) as resp:
            assert resp.status == 404, k
    # a colleague of the same company sees them
    colleague = bearer(tenant.token(sub=tenant.other_user))
    async with session.head(check_url(base, key), headers=colleague) as resp:
        assert resp.status == 200


async def test_check_idempotency_finds_idempotency_keys(
    http: tuple[aiohttp.ClientSession, str], device: Device, tenant: Tenant, session_id: str
) -> None:
    """Any other string is taken as an idempotencyKey: 200 once a record stored it."""
    session, base = http
    idem = f"mobile-app-key-timestamp-{secrets.token_hex(6)}"
    auth = bearer(tenant.token())
    async with session.head(check_url(base, idem), headers=auth) as resp:
        assert resp.status == 404
    await stored_record(device, session_id, idempotencyKey=idem)
    async with session.head(check_url(base, idem), headers=auth) as resp:
        assert resp.status == 200
    async with session.get(check_url(base, idem), headers=auth) as resp:
        assert resp.status == 200
        assert (await resp.json())["data"]["exists"] is True


async def test_check_idempotency_needs_a_valid_token(
    http: tuple[aiohttp.ClientSession, str], tenant: Tenant, session_id: str
) -> None:
    """No Authorization: 401; a bad or expired token: 401; a token of an unknown user: 403."""
    session, base = http
    key = f"client:{session_id}:JS0315:evt_x"
    async with session.head(check_url(base, key)) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    async with session.get(check_url(base, key)) as resp:
        assert resp.status == 401
        body = await resp.json()
        assert body["error"]["code"] == "UNAUTHORIZED"
    for headers in (
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": tenant.token()},  # a JWT without the Bearer scheme
        bearer(tenant.token(ttl_s=-3600)),
    ):
        for method in ("HEAD", "GET"):
            async with session.request(method, check_url(base, key), headers=headers) as resp:
                assert resp.status == 401, headers
                assert resp.headers["WWW-Authenticate"].startswith("Bearer"), headers
    async with session.get(
        check_url(base, key), headers=bearer(tenant.token(sub="ghost_user"))
    ) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "FORBIDDEN"


async def test_check_idempotency_needs_a_key(
    http: tuple[aiohttp.ClientSession, str], tenant: Tenant
) -> None:
    """Without ?key= (or with an empty one, or with two): 400 VALIDATION_ERROR."""
    session, base = http
    for url in (f"{base}{CHECK}", f"{base}{CHECK}?key=", f"{base}{CHECK}?key=a&key=b"):
        async with session.get(url, headers=bearer(tenant.token())) as resp:
            assert resp.status == 400, url
            body = await resp.json()
            assert body["error"]["code"] == "VALIDATION_ERROR"
        async with session.head(url, headers=bearer(tenant.token())) as resp:
            assert resp.status == 400, url


async def test_check_idempotency_over_mqtt(device: Device, tenant: Tenant, session_id: str) -> None:
    """The MQTT check replies data {key, exists} for the caller's company."""
    rec = await stored_record(device, session_id)
    key = f"client:{session_id}:{rec['workerId']}:{rec['clientEventId']}"
    found = await device.request("records/check-idempotency", {"key": key})
    assert found == {"status": "success", "data": {"key": key, "exists": True}}
    missing = await device.request("records/check-idempotency", {"key": key + "x"})
    assert missing["data"] == {"key": key + "x", "exists": False}


_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r"(?:\{(?P<labels>[a-zA-Z_][a-zA-Z0-9_]*=\"[^\"]*\"(?:,[a-zA-Z_][a-zA-Z0-9_]*=\"[^\"]*\")*,?)\})?"
    r" (?P<value>[-+]?(?:[0-9.]+(?:[eE][-+]?[0-9]+)?|NaN|\+Inf|-Inf))(?: [0-9]+)?$"
)
_TYPE = re.compile(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) (counter|gauge|histogram|summary|untyped)$")
_HELP = re.compile(r"^# HELP ([a-zA-Z_:][a-zA-Z0-9_:]*) (\S.*)$")


async def test_metrics_is_prometheus_text(
    http: tuple[aiohttp.ClientSession, str], device: Device, session_id: str
) -> None:
    """GET /metrics is Prometheus text 0.0.4: HELP then TYPE once per family, well-formed
    samples."""
    await stored_record(device, session_id)
    session, base = http
    async with session.get(f"{base}/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = await resp.text()
    assert text.endswith("\n")
    typed: dict[str, str] = {}
    helped: set[str] = set()
    samples: dict[str, list[tuple[str, float]]] = {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            if line.startswith("# TYPE"):
                m = _TYPE.match(line)
                assert m, line
                assert m.group(1) not in typed, f"TYPE {m.group(1)} given twice"
                assert m.group(1) in helped, f"TYPE {m.group(1)} without HELP before it"
                typed[m.group(1)] = m.group(2)
            else:
                m = _HELP.match(line)
                assert m, line
                assert m.group(1) not in helped, f"HELP {m.group(1)} given twice"
                helped.add(m.group(1))
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        name = m.group("name")
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or family in typed, f"{name} has no TYPE line before it"
        samples.setdefault(name, []).append((m.group("labels") or "", float(m.group("value"))))
    assert samples, text
    assert helped == set(typed)
    for family, kind in typed.items():
        if kind != "histogram":
            continue
        buckets = samples.get(f"{family}_bucket", [])
        assert buckets, family
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), f"{family} buckets are not cumulative"
        assert buckets[-1][0] == 'le="+Inf"'
        assert samples[f"{family}_count"][0][1] == buckets[-1][1]
        assert f"{family}_sum" in samples


async def metric_samples(session: aiohttp.ClientSession, base: str) -> dict[str, float]:
    """Every sample of GET /metrics, keyed by its name and labels as printed."""
    async with session.get(f"{base}/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


async def test_metrics_count_http_requests_by_route(
    http: tuple[aiohttp.ClientSession, str], tenant: Tenant
) -> None:
    """gateway_http_requests_total counts answers by method, route template and status;
    raw paths (ids, unknown paths) never become label values."""
    session, base = http
    name = "gateway_http_requests_total"
    route = "/api/control/production/sessions/{session_id}"
    by_id = f'{name}{{method="GET",route="{route}",status="404"}}'
    unmatched = f'{name}{{method="GET",route="unmatched",status="404"}}'
    odd = f'{name}{{method="other",route="/api/control/production/sessions",status="405"}}'
    wrong = f'{name}{{method="DELETE",route="{route}",status="405"}}'
    before = await metric_samples(session, base)
    secret_id = f"sess{secrets.token_hex(8)}"
    async with session.get(
        f"{base}/api/control/production/sessions/{secret_id}", headers=bearer(tenant.token())
    ) as resp:
        assert resp.status == 404
    async with session.get(f"{base}/nowhere-{secret_id}") as resp:
        assert resp.status == 404
    async with session.request("PROPFIND", f"{base}/api/control/production/sessions") as resp:
        assert resp.status == 405
    async with session.delete(f"{base}/api/control/production/sessions/{secret_id}") as resp:
        assert resp.status == 405  # a wrong method counts under its route, not "unmatched"
    after = await metric_samples(session, base)
    assert after[by_id] == before.get(by_id, 0) + 1
    assert after[unmatched] == before.get(unmatched, 0) + 1
    assert after[odd] == before.get(odd, 0) + 1
    assert after[wrong] == before.get(wrong, 0) + 1
    assert after[f'{name}{{method="GET",route="/metrics",status="200"}}'] >= 1
    assert not [key for key in after if secret_id in key or "PROPFIND" in key]


async def test_sidecar_of_a_second_gateway(servers: Servers, database: str) -> None:
    """A gateway on a fixed free port serves /healthz there (GATEWAY_HTTP_PORT is honoured)."""
    port = free_port()
    settings = gateway_settings(
        servers, database, http_port=port, topic_prefix=f"hb-http-{secrets.token_hex(3)}/v2"
    )
    async with running_gateway(settings) as gw, aiohttp.ClientSession(timeout=TIMEOUT) as s:
        assert gw.http_port == port
        async with s.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
        async with s.get(f"http://127.0.0.1:{port}/readyz") as resp:
            assert resp.status == 200


async def test_rest_replay_of_an_mqtt_record_is_idempotent(
    http: tuple[aiohttp.ClientSession, str], device: Device, tenant: Tenant, session_id: str
) -> None:
    """The same record over MQTT then over REST: one record, the REST reply says replay."""
    session, base = http
    rec = record(units=5)
    first = await device.request(f"sessions/{session_id}/records", rec)
    assert first["status"] == "success", first
    body = {**rec, "sessionId": session_id, "auth0Id": tenant.user}
    async with session.post(
        f"{base}/api/control/production/records", json=body, headers=bearer(tenant.token())
    ) as resp:
        assert resp.status == 200
        assert resp.headers.get("X-Idempotent-Replay") == "true"
        replay = await resp.json()
    assert replay["data"]["idempotent"] is True
    assert replay["data"]["recordId"] == first["data"]["recordId"]
    conflicting = {**body, "units": 6}
    async with session.post(
        f"{base}/api/control/production/records", json=conflicting, headers=bearer(tenant.token())
    ) as resp:
        assert resp.status == 409
        assert "X-Idempotent-Replay" not in resp.headers
        assert (await resp.json())["error"]["code"] == "IDEMPOTENCY_CONFLICT"


async def test_a_token_in_the_query_string_is_not_kept_in_the_dead_letters(
    http: tuple[aiohttp.ClientSession, str], tenant: Tenant, database: str
) -> None:
    """?access_token=<jwt> is no way to authenticate (401), and the refusal's row keeps the URL
    with the token's signature redacted: whoever reads dead letters cannot replay it."""
    session, base = http
    token = tenant.token()
    marker = secrets.token_hex(4)
    url = (
        f"{base}/api/control/production/records/check-idempotency?key={marker}&access_token={token}"
    )
    async with session.get(url) as resp:
        assert resp.status == 401
    signature = token.rsplit(".", 1)[1]
    for _ in range(100):
        rows = await fetch(
            database, "SELECT topic FROM dead_letters WHERE topic LIKE $1", f"%{marker}%"
        )
        if rows:
            break
        await asyncio.sleep(0.05)
    assert len(rows) == 1
    assert signature not in rows[0]["topic"]
    assert "<redacted>" in rows[0]["topic"]


async def test_a_large_token_gets_the_json_401(http: tuple[aiohttp.ClientSession, str]) -> None:
    """A 20 KB bearer token is answered like any bad token (JSON 401 UNAUTHORIZED), not with
    aiohttp's plain-text 400 for a header over 8190 bytes."""
    session, base = http
    url = f"{base}/api/control/production/records/check-idempotency?key=k"
    async with session.get(url, headers={"Authorization": "Bearer " + "a" * 20_000}) as resp:
        assert resp.status == 401
        body = await resp.json()
    assert body["error"]["code"] == "UNAUTHORIZED"


async def test_two_different_authorization_headers_are_refused(
    http: tuple[aiohttp.ClientSession, str], tenant: Tenant, session_id: str
) -> None:
    """Two Authorization headers naming different users: 401, not the first one picked (a proxy
    adding its own header could otherwise make a request act as someone else)."""
    session, base = http
    key = f"client:{session_id}:JS0315:evt_x"
    mine, colleague = tenant.token(), tenant.token(sub=tenant.other_user)
    for first, second in ((mine, colleague), (colleague, mine)):
        headers = CIMultiDict([("Authorization", f"Bearer {first}")])
        headers.add("Authorization", f"Bearer {second}")
        async with session.get(check_url(base, key), headers=headers) as resp:
            assert resp.status == 401
            body = await resp.json()
        assert "two different Authorization headers" in body["error"]["message"]
    same = CIMultiDict([("Authorization", f"Bearer {mine}"), ("Authorization", f"Bearer {mine}")])
    async with session.get(check_url(base, key), headers=same) as resp:
        assert resp.status == 404  # the token is fine; the key is not stored


async def test_a_connection_that_sends_no_request_is_closed(
    servers: Servers, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiohttp keeps a connection that sends nothing (or headers a byte at a time) for an
    hour by default: 20,000 of them took every file descriptor and /healthz stopped
    answering. Closed after IDLE_CLOSE_S now (made short here)."""
    monkeypatch.setattr(http_module, "IDLE_CLOSE_S", 0.5)
    # a prefix of its own: its persistent broker session must not take a share of the
    # requests the session's gateway (conftest) serves after it has stopped
    settings = gateway_settings(
        servers, database, topic_prefix=f"hb-idle-{secrets.token_hex(3)}/v2"
    )
    async with running_gateway(settings) as gw:
        assert gw.http_port is not None
        idle = await asyncio.open_connection("127.0.0.1", gw.http_port)
        slow = await asyncio.open_connection("127.0.0.1", gw.http_port)
        slow[1].write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finished
        for reader, writer in (idle, slow):
            assert await asyncio.wait_for(reader.read(), 30) == b""  # closed by the server
            writer.close()
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{gw.http_port}/healthz") as resp,
        ):
            assert resp.status == 200  # a real request still goes through


async def test_a_body_that_stops_arriving_is_refused(
    servers: Servers, database: str, tenant: Tenant, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A body announced at 100 bytes that stalls after 10 held its connection and buffer for
    good (1,000 of them: +770 MB). Refused once nothing arrives for BODY_STALL_S (short here);
    a slow upload that keeps coming is not cut short."""
    monkeypatch.setattr(http_module, "BODY_STALL_S", 0.5)
    # a prefix of its own: its persistent broker session must not take a share of the
    # requests the session's gateway (conftest) serves after it has stopped
    settings = gateway_settings(
        servers, database, topic_prefix=f"hb-idle-{secrets.token_hex(3)}/v2"
    )
    async with running_gateway(settings) as gw:
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.http_port)
        writer.write(
            b"POST /api/control/production/records HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + tenant.token().encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n" + b'{"units": 1,'
        )
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 400"), head
        writer.close()
