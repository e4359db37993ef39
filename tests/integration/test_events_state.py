"""Session events (outbox) and retained session state, as an operator's mosquitto_sub sees them."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiomqtt
import asyncpg
import orjson
import pytest

from gateway.app import Gateway
from tests.conftest import create_database, gateway_settings, running_gateway
from tests.support.devices import Device
from tests.support.servers import Servers
from tests.support.tenants import Tenant, make_tenant, record

PREFIX = "hydrobit/v2"


class Watcher:
    """An operator: a plain MQTT 5 client subscribed to a filter, collecting what arrives."""

    def __init__(self, servers: Servers, topic_filter: str) -> None:
        self.client = aiomqtt.Client(
            servers.mqtt_host,
            servers.mqtt_port,
            protocol=aiomqtt.ProtocolVersion.V5,
            identifier=f"op-{secrets.token_hex(4)}",
        )
        self.filter = topic_filter
        self.messages: list[aiomqtt.Message] = []
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Watcher:
        await self.client.__aenter__()
        await self.client.subscribe(self.filter, qos=1)
        self._task = asyncio.create_task(self._collect())
        return self

    async def _collect(self) -> None:
        async for msg in self.client.messages:
            self.messages.append(msg)

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        await self.client.__aexit__(None, None, None)

    def payloads(self, topic: str | None = None) -> list[dict[str, Any]]:
        return [
            orjson.loads(m.payload) for m in self.messages if topic is None or str(m.topic) == topic
        ]

    async def wait_for(self, predicate: Any, timeout: float = 10) -> list[dict[str, Any]]:
        for _ in range(int(timeout / 0.05)):
            found = [p for p in self.payloads() if predicate(p)]
            if found:
                return found
            await asyncio.sleep(0.05)
        raise AssertionError(f"nothing matched on {self.filter}: {self.payloads()[-5:]}")


async def make_due(conn: asyncpg.Connection, session_ids: list[str]) -> None:
    """Put the sessions' deadline a minute in the past, for the sweeper to find."""
    await conn.execute(
        "UPDATE production_sessions SET expires_at = $2, max_duration_hours = 0.01, "
        "version = version + 1 WHERE session_id = ANY($1::text[])",
        session_ids,
        datetime.now(UTC) - timedelta(minutes=1),
    )


async def test_lifecycle_events_are_published_once_each(
    servers: Servers, device: Device, tenant: Tenant
) -> None:
    """opened, updated, extended, closed arrive on the events topic with unique ids."""
    async with Watcher(servers, f"{PREFIX}/sessions/+/events") as ops:
        opened = await device.request("sessions/open", tenant.open_payload())
        sid = opened["data"]["sessionId"]
        await device.request(f"sessions/{sid}/update", {"notes": "sunny"})
        # re-sent, or setting what is already there: updated, and nothing to announce
        price = opened["data"]["pricePerUnit"]
        for same in ({"notes": "sunny"}, {"notes": "sunny", "pricePerUnit": price}):
            again = await device.request(f"sessions/{sid}/update", same)
            assert again["data"] == {"updated": True}, again
        await device.request(f"sessions/{sid}/extend", {"maxDurationHours": 14})
        await device.request(f"sessions/{sid}/close", {})
        events = await ops.wait_for(
            lambda p: p["sessionId"] == sid and p["type"] == "session.closed"
        )
        await asyncio.sleep(0.3)  # anything duplicated would arrive by now
        mine = [p for p in ops.payloads() if p["sessionId"] == sid]
    types = [p["type"] for p in mine]
    assert types == ["session.opened", "session.updated", "session.extended", "session.closed"]
    assert len({p["eventId"] for p in mine}) == 4
    for p in mine:
        assert set(p) == {"eventId", "type", "at", "sessionId", "data"}
        assert p["at"].endswith("Z")
    assert mine[1]["data"]["changed"] == ["notes"]
    assert mine[2]["data"]["maxDurationHours"] == 14
    # written as the session object writes it (12, not 12.0)
    previous = mine[2]["data"]["previousMaxDurationHours"]
    assert orjson.dumps(previous) == orjson.dumps(opened["data"]["maxDurationHours"])
    assert events[0]["data"]["status"] == "closed"
    # the event carries the session object as a get answers it, keys in the same order
    got = await device.request(f"sessions/{sid}/get", {})
    assert list(events[0]["data"]) == list(got["data"]), events[0]["data"]
    assert list(mine[0]["data"]) == [k for k in opened["data"] if k != "idempotent"]
    assert all(
        str(m.topic) == f"{PREFIX}/sessions/{sid}/events"
        for m in ops.messages
        if orjson.loads(m.payload)["sessionId"] == sid
    )


async def test_an_update_announces_only_what_it_changed(
    servers: Servers, device: Device, session_id: str
) -> None:
    """An update setting one field anew and another to its current value: one event whose
    changed names the first only."""
    got = (await device.request(f"sessions/{session_id}/get", {}))["data"]
    async with Watcher(servers, f"{PREFIX}/sessions/{session_id}/events") as ops:
        reply = await device.request(
            f"sessions/{session_id}/update",
            {"samplingUnit": got["samplingUnit"], "pricePerUnit": got["pricePerUnit"] + 1},
        )
        assert reply["data"] == {"updated": True}, reply
        (event,) = await ops.wait_for(lambda p: p["type"] == "session.updated")
    assert event["data"]["changed"] == ["pricePerUnit"]
    assert event["data"]["pricePerUnit"] == got["pricePerUnit"] + 1


async def _retained_state(servers: Servers, session_id: str) -> aiomqtt.Message:
    """What a late subscriber gets at once: the retained state message."""
    async with Watcher(servers, f"{PREFIX}/sessions/{session_id}/state") as late:
        for _ in range(100):
            if late.messages:
                return late.messages[-1]
            await asyncio.sleep(0.05)
    raise AssertionError(f"no retained state for {session_id}")


async def test_late_subscriber_gets_retained_state_with_live_totals(
    servers: Servers, device: Device, session_id: str
) -> None:
    """The retained state is the bare session object with totals matching what was recorded."""
    for units in (3, 4.5, 2):
        await device.request(f"sessions/{session_id}/records", record(units=units))
    state: dict[str, Any] = {}
    for _ in range(60):  # coalesced: the latest totals arrive within a few intervals
        msg = await _retained_state(servers, session_id)
        state = orjson.loads(msg.payload)
        if msg.retain and state["totals"]["records"] == 3:
            break
        await asyncio.sleep(0.1)
    assert msg.retain
    assert "status" in state and state["sessionId"] == session_id  # no reply envelope
    assert state["totals"]["units"] == 9.5
    assert state["totals"]["records"] == 3
    assert state["totals"]["amount"] == pytest.approx(9.5 * 5.5 * 1.1)


async def test_records_update_an_open_session_in_place(
    servers: Servers, database: str, device: Device, session_id: str
) -> None:
    """A record moves its open session's totals with a HOT update (no new entry in any of the
    session's indexes, so the hottest rows do not bloat them), and the retained state, which
    no longer finds the session through an index, still follows."""
    conn = await asyncpg.connect(database)

    async def updates() -> tuple[int, int]:
        row = await conn.fetchrow(
            """SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
               WHERE relname = 'production_sessions'"""
        )
        assert row is not None
        return int(row[0]), int(row[1])

    try:
        all_before, hot_before = await updates()
        for _ in range(30):  # one at a time: a batch, so a totals update, each
            reply = await device.request(f"sessions/{session_id}/records", record(units=1))
            assert reply["status"] == "success", reply
        for _ in range(100):  # backends report their counts once idle, within about a second
            all_after, hot_after = await updates()
            if all_after - all_before >= 30:
                break
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    assert all_after - all_before >= 30
    assert hot_after - hot_before >= 24, (all_after - all_before, hot_after - hot_before)
    for _ in range(60):
        state = orjson.loads((await _retained_state(servers, session_id)).payload)
        if state["totals"]["records"] == 30:
            break
        await asyncio.sleep(0.1)
    assert state["totals"]["records"] == 30 and state["totals"]["units"] == 30


async def test_state_is_coalesced_under_a_burst(
    servers: Servers, device: Device, session_id: str
) -> None:
    """200 records produce far fewer state messages than records, and the last one is exact."""
    topic = f"{PREFIX}/sessions/{session_id}/state"
    async with Watcher(servers, topic) as ops:
        corrs = [
            await device.send(f"sessions/{session_id}/records", record(units=1)) for _ in range(200)
        ]
        assert len(corrs) == 200
        final = await ops.wait_for(lambda p: p["totals"]["records"] == 200, timeout=20)
    assert final[-1]["totals"]["units"] == 200
    assert len(ops.payloads(topic)) < 50


async def test_closed_state_carries_a_message_expiry(
    servers: Servers, device: Device, session_id: str
) -> None:
    """Once closed, the retained state expires (GATEWAY_STATE_RETAIN_S) instead of living on."""
    await device.request(f"sessions/{session_id}/close", {})
    for _ in range(60):
        msg = await _retained_state(servers, session_id)
        if orjson.loads(msg.payload)["status"] == "closed":
            break
        await asyncio.sleep(0.1)
    expiry = getattr(msg.properties, "MessageExpiryInterval", None)
    assert expiry is not None
    assert 0 < expiry <= 7 * 86400


async def test_gateway_status_online_then_offline_on_clean_stop(
    servers: Servers, database: str
) -> None:
    """A gateway announces itself online (retained) and offline when it stops cleanly."""
    prefix = f"hb-status-{secrets.token_hex(3)}/v2"
    settings = gateway_settings(servers, database, topic_prefix=prefix)
    async with Watcher(servers, f"{prefix}/gateway/status") as ops:
        async with running_gateway(settings):
            online = await ops.wait_for(lambda p: p["status"] == "online")
            await asyncio.sleep(0.05)  # so that "stopped" is a later millisecond than "started"
        offline = await ops.wait_for(lambda p: p["status"] == "offline")
    assert online[0]["instance"] == settings.mqtt_client_id
    assert set(online[0]) == {"status", "instance", "version", "at"}
    assert offline[-1]["instance"] == settings.mqtt_client_id
    assert set(offline[-1]) == {"status", "instance", "version", "at"}
    # a clean stop says when it stopped (the will, written at connect, cannot)
    assert offline[-1]["at"] > online[0]["at"]


async def test_with_two_replicas_one_stopping_leaves_the_status_online(
    servers: Servers, database: str
) -> None:
    """One status topic serves every replica: when one stops cleanly (retained `offline`), the
    one still serving re-announces `online` within GATEWAY_STATUS_INTERVAL_S, and that is what a
    late subscriber finds."""
    prefix = f"hb-status2-{secrets.token_hex(3)}/v2"
    topic = f"{prefix}/gateway/status"
    staying = gateway_settings(servers, database, topic_prefix=prefix, status_interval_s=0.2)
    leaving = gateway_settings(servers, database, topic_prefix=prefix, status_interval_s=0.2)
    async with running_gateway(staying):
        async with Watcher(servers, topic) as ops:
            async with running_gateway(leaving):
                await ops.wait_for(lambda p: p["instance"] == leaving.mqtt_client_id)
            gone = await ops.wait_for(lambda p: p["status"] == "offline")
            assert gone[-1]["instance"] == leaving.mqtt_client_id
            after = len(ops.payloads())
            for _ in range(100):
                later = ops.payloads()[after:]
                if any(p["instance"] == staying.mqtt_client_id for p in later):
                    break
                await asyncio.sleep(0.05)
            assert later and later[-1]["status"] == "online", later
            assert later[-1]["instance"] == staying.mqtt_client_id
        async with Watcher(servers, topic) as late:  # the retained message
            retained = await late.wait_for(lambda p: True)
        assert retained[0]["status"] == "online"
        assert retained[0]["instance"] == staying.mqtt_client_id


@pytest.fixture
async def two_gateways(servers: Servers) -> AsyncIterator[tuple[str, str, list[Gateway]]]:
    """Two gateway processes' worth of gateways sharing a fresh database and a prefix."""
    database = await create_database(servers)
    prefix = f"hb-pair-{secrets.token_hex(3)}/v2"
    async with (
        running_gateway(gateway_settings(servers, database, topic_prefix=prefix)) as a,
        running_gateway(gateway_settings(servers, database, topic_prefix=prefix)) as b,
    ):
        yield database, prefix, [a, b]


async def test_two_sweepers_announce_one_expiry(
    servers: Servers, two_gateways: tuple[str, str, list[Gateway]]
) -> None:
    """Two gateways sweeping at once close an expired session and announce it exactly once."""
    database, prefix, gateways = two_gateways
    from gateway.store.postgres import PostgresStore

    store = await PostgresStore.connect(database, max_size=2)
    try:
        tenant = await make_tenant(store)
    finally:
        await store.close()
    async with (
        Device(servers.mqtt_host, servers.ws_port, prefix, token=tenant.token()) as device,
        Watcher(servers, f"{prefix}/sessions/+/events") as ops,
    ):
        sid = (await device.request("sessions/open", tenant.open_payload()))["data"]["sessionId"]
        conn = await asyncpg.connect(database)
        try:
            await make_due(conn, [sid])
            for gw in gateways:
                assert gw.sweeper is not None
                gw.sweeper.nudge()
            await ops.wait_for(lambda p: p["type"] == "session.expired" and p["sessionId"] == sid)
            await asyncio.sleep(0.5)
            stored = await conn.fetchval(
                "SELECT count(*) FROM session_events WHERE session_id = $1 AND type = $2",
                sid,
                "session.expired",
            )
        finally:
            await conn.close()
    expired = [
        p for p in ops.payloads() if p["type"] == "session.expired" and p["sessionId"] == sid
    ]
    assert stored == 1
    assert len(expired) == 1
    assert expired[0]["data"]["closeReason"] == "expired"


async def test_a_session_whose_amount_overflows_holds_back_no_other(
    servers: Servers, device: Device, tenant: Tenant, gateway: Gateway, database: str
) -> None:
    """A price too large for a JSON number (stored before prices were bounded) made rendering
    raise: the state publisher and the expiry sweeper stopped for every session. Now that
    session shows an amount of null, and the others' states and expiries go on."""
    sids = []
    for sector in tenant.extra_sectors[:2]:
        opened = await device.request("sessions/open", tenant.open_payload(sectorId=sector))
        sids.append(opened["data"]["sessionId"])
    bad, good = sids
    for sid in sids:
        reply = await device.request(f"sessions/{sid}/records", record(units=10))
        assert reply["status"] == "success", reply
    conn = await asyncpg.connect(database)
    try:
        await conn.execute(
            "UPDATE production_sessions SET price_per_unit = 1e308, version = version + 1 "
            "WHERE session_id = $1",
            bad,
        )
        got = await device.request(f"sessions/{bad}/get", {})
        assert got["status"] == "success", got
        assert got["data"]["totals"]["amount"] is None  # 10 x 1e308 x 1.1 is beyond a double
        async with Watcher(servers, f"{PREFIX}/sessions/+/#") as ops:
            reply = await device.request(f"sessions/{good}/records", record(units=2))
            assert reply["status"] == "success", reply
            await ops.wait_for(
                lambda p: p.get("sessionId") == good and p.get("totals", {}).get("units") == 12
            )
            await make_due(conn, sids)
            assert gateway.sweeper is not None
            gateway.sweeper.nudge()
            for sid in sids:
                await ops.wait_for(
                    lambda p, sid=sid: p.get("type") == "session.expired" and p["sessionId"] == sid
                )
    finally:
        await conn.close()


async def test_the_publisher_hears_of_every_broker_connection(gateway: Gateway) -> None:
    """The link tells the publisher when it connects, and whether the broker kept our session
    (tests/core/test_publisher_states.py: without it, every state is published again)."""
    assert gateway.link is not None and gateway.publisher is not None
    assert gateway.link.on_connected == gateway.publisher.broker_connected
