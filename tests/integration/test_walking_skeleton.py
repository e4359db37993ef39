"""End to end over WebSocket: open a session, record units, replay, as a handheld does."""

from __future__ import annotations

import asyncio
from typing import Any

import aiomqtt

from tests.conftest import PREFIX
from tests.support.devices import Device, LegacyDevice
from tests.support.servers import Servers
from tests.support.tenants import Tenant, record


async def test_open_then_record_then_replay(device: Device, tenant: Tenant) -> None:
    """A record is stored once; the same record again answers idempotent with the same id."""
    opened = await device.request("sessions/open", tenant.open_payload(requestId="r-open"))
    assert opened["status"] == "success"
    assert opened["requestId"] == "r-open"
    session = opened["data"]
    assert session["status"] == "open"
    assert session["auth0Id"] == tenant.user
    assert session["companyId"] == tenant.company_id

    rec = record(units=5, requestId="r-1")
    first = await device.request(f"sessions/{session['sessionId']}/records", rec)
    assert first["status"] == "success", first
    assert first["data"]["idempotent"] is False
    assert first["requestId"] == "r-1"
    assert first["clientEventId"] == rec["clientEventId"]
    preview = first["data"]["payloadPreview"]
    assert preview["units"] == 5
    assert preview["workerId"] == "JS0315"

    again = await device.request(f"sessions/{session['sessionId']}/records", rec)
    assert again["data"]["idempotent"] is True
    assert again["data"]["recordId"] == first["data"]["recordId"]

    got = await device.request(f"sessions/{session['sessionId']}/get", {})
    totals = got["data"]["totals"]
    assert totals["units"] == 5
    assert totals["records"] == 1
    assert totals["workers"] == 1


async def test_legacy_device_uses_payload_token_and_reply_to(
    legacy_device: LegacyDevice, tenant: Tenant
) -> None:
    """An MQTT 3.1.1 device gets its replies on replyTo, authenticated by the payload token."""
    opened = await legacy_device.request("sessions/open", tenant.open_payload(requestId="o"))
    assert opened["status"] == "success", opened
    sid = opened["data"]["sessionId"]
    rec = record(requestId="legacy-1")
    reply = await legacy_device.request(f"sessions/{sid}/records", rec)
    assert reply["status"] == "success", reply
    assert reply["requestId"] == "legacy-1"
    assert reply["clientEventId"] == rec["clientEventId"]


async def test_replies_events_and_state_say_they_are_json(
    servers: Servers, device: Device, tenant: Tenant
) -> None:
    """MQTT 5 subscribers see what the gateway publishes marked as UTF-8 (Payload Format
    Indicator 1) JSON (Content Type application/json): replies, events and retained state."""
    async with aiomqtt.Client(
        servers.mqtt_host, servers.mqtt_port, protocol=aiomqtt.ProtocolVersion.V5
    ) as watcher:
        await watcher.subscribe(f"{PREFIX}/sessions/+/#", qos=1)
        await watcher.subscribe(device.reply_topic, qos=1)
        opened = await device.request("sessions/open", tenant.open_payload())
        sid = opened["data"]["sessionId"]
        await device.request(f"sessions/{sid}/records", record())
        await device.request(f"sessions/{sid}/close", {})
        kinds: dict[str, Any] = {}
        async with asyncio.timeout(15):
            async for msg in watcher.messages:
                topic = str(msg.topic)
                kind = (
                    "reply"
                    if topic == device.reply_topic
                    else topic.rsplit("/", 1)[-1]
                    if topic.startswith(f"{PREFIX}/sessions/{sid}/")
                    else None
                )
                if kind in ("reply", "events", "state"):
                    kinds[kind] = msg.properties
                if len(kinds) == 3:
                    break
    for kind, properties in kinds.items():
        assert properties is not None, kind
        assert getattr(properties, "ContentType", None) == "application/json", kind
        assert getattr(properties, "PayloadFormatIndicator", None) == 1, kind
