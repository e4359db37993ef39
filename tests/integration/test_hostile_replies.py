"""Requests whose replies the broker would refuse, or no packet could carry: each is answered
within what the broker takes (or acknowledged unanswered), and the gateway serves on."""

from __future__ import annotations

import secrets
from typing import Any

import orjson

from gateway.store.postgres import PostgresStore
from tests.conftest import gateway_settings, running_gateway
from tests.support.devices import Device
from tests.support.extra_helpers import RawClient
from tests.support.servers import Servers
from tests.support.tenants import make_tenant, record


async def test_reply_to_with_a_control_character_does_not_cut_the_gateway_off(
    servers: Servers, database: str, store: PostgresStore
) -> None:
    """mosquitto disconnects a client that publishes to a topic holding a control character (or
    a Unicode non-character), before it reads the PUBACK queued behind. A ``replyTo``
    "…/\\u0001" is therefore refused (on ``<topic>/reply``); accepted, it cut the gateway off,
    and the redelivered request again at every reconnect: a loop that answered nobody."""
    tenant = await make_tenant(store)
    prefix = f"hb-hr-{secrets.token_hex(3)}/v2"
    settings = gateway_settings(servers, database, topic_prefix=prefix)
    async with (
        running_gateway(settings),
        RawClient(servers.mqtt_host, servers.mqtt_port) as raw,
        Device(servers.mqtt_host, servers.ws_port, prefix, token=tenant.token()) as device,
    ):
        opened = await device.request("sessions/open", tenant.open_payload())
        assert opened["status"] == "success", opened
        session_id = opened["data"]["sessionId"]
        bad = {**record(), "replyTo": f"{prefix}/clients/x/\u0001"}
        await raw.publish(
            f"{prefix}/sessions/{session_id}/records", orjson.dumps(bad), token=tenant.token()
        )
        reply = await device.request(f"sessions/{session_id}/records", record(), timeout=20)
        assert reply["status"] == "success", reply


async def test_a_request_topic_too_long_for_its_reply_topic_does_not_stop_the_gateway(
    servers: Servers, database: str, store: PostgresStore
) -> None:
    """A request on a 65,530-byte topic (a long "session id": mosquitto takes it, the `+` of
    the subscription matches it) is refused, but its reply topic ``<topic>/reply`` (65,536
    bytes) fits no packet: it is acknowledged unanswered and the gateway serves on. The
    pipeline died of it and the gateway stopped; restarted, the broker redelivered it."""
    tenant = await make_tenant(store)
    prefix = f"hb-hr-{secrets.token_hex(3)}/v2"
    settings = gateway_settings(servers, database, topic_prefix=prefix)
    head = f"{prefix}/sessions/"
    tail = "/records"
    long_topic = head + "x" * (65_530 - len(head) - len(tail)) + tail
    assert len(long_topic.encode()) == 65_530
    async with (
        running_gateway(settings) as gw,
        RawClient(servers.mqtt_host, servers.mqtt_port) as raw,
        Device(servers.mqtt_host, servers.ws_port, prefix, token=tenant.token()) as device,
    ):
        await raw.publish(long_topic, orjson.dumps(record()), token=tenant.token())
        reply = await device.request("sessions/open", tenant.open_payload(), timeout=15)
        assert reply["status"] == "success", reply
        assert gw.link is not None and gw.link.connected


async def test_a_bulk_whose_reply_is_over_the_broker_limit_still_gets_a_reply(
    servers: Servers, database: str, store: PostgresStore
) -> None:
    """A 145 KB bulk (well under GATEWAY_MAX_PAYLOAD_BYTES) of 1,000 items, each with seven
    wrongly typed fields, made 1,053,650 bytes of per-item errors: over mosquitto's
    message_size_limit, which refused the reply while the request was acknowledged. The reply
    now fits GATEWAY_MAX_PAYLOAD_BYTES: every item still says it failed, and with which code."""
    tenant = await make_tenant(store)
    prefix = f"hb-hr-{secrets.token_hex(3)}/v2"
    settings = gateway_settings(servers, database, topic_prefix=prefix)
    item: dict[str, Any] = {
        k: []
        for k in (
            "workerId",
            "worker_name",
            "recordedAtUtc",
            "clientEventId",
            "units",
            "sessionId",
            "idempotencyKey",
        )
    }
    payload = {"records": [item] * 1000}
    assert len(orjson.dumps(payload)) < settings.max_payload_bytes
    async with (
        running_gateway(settings),
        Device(servers.mqtt_host, servers.ws_port, prefix, token=tenant.token()) as device,
    ):
        raw_reply = await device.request("records/bulk", payload, timeout=20)
    assert raw_reply["status"] == "success", raw_reply
    assert raw_reply["summary"] == {"ok": 0, "duplicated": 0, "failed": 1000}
    assert [r["index"] for r in raw_reply["results"]] == list(range(1000))
    assert {r["error"]["code"] for r in raw_reply["results"]} == {"VALIDATION_ERROR"}
    assert len(orjson.dumps(raw_reply)) <= settings.max_payload_bytes
