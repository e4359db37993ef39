"""Refusals (SPEC §3-§5): every bad request gets its error reply on the right topic, nothing is
stored, the refusal lands in ``dead_letters``, and the gateway keeps serving."""

from __future__ import annotations

import asyncio
import base64
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import orjson
import pytest

from gateway.app import Gateway
from gateway.core.auth import mint_token
from gateway.store.postgres import PostgresStore
from tests.conftest import PREFIX, gateway_settings, running_gateway
from tests.support.devices import Device, LegacyDevice
from tests.support.extra_broker import props
from tests.support.extra_helpers import (
    RawClient,
    execute,
    fetch,
    iso_ms,
    next_message,
    stored_for,
    wait_dead_letter,
)
from tests.support.servers import Servers
from tests.support.tenants import Tenant, make_tenant, record

OTHER_SECRET = "another-secret-0123456789abcdef0123456789abcdef"
DEAD_LETTER_CAP = 4096  # GATEWAY_DEAD_LETTER_PAYLOAD_CAP's default
SMALL_PREFIX = "hb-small/v2"


@pytest.fixture
async def other_tenant(store: PostgresStore) -> Tenant:
    """A second company, with its own user, project and sectors."""
    return await make_tenant(store)


def assert_error(reply: dict[str, Any], code: str) -> dict[str, Any]:
    assert reply["status"] == "error", reply
    assert "data" not in reply, reply
    error: dict[str, Any] = reply["error"]
    assert error["code"] == code, reply
    assert isinstance(error["message"], str)
    assert error["message"], reply
    return error


def field_names(error: dict[str, Any]) -> list[str]:
    fields = error.get("details", {}).get("fields", [])
    return [str(f["field"]) for f in fields]


async def assert_still_serving(
    device: Device, session_id: str, database: str, tenant: Tenant
) -> None:
    """A valid record right after a refusal is stored and answered."""
    before = await stored_for(database, [tenant.company_id])
    ok = await device.request(f"sessions/{session_id}/records", record())
    assert ok["status"] == "success", ok
    assert ok["data"]["idempotent"] is False
    after = await stored_for(database, [tenant.company_id])
    assert after.records == before.records + 1


async def refuse(
    device: Device,
    database: str,
    suffix: str,
    payload: dict[str, Any] | bytes,
    code: str,
    *,
    companies: Sequence[str],
    token: str | bool | None = True,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send a request that must be refused with ``code``: check the reply, that nothing was
    stored for ``companies`` and that the refusal was dead-lettered. Returns (reply, error)."""
    raw = payload if isinstance(payload, bytes) else orjson.dumps(payload)
    before = await stored_for(database, companies)
    reply = await device.request(suffix, raw, token=token)
    error = assert_error(reply, code)
    assert await stored_for(database, companies) == before, "a refused request stored something"
    letter = await wait_dead_letter(database, device.topic(suffix), code, payload=raw)
    assert bytes(letter["payload"]) == raw[:DEAD_LETTER_CAP]
    assert letter["payload_size"] == len(raw)
    assert letter["truncated"] is (len(raw) > DEAD_LETTER_CAP)
    return reply, error


def nested(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {"leaf": 1}
    for _ in range(levels - 1):
        node = {"a": node}
    return node


# --- payloads that are not a JSON object ------------------------------------------------------

NOT_AN_OBJECT = [
    pytest.param(b"\xff\xfe not json", id="garbage-bytes"),
    pytest.param(
        b'{"workerId": "JS\xff\xfe", "worker_name": "x", "units": 1, "clientEventId": "e1",'
        b' "recordedAtUtc": "2025-10-19T14:30:00.000Z"}',
        id="invalid-utf8",
    ),
    pytest.param(b"", id="empty"),
    pytest.param(b"[1, 2, 3]", id="array"),
    pytest.param(b'"just a string"', id="string"),
    pytest.param(b"42", id="number"),
    pytest.param(b"null", id="null"),
    pytest.param(b"true", id="boolean"),
    pytest.param(b'{"workerId": "JS0315", ', id="truncated-json"),
    pytest.param(orjson.dumps({**record(), "meta": nested(40)}), id="nested-40-levels"),
    pytest.param(b"[" * 5000 + b"]" * 5000, id="nested-5000-arrays"),
    pytest.param(b"x" * 10_000, id="10k-garbage"),
]


@pytest.mark.parametrize("raw", NOT_AN_OBJECT)
async def test_payload_that_is_not_a_json_object_is_refused(
    device: Device, tenant: Tenant, session_id: str, database: str, raw: bytes
) -> None:
    """A payload that is not a (shallow enough) UTF-8 JSON object gets VALIDATION_ERROR."""
    suffix = f"sessions/{session_id}/records"
    await refuse(device, database, suffix, raw, "VALIDATION_ERROR", companies=[tenant.company_id])
    await assert_still_serving(device, session_id, database, tenant)


async def test_a_record_after_a_byte_order_mark_is_stored(device: Device, session_id: str) -> None:
    """A UTF-8 BOM before the JSON (RFC 8259 §8.1 lets a parser ignore it) is not an error."""
    body = b"\xef\xbb\xbf" + orjson.dumps(record(event="evt_bom_1"))
    reply = await device.request(f"sessions/{session_id}/records", body)
    assert reply["status"] == "success", reply
    assert reply["data"]["idempotent"] is False
    again = await device.request(f"sessions/{session_id}/records", body)
    assert again["data"] == {**reply["data"], "idempotent": True}


async def test_a_number_beyond_a_double_is_refused_by_field_with_the_request_id(
    device: Device, session_id: str
) -> None:
    """ "units": 1e400 is valid JSON a double cannot hold: the reply names the field (not
    "invalid JSON") and echoes the requestId, on the hot path and on an update."""
    body = orjson.dumps(record(event="evt_big_1")).replace(b'"units":5', b'"units":1e400')
    body = body[:-1] + b',"requestId":"r-big"}'
    reply = await device.request(f"sessions/{session_id}/records", body)
    assert reply["error"]["code"] == "VALIDATION_ERROR", reply
    assert [f["field"] for f in reply["error"]["details"]["fields"]] == ["units"]
    assert (reply["requestId"], reply["clientEventId"]) == ("r-big", "evt_big_1")
    update = await device.request(
        f"sessions/{session_id}/update", b'{"pricePerUnit": 1e400, "requestId": "r-up"}'
    )
    assert update["error"]["details"]["fields"][0]["field"] == "pricePerUnit", update
    assert update["requestId"] == "r-up"


async def test_a_lone_surrogate_next_to_a_huge_number_is_refused_and_the_gateway_serves_on(
    device: Device, session_id: str
) -> None:
    """One message stopped every gateway, and again at each restart (the request redelivered):
    a number beyond a double sent the payload to the standard library's parser, which takes a
    lone surrogate; the refusal quoting it could not be written to the dead-letter table, and
    the pipeline died. Refused VALIDATION_ERROR now; the next request is served."""
    for suffix in (f"sessions/{session_id}/get", "sessions/any/get", "records/bulk"):
        reply = await device.request(suffix, b'{"x":1e400,"sessionId":"\\ud800"}')
        assert reply["error"]["code"] == "VALIDATION_ERROR", reply
    created = await device.request(f"sessions/{session_id}/records", record())
    assert created["status"] == "success", created
    status = await device.request(f"sessions/{session_id}/get", {})
    assert status["status"] == "success"


async def test_a_nul_character_fails_its_field_not_the_payload(
    device: Device, legacy_device: LegacyDevice, tenant: Tenant, session_id: str, database: str
) -> None:
    """PostgreSQL text cannot hold NUL, so a field carrying \\u0000 is refused by name; the rest
    of the payload is still read: its replyTo and requestId are honoured, and the other items
    of a bulk are stored (a whole bulk refused for one bad count blocked a handheld's backlog).
    A backslash followed by "u0000" is only text, and is stored."""
    companies = [tenant.company_id]
    body = {**record(event="evt_nul_1"), "worker_name": "Jos\u0000e", "requestId": "r-nul"}
    reply, error = await refuse(
        device,
        database,
        f"sessions/{session_id}/records",
        body,
        "VALIDATION_ERROR",
        companies=companies,
    )
    assert field_names(error) == ["worker_name"]
    assert (reply["requestId"], reply["clientEventId"]) == ("r-nul", "evt_nul_1")
    legacy = await legacy_device.request(
        f"sessions/{session_id}/records", {**body, "requestId": "r-nul-311"}
    )  # answered on its replyTo, or the request times out
    assert (legacy["error"]["code"], legacy["requestId"]) == ("VALIDATION_ERROR", "r-nul-311")

    items = [record(event=f"evt_nul_bulk_{i}", sessionId=session_id) for i in range(3)]
    items[1]["workerId"] = "JS\u00000315"
    before = await stored_for(database, companies)
    bulk = await device.request("records/bulk", {"records": items, "requestId": "r-bulk"})
    assert bulk["requestId"] == "r-bulk", bulk
    assert [r["status"] for r in bulk["results"]] == ["ok", "failed", "ok"], bulk
    assert bulk["results"][1]["error"]["code"] == "VALIDATION_ERROR"
    assert (await stored_for(database, companies)).records == before.records + 2

    text = await device.request(
        f"sessions/{session_id}/records", {**record(event="evt_nul_2"), "worker_name": "a\\u0000b"}
    )
    assert text["status"] == "success", text
    assert text["data"]["payloadPreview"]["worker_name"] == "a\\u0000b"


async def test_garbage_on_every_request_topic_is_answered(
    device: Device, tenant: Tenant, session_id: str, database: str
) -> None:
    """Garbage on any request topic is answered (VALIDATION_ERROR), never dropped."""
    suffixes = [
        "sessions/open",
        f"sessions/{session_id}/get",
        f"sessions/{session_id}/records",
        "records/check-idempotency",
        "records/rec_does_not_exist/get",
    ]
    for suffix in suffixes:
        raw = b"\x00\x01garbage " + secrets.token_hex(4).encode()
        await refuse(
            device, database, suffix, raw, "VALIDATION_ERROR", companies=[tenant.company_id]
        )
    await assert_still_serving(device, session_id, database, tenant)


async def test_payload_over_max_payload_bytes_is_refused(
    servers: Servers, database: str, store: PostgresStore
) -> None:
    """Over GATEWAY_MAX_PAYLOAD_BYTES (yet within the broker's limit): PAYLOAD_TOO_LARGE."""
    tenant = await make_tenant(store)
    settings = gateway_settings(
        servers, database, max_payload_bytes=2048, topic_prefix=SMALL_PREFIX
    )
    async with (
        running_gateway(settings),
        Device(servers.mqtt_host, servers.ws_port, SMALL_PREFIX, token=tenant.token()) as device,
    ):
        opened = await device.request("sessions/open", tenant.open_payload())
        assert opened["status"] == "success", opened
        sid = opened["data"]["sessionId"]
        big = record(notes="x" * 4096)
        raw = orjson.dumps(big)
        assert 4096 < len(raw) < 262_144
        suffix = f"sessions/{sid}/records"
        _, error = await refuse(
            device, database, suffix, raw, "PAYLOAD_TOO_LARGE", companies=[tenant.company_id]
        )
        assert error["details"]["limit"] == 2048
        assert error["details"]["size"] == len(raw)
        # the gateway goes on serving that topic
        ok = await device.request(suffix, record())
        assert ok["status"] == "success", ok
        assert ok["data"]["idempotent"] is False


async def test_payload_over_the_default_limit_is_answered_not_dropped_by_the_broker(
    servers: Servers, device: Device, tenant: Tenant, session_id: str, database: str
) -> None:
    """With the shipped broker config and the default GATEWAY_MAX_PAYLOAD_BYTES, a 300 KB
    record reaches the gateway and is answered PAYLOAD_TOO_LARGE, for an MQTT 5 device (on its
    Response Topic) and for an MQTT 3.1.1 one (on <topic>/reply: its replyTo cannot be read).
    Were the broker's limit the gateway's, the 3.1.1 device would get a plain PUBACK and nothing
    else (mosquitto 2.0.11 drops the message)."""
    suffix = f"sessions/{session_id}/records"
    raw = orjson.dumps(record(notes="x" * 300_000))
    assert 262_144 < len(raw) < 1_048_576
    _, error = await refuse(
        device, database, suffix, raw, "PAYLOAD_TOO_LARGE", companies=[tenant.company_id]
    )
    assert error["details"] == {"limit": 262_144, "size": len(raw)}

    legacy = aiomqtt.Client(
        servers.mqtt_host,
        servers.ws_port,
        identifier=f"legacy-big-{secrets.token_hex(3)}",
        protocol=aiomqtt.ProtocolVersion.V311,
        transport="websockets",
        websocket_path="/mqtt",
        timeout=10,
    )
    body = record(notes="y" * 300_000, authorization=f"Bearer {tenant.token()}")
    legacy_raw = orjson.dumps(body)
    async with legacy:
        await legacy.subscribe(f"{PREFIX}/{suffix}/reply", qos=1)
        await legacy.publish(f"{PREFIX}/{suffix}", legacy_raw, qos=1)
        async with asyncio.timeout(15):
            async for msg in legacy.messages:
                reply = orjson.loads(msg.payload)
                if reply.get("error", {}).get("details", {}).get("size") == len(legacy_raw):
                    break
    assert_error(reply, "PAYLOAD_TOO_LARGE")
    await wait_dead_letter(database, device.topic(suffix), "PAYLOAD_TOO_LARGE", payload=legacy_raw)
    await assert_still_serving(device, session_id, database, tenant)


# --- authentication -----------------------------------------------------------------------------


def _token_cases(tenant: Tenant) -> dict[str, tuple[str | None, str]]:
    now = datetime.now(UTC).timestamp()
    return {
        "missing": (None, "UNAUTHORIZED"),
        "expired": (tenant.token(ttl_s=-3600), "UNAUTHORIZED"),
        "forged": (mint_token(OTHER_SECRET, tenant.user, ttl_s=3600), "UNAUTHORIZED"),
        "not-a-jwt": ("not-a-jwt", "UNAUTHORIZED"),
        "alg-none": (
            ".".join(
                [
                    _b64(b'{"alg":"none","typ":"JWT"}'),
                    _b64(orjson.dumps({"sub": tenant.user, "exp": int(now) + 3600})),
                    "",
                ]
            ),
            "UNAUTHORIZED",
        ),
        "unknown-user": (tenant.token(sub=f"ghost_{secrets.token_hex(4)}"), "FORBIDDEN"),
    }


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


@pytest.mark.parametrize(
    "case", ["missing", "expired", "forged", "not-a-jwt", "alg-none", "unknown-user"]
)
async def test_bad_token_is_refused(
    device: Device, tenant: Tenant, session_id: str, database: str, case: str
) -> None:
    """Missing/expired/forged/malformed token: UNAUTHORIZED; an unknown user's token: FORBIDDEN."""
    token, code = _token_cases(tenant)[case]
    suffix = f"sessions/{session_id}/records"
    rec = record()
    reply, _ = await refuse(
        device, database, suffix, rec, code, companies=[tenant.company_id], token=token
    )
    assert reply["clientEventId"] == rec["clientEventId"]
    # the same token on an open is refused the same way, and opens nothing
    await refuse(
        device,
        database,
        "sessions/open",
        tenant.open_payload(sectorId=tenant.extra_sectors[0], requestId=secrets.token_hex(4)),
        code,
        companies=[tenant.company_id],
        token=token,
    )
    await assert_still_serving(device, session_id, database, tenant)


async def test_a_token_without_the_bearer_scheme_is_refused(
    device: Device, tenant: Tenant, session_id: str, database: str
) -> None:
    """SPEC §3: authorization = 'Bearer <jwt>'; a bare (valid) JWT is refused, as over HTTP."""
    rec = record()
    before = await stored_for(database, [tenant.company_id])
    reply = await device.request(f"sessions/{session_id}/records", rec, scheme="")
    assert "Bearer" in assert_error(reply, "UNAUTHORIZED")["message"], reply
    assert await stored_for(database, [tenant.company_id]) == before
    ok = await device.request(f"sessions/{session_id}/records", rec)  # with its scheme
    assert ok["status"] == "success", ok
    assert ok["data"]["idempotent"] is False


async def test_two_different_tokens_are_refused_not_one_picked(
    device: Device, tenant: Tenant, session_id: str, database: str
) -> None:
    """Two authorization user properties with different tokens (MQTT.js lets an app send
    ``{authorization: [a, b]}``): UNAUTHORIZED, whichever order; the same token twice is fine."""
    suffix = f"sessions/{session_id}/records"
    mine, colleague = tenant.token(), tenant.token(sub=tenant.other_user)
    for first, second in ((mine, colleague), (colleague, mine)):
        rec = record()
        before = await stored_for(database, [tenant.company_id])
        reply = await device.request(suffix, rec, token=first, more_tokens=(second,))
        error = assert_error(reply, "UNAUTHORIZED")
        assert "two different authorization" in error["message"]
        assert await stored_for(database, [tenant.company_id]) == before
    reply = await device.request(suffix, record(), token=mine, more_tokens=(mine,))
    assert reply["status"] == "success", reply


async def test_a_payload_token_differing_from_the_user_property_is_refused(
    device: Device, tenant: Tenant, session_id: str, database: str
) -> None:
    """A token in the user property and another in the payload's "authorization" (the MQTT
    3.1.1 way) are refused, not one picked, on the hot path and on the general one alike."""
    mine, colleague = tenant.token(), tenant.token(sub=tenant.other_user)
    for suffix, payload in (
        (f"sessions/{session_id}/records", record()),
        (f"sessions/{session_id}/get", {}),
    ):
        before = await stored_for(database, [tenant.company_id])
        body = {**payload, "authorization": f"Bearer {colleague}"}
        error = assert_error(await device.request(suffix, body, token=mine), "UNAUTHORIZED")
        assert "two different authorization" in error["message"]
        assert await stored_for(database, [tenant.company_id]) == before
        same = {**payload, "authorization": f"Bearer {mine}"}
        reply = await device.request(suffix, same, token=mine)
        assert reply["status"] == "success", reply


async def test_auth0id_differing_from_token_is_forbidden(
    device: Device, tenant: Tenant, session_id: str, database: str
) -> None:
    """An auth0Id in the payload that is not the token's sub: FORBIDDEN, even naming a colleague."""
    suffix = f"sessions/{session_id}/records"
    for someone in (tenant.other_user, "user_nobody"):
        await refuse(
            device,
            database,
            suffix,
            record(auth0Id=someone),
            "FORBIDDEN",
            companies=[tenant.company_id],
        )
    # the same auth0Id as the token is fine
    ok = await device.request(suffix, record(auth0Id=tenant.user))
    assert ok["status"] == "success", ok
    await assert_still_serving(device, session_id, database, tenant)


# --- whose session -------------------------------------------------------------------------------


async def test_another_users_session_of_same_company_is_forbidden(
    device: Device, tenant: Tenant, session_id: str, database: str
) -> None:
    """A colleague's session: FORBIDDEN for records and get; nothing is stored in it."""
    theirs = await device.request(
        "sessions/open",
        tenant.open_payload(sectorId=tenant.extra_sectors[0]),
        token=tenant.token(sub=tenant.other_user),
    )
    assert theirs["status"] == "success", theirs
    assert theirs["data"]["auth0Id"] == tenant.other_user
    sid = theirs["data"]["sessionId"]
    await refuse(
        device,
        database,
        f"sessions/{sid}/records",
        record(),
        "FORBIDDEN",
        companies=[tenant.company_id],
    )
    await refuse(
        device, database, f"sessions/{sid}/get", {}, "FORBIDDEN", companies=[tenant.company_id]
    )
    await assert_still_serving(device, session_id, database, tenant)


async def test_another_companys_session_is_not_found(
    device: Device, tenant: Tenant, other_tenant: Tenant, session_id: str, database: str
) -> None:
    """Another company's session does not exist for the caller: NOT_FOUND."""
    theirs = await device.request(
        "sessions/open", other_tenant.open_payload(), token=other_tenant.token()
    )
    assert theirs["status"] == "success", theirs
    sid = theirs["data"]["sessionId"]
    companies = [tenant.company_id, other_tenant.company_id]
    await refuse(
        device, database, f"sessions/{sid}/records", record(), "NOT_FOUND", companies=companies
    )
    await refuse(device, database, f"sessions/{sid}/get", {}, "NOT_FOUND", companies=companies)
    await assert_still_serving(device, session_id, database, tenant)


async def test_unknown_session_is_not_found(
    device: Device, tenant: Tenant, session_id: str, database: str
) -> None:
    """A session id that does not exist: NOT_FOUND for records and get."""
    sid = f"nosuchsession{secrets.token_hex(6)}"
    companies = [tenant.company_id]
    await refuse(
        device, database, f"sessions/{sid}/records", record(), "NOT_FOUND", companies=companies
    )
    await refuse(device, database, f"sessions/{sid}/get", {}, "NOT_FOUND", companies=companies)
    await assert_still_serving(device, session_id, database, tenant)


# --- record fields ------------------------------------------------------------------------------


def _without(field: str) -> dict[str, Any]:
    rec = record()
    del rec[field]
    return rec


def _future() -> str:
    return iso_ms(datetime.now(UTC) + timedelta(days=1))


RECORD_FIELD_ERRORS = [
    pytest.param(_without("workerId"), "workerId", id="missing-workerId"),
    pytest.param(_without("worker_name"), "worker_name", id="missing-worker_name"),
    pytest.param(_without("recordedAtUtc"), "recordedAtUtc", id="missing-recordedAtUtc"),
    pytest.param(_without("clientEventId"), "clientEventId", id="missing-clientEventId"),
    pytest.param(record(units="5"), "units", id="units-string"),
    pytest.param(record(units=-1), "units", id="units-negative"),
    pytest.param(record(units=100_001), "units", id="units-over-limit"),
    pytest.param(record(units=True), "units", id="units-boolean"),
    pytest.param(record(recordedAtUtc="yesterday"), "recordedAtUtc", id="recordedAt-garbage"),
    pytest.param(record(workerId=""), "workerId", id="workerId-empty"),
    pytest.param(record(workerId=315), "workerId", id="workerId-number"),
]


@pytest.mark.parametrize(("payload", "field"), RECORD_FIELD_ERRORS)
async def test_record_field_errors_name_the_field(
    device: Device,
    tenant: Tenant,
    session_id: str,
    database: str,
    payload: dict[str, Any],
    field: str,
) -> None:
    """A record with a bad field: VALIDATION_ERROR whose details name that field."""
    suffix = f"sessions/{session_id}/records"
    _, error = await refuse(
        device, database, suffix, payload, "VALIDATION_ERROR", companies=[tenant.company_id]
    )
    assert field in field_names(error), error
    await assert_still_serving(device, session_id, database, tenant)


async def test_record_far_in_the_future_is_refused(
    device: Device, tenant: Tenant, session_id: str, database: str
) -> None:
    """recordedAtUtc more than GATEWAY_CLOCK_SKEW_S ahead: VALIDATION_ERROR naming recordedAtUtc."""
    suffix = f"sessions/{session_id}/records"
    _, error = await refuse(
        device,
        database,
        suffix,
        record(recordedAtUtc=_future()),
        "VALIDATION_ERROR",
        companies=[tenant.company_id],
    )
    assert "recordedAtUtc" in field_names(error), error
    # a minute ahead is within the allowed skew
    ok = await device.request(
        suffix, record(recordedAtUtc=iso_ms(datetime.now(UTC) + timedelta(minutes=1)))
    )
    assert ok["status"] == "success", ok


async def test_record_with_another_session_id_in_payload_is_refused(
    device: Device, tenant: Tenant, session_id: str, database: str
) -> None:
    """A payload sessionId that differs from the topic's: VALIDATION_ERROR naming sessionId."""
    other = await device.request(
        "sessions/open", tenant.open_payload(sectorId=tenant.extra_sectors[0])
    )
    assert other["status"] == "success", other
    _, error = await refuse(
        device,
        database,
        f"sessions/{session_id}/records",
        record(sessionId=other["data"]["sessionId"]),
        "VALIDATION_ERROR",
        companies=[tenant.company_id],
    )
    assert "sessionId" in field_names(error), error
    same = await device.request(f"sessions/{session_id}/records", record(sessionId=session_id))
    assert same["status"] == "success", same


# --- open ---------------------------------------------------------------------------------------


async def test_open_with_unknown_or_foreign_project_is_not_found(
    device: Device, tenant: Tenant, other_tenant: Tenant, session_id: str, database: str
) -> None:
    """Opening on an unknown project or another company's project: NOT_FOUND, nothing opened."""
    companies = [tenant.company_id, other_tenant.company_id]
    for project, sector in (
        (f"proj_unknown_{secrets.token_hex(4)}", tenant.sector_id),
        (other_tenant.project_id, other_tenant.sector_id),
    ):
        payload = {"projectId": project, "sectorId": sector, "requestId": secrets.token_hex(4)}
        reply, _ = await refuse(
            device, database, "sessions/open", payload, "NOT_FOUND", companies=companies
        )
        assert reply["requestId"] == payload["requestId"]
    await assert_still_serving(device, session_id, database, tenant)


async def test_open_whose_deadline_has_passed_is_session_expired(
    device: Device, tenant: Tenant, session_id: str, database: str
) -> None:
    """openedAt so old that openedAt + maxDurationHours has passed: SESSION_EXPIRED."""
    old = datetime.now(UTC) - timedelta(hours=13)  # the project's default is 12 h
    for payload in (
        tenant.open_payload(sectorId=tenant.extra_sectors[0], openedAt=iso_ms(old)),
        tenant.open_payload(
            sectorId=tenant.extra_sectors[1],
            openedAt=iso_ms(datetime.now(UTC) - timedelta(hours=3)),
            maxDurationHours=2,
        ),
    ):
        payload["requestId"] = secrets.token_hex(4)
        await refuse(
            device,
            database,
            "sessions/open",
            payload,
            "SESSION_EXPIRED",
            companies=[tenant.company_id],
        )
    await assert_still_serving(device, session_id, database, tenant)


# --- where the reply goes ------------------------------------------------------------------------


async def test_response_topic_that_is_a_request_topic_is_refused_on_default_reply(
    device: Device, tenant: Tenant, session_id: str, database: str
) -> None:
    """A Response Topic that is a request topic: VALIDATION_ERROR, sent to <topic>/reply."""
    suffix = f"sessions/{session_id}/records"
    topic = device.topic(suffix)
    for bad_response_topic in (
        topic,
        device.topic("sessions/open"),
        device.topic(f"sessions/{session_id}/state"),
        device.topic(f"sessions/{session_id}/events"),
        device.topic("gateway/status"),
    ):
        rec = record()
        async with device.watch(f"{topic}/reply") as replies:
            corr = await device.send(suffix, rec, response_topic=bad_response_topic)
            got = await next_message(replies, what=f"reply on {topic}/reply")
        assert str(got.topic) == f"{topic}/reply"
        reply = orjson.loads(got.payload)
        assert_error(reply, "VALIDATION_ERROR")
        assert getattr(got.properties, "CorrelationData", None) == corr
        assert reply["clientEventId"] == rec["clientEventId"]
        stored = await stored_for(database, [tenant.company_id])
        assert stored.records == 0
        await wait_dead_letter(database, topic, "VALIDATION_ERROR", payload=orjson.dumps(rec))
    await assert_still_serving(device, session_id, database, tenant)


async def test_garbage_without_response_topic_is_answered_on_default_reply(
    servers: Servers,
    gateway: Gateway,
    device: Device,
    tenant: Tenant,
    session_id: str,
    database: str,
) -> None:
    """Garbage with no Response Topic (so no replyTo either) is answered on <topic>/reply."""
    topic = device.topic(f"sessions/{session_id}/records")
    async with (
        RawClient(servers.mqtt_host, servers.ws_port, websockets=True) as raw,
        raw.collect(f"{topic}/reply") as replies,
    ):
        garbage = b"\xff\xfe not json " + secrets.token_hex(4).encode()
        await raw.publish(topic, garbage, token=tenant.token())
        got = await next_message(replies, what=f"reply on {topic}/reply")
        assert_error(got.json(), "VALIDATION_ERROR")
        assert got.correlation is None
        await wait_dead_letter(database, topic, "VALIDATION_ERROR", payload=garbage)

        # a valid record without Response Topic or replyTo is answered there too
        rec = record()
        await raw.publish(topic, orjson.dumps(rec), token=tenant.token())
        ok = (await next_message(replies, what=f"reply on {topic}/reply")).json()
        assert ok["status"] == "success", ok
        assert ok["clientEventId"] == rec["clientEventId"]
    assert (await stored_for(database, [tenant.company_id])).records == 1
    await assert_still_serving(device, session_id, database, tenant)


async def test_reply_to_that_is_a_request_topic_is_refused(
    servers: Servers,
    gateway: Gateway,
    device: Device,
    tenant: Tenant,
    session_id: str,
    database: str,
) -> None:
    """A payload replyTo naming a request topic: VALIDATION_ERROR, sent to <topic>/reply."""
    topic = device.topic(f"sessions/{session_id}/records")
    async with (
        RawClient(servers.mqtt_host, servers.mqtt_port) as raw,
        raw.collect(f"{topic}/reply") as replies,
    ):
        rec = record(
            replyTo=topic, authorization=f"Bearer {tenant.token()}", requestId="r-bad-reply"
        )
        await raw.publish(topic, orjson.dumps(rec))
        got = await next_message(replies, what=f"reply on {topic}/reply")
        reply = got.json()
        assert_error(reply, "VALIDATION_ERROR")
        assert reply["requestId"] == "r-bad-reply"
    assert (await stored_for(database, [tenant.company_id])).records == 0
    await assert_still_serving(device, session_id, database, tenant)


async def test_many_refusals_in_a_burst_do_not_stall_the_gateway(
    device: Device, tenant: Tenant, session_id: str, database: str
) -> None:
    """A burst of mixed garbage, answered one reply each, then valid traffic goes on."""
    suffix = f"sessions/{session_id}/records"
    bad: list[bytes] = [b"\xff", b"[]", b"null", b"{", orjson.dumps(record(units=-5))] * 20
    replies = await asyncio.gather(*(device.request(suffix, raw) for raw in bad))
    assert all(r["status"] == "error" for r in replies)
    assert {r["error"]["code"] for r in replies} == {"VALIDATION_ERROR"}
    assert (await stored_for(database, [tenant.company_id])).records == 0
    await assert_still_serving(device, session_id, database, tenant)


async def test_user_removed_from_the_database_is_forbidden(
    servers: Servers, gateway: Gateway, tenant: Tenant, database: str
) -> None:
    """A user deleted from the users table is no longer a known user: FORBIDDEN."""
    async with Device(
        servers.mqtt_host, servers.ws_port, PREFIX, token=tenant.token(sub=tenant.other_user)
    ) as colleague:
        check = {"key": "client:x:y:z"}
        known = await colleague.request("records/check-idempotency", check)
        assert known["status"] == "success", known
        await execute(database, "DELETE FROM users WHERE auth0_id = $1", tenant.other_user)
        gone = await colleague.request("records/check-idempotency", check)
        assert_error(gone, "FORBIDDEN")
        opened = await colleague.request("sessions/open", tenant.open_payload())
        assert_error(opened, "FORBIDDEN")
    assert (await stored_for(database, [tenant.company_id])).sessions == 0


async def test_a_request_published_retained_is_applied_once_not_at_every_subscribe(
    servers: Servers, database: str, store: PostgresStore
) -> None:
    """A device publishes an open with the retain flag. The broker keeps that copy and hands it
    to every new subscription: a gateway starting later (a new replica, a fresh session) must
    not open a session nobody asked for now. Its live requests are served."""
    tenant = await make_tenant(store)
    prefix = f"hb-retained-{secrets.token_hex(3)}/v2"
    auth = props(UserProperty=[("authorization", f"Bearer {tenant.token()}")])
    async with aiomqtt.Client(
        servers.mqtt_host, servers.mqtt_port, protocol=aiomqtt.ProtocolVersion.V5
    ) as raw:
        await raw.publish(
            f"{prefix}/sessions/open",
            orjson.dumps(tenant.open_payload(requestId="stale")),
            qos=1,
            retain=True,
            properties=auth,
        )
    try:
        async with (
            running_gateway(gateway_settings(servers, database, topic_prefix=prefix)),
            Device(servers.mqtt_host, servers.ws_port, prefix, token=tenant.token()) as device,
        ):
            live = await device.request(
                "sessions/open", tenant.open_payload(sectorId=tenant.extra_sectors[0])
            )
            assert live["status"] == "success", live
            sessions = await fetch(
                database,
                "SELECT sector_id FROM production_sessions WHERE company_id = $1",
                tenant.company_id,
            )
            assert [r["sector_id"] for r in sessions] == [tenant.extra_sectors[0]]
    finally:
        async with aiomqtt.Client(servers.mqtt_host, servers.mqtt_port) as raw:
            await raw.publish(f"{prefix}/sessions/open", b"", qos=1, retain=True)  # clear it


async def test_a_request_published_retained_is_answered_and_its_copy_cleared(
    servers: Servers, device: Device, session_id: str, database: str
) -> None:
    """A record published with the retain flag (a device library's default, say) is answered
    and stored once; then the gateway clears the broker's copy, which holds the device's
    token and would be handed to every later subscriber (an operator's `hydrobit/v2/#`)."""
    topic = f"{PREFIX}/sessions/{session_id}/records"
    payload = record(event=f"evt_retained_{secrets.token_hex(3)}")
    async with aiomqtt.Client(
        servers.mqtt_host, servers.mqtt_port, protocol=aiomqtt.ProtocolVersion.V5
    ) as watcher:
        await watcher.subscribe(topic, qos=1)
        seen: list[bytes] = []

        async def watch() -> None:
            async for msg in watcher.messages:
                seen.append(bytes(msg.payload))
                if not msg.payload:
                    return  # the clear

        watching = asyncio.create_task(watch())
        reply = await device.request(f"sessions/{session_id}/records", payload, retain=True)
        assert reply["status"] == "success", reply
        assert reply["data"]["idempotent"] is False
        await asyncio.wait_for(watching, 10)
        assert seen[-1] == b"" and len(seen) == 2, seen
    async with aiomqtt.Client(
        servers.mqtt_host, servers.mqtt_port, protocol=aiomqtt.ProtocolVersion.V5
    ) as late:
        await late.subscribe(topic, qos=1)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1):
                await anext(late.messages)  # a retained copy would come at once
    rows = await fetch(
        database,
        "SELECT record_id FROM production_records WHERE client_event_id = $1",
        payload["clientEventId"],
    )
    assert [r["record_id"] for r in rows] == [reply["data"]["recordId"]]
