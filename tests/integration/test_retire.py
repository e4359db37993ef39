"""`gateway retire`: a replica taken out for good hands back its share of the requests.

Its persistent broker session (clean start off, SPEC §2) keeps taking a share of the shared
subscription's requests while it is down; retiring answers what was queued for it and ends the
session, so that nothing waits a day (GATEWAY_MQTT_SESSION_EXPIRY_S) for a replica that is gone.
"""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

import asyncpg

from gateway.app import Gateway
from gateway.core import mqtt5
from gateway.store.postgres import PostgresStore
from tests.conftest import gateway_settings, running_gateway
from tests.integration.test_events_state import Watcher
from tests.support.devices import Device
from tests.support.servers import Servers
from tests.support.tenants import make_tenant, record

N = 24


async def session_present(servers: Servers, client_id: str) -> bool:
    """Does the broker still hold a session for ``client_id``? (CONNECT, clean start off,
    read CONNACK's Session Present flag, and leave with the gateway's own session expiry so
    that a session that was there stays there)."""
    reader, writer = await asyncio.open_connection(servers.mqtt_host, servers.mqtt_port)
    try:
        writer.write(
            mqtt5.encode_connect(
                client_id,
                keepalive=30,
                clean_start=False,
                session_expiry=86_400,
                receive_maximum=10,
            )
        )
        first, _length, flags = await asyncio.wait_for(reader.readexactly(3), 10)
        assert first == mqtt5.CONNACK
        return bool(flags & 0x01)
    finally:
        writer.close()


async def test_retire_answers_the_queued_share_then_ends_the_session(
    servers: Servers, database: str, store: PostgresStore
) -> None:
    tenant = await make_tenant(store)
    prefix = f"hb-retire-{secrets.token_hex(3)}/v2"
    gone = gateway_settings(servers, database, topic_prefix=prefix)
    stays = gateway_settings(servers, database, topic_prefix=prefix)
    async with (
        running_gateway(stays) as live,
        Device(servers.mqtt_host, servers.ws_port, prefix, token=tenant.token()) as device,
        Watcher(servers, f"{prefix}/gateway/status") as status,
    ):
        opened = await device.request("sessions/open", tenant.open_payload())
        assert opened["status"] == "success", opened
        sid = opened["data"]["sessionId"]
        async with running_gateway(gone):
            pass  # subscribed once, then stopped: its session (and its share) lives on
        assert await session_present(servers, gone.mqtt_client_id)

        def send(n: int) -> list[asyncio.Task[dict[str, Any]]]:
            return [
                asyncio.create_task(device.request(f"sessions/{sid}/records", record(), timeout=60))
                for _ in range(n)
            ]

        first = send(N)
        await asyncio.wait(first, timeout=3)
        stuck = [t for t in first if not t.done()]
        assert stuck, "the stopped replica's session took no share: the scenario did not happen"
        assert len(stuck) < N  # and the live one answered its own share

        # run on the live gateway's host: its HTTP port is taken, and that must not matter
        retiring = Gateway(gone.model_copy(update={"http_port": live.http_port}), retiring=True)
        status.messages.clear()
        run = asyncio.create_task(retiring.run())
        assert await asyncio.wait_for(retiring.retire(quiet_s=0.5), 60) is True
        await asyncio.wait_for(run, 60)
        # nothing said on the status topic the live replicas share (its `offline` would stand
        # there until the live one's next `online`)
        said = [p["instance"] for p in status.payloads()]
        assert gone.mqtt_client_id not in said, said
        assert not await session_present(servers, gone.mqtt_client_id)
        replies = await asyncio.gather(*first)
        assert all(r["status"] == "success" for r in replies), replies

        # the session is gone: every new request goes to the replica that stays
        second = send(N)
        done, pending = await asyncio.wait(second, timeout=20)
        assert not pending, f"{len(pending)} requests still went to the retired replica"
        assert all(t.result()["status"] == "success" for t in done)

    conn = await asyncpg.connect(database)
    try:
        stored = await conn.fetchval(
            "SELECT count(*) FROM production_records WHERE session_id = $1", sid
        )
    finally:
        await conn.close()
    assert stored == 2 * N


async def test_retire_of_a_client_id_the_broker_does_not_know_says_so(
    servers: Servers, database: str
) -> None:
    """A mistyped GATEWAY_MQTT_CLIENT_ID: nothing to retire, said so (it reported success), and
    no session is left behind for the typo."""
    settings = gateway_settings(servers, database).model_copy(
        update={"mqtt_client_id": f"hydrobit-gateway-typo-{secrets.token_hex(3)}"}
    )
    retiring = Gateway(settings, retiring=True)
    run = asyncio.create_task(retiring.run())
    assert await asyncio.wait_for(retiring.retire(quiet_s=0.5), 60) is False
    await asyncio.wait_for(run, 60)
    assert not await session_present(servers, settings.mqtt_client_id)


async def test_retire_with_another_topic_prefix_answers_nothing_and_keeps_the_session(
    servers: Servers, database: str, store: PostgresStore
) -> None:
    """Retired without the replica's own GATEWAY_TOPIC_PREFIX, retire answered every queued
    request VALIDATION_ERROR ("not a request topic": a code that tells the device not to send
    again), ended the session and reported success. Now it stops at the first request outside
    its own subscriptions, unanswered and unacknowledged, and keeps the session; retired again
    with the right prefix, the queued requests are applied."""
    tenant = await make_tenant(store)
    prefix = f"hb-retire-{secrets.token_hex(3)}/v2"
    group = f"g-{secrets.token_hex(3)}"  # no other replica shares these requests
    gone = gateway_settings(servers, database, topic_prefix=prefix, share_group=group)
    async with Device(servers.mqtt_host, servers.ws_port, prefix, token=tenant.token()) as device:
        async with running_gateway(gone):
            opened = await device.request("sessions/open", tenant.open_payload())
            assert opened["status"] == "success", opened
        sid = opened["data"]["sessionId"]
        queued = [
            asyncio.create_task(device.request(f"sessions/{sid}/records", record(), timeout=60))
            for _ in range(5)
        ]
        await asyncio.sleep(0.5)
        assert not any(t.done() for t in queued)

        wrong = gone.model_copy(update={"topic_prefix": "hydrobit/v2"})
        retiring = Gateway(wrong, retiring=True)
        run = asyncio.create_task(retiring.run())
        assert await asyncio.wait_for(retiring.retire(quiet_s=0.5), 60) is False
        await asyncio.wait_for(run, 60)
        assert retiring.link is not None
        assert retiring.link.foreign_topic == f"{prefix}/sessions/{sid}/records"
        assert not any(t.done() for t in queued), [t.result() for t in queued if t.done()]
        assert await session_present(servers, gone.mqtt_client_id)

        retiring = Gateway(gone, retiring=True)
        run = asyncio.create_task(retiring.run())
        assert await asyncio.wait_for(retiring.retire(quiet_s=0.5), 60) is True
        await asyncio.wait_for(run, 60)
        replies = await asyncio.gather(*queued)
    assert all(r["status"] == "success" for r in replies), replies
    assert not await session_present(servers, gone.mqtt_client_id)


async def test_retire_stopped_before_it_is_done_keeps_the_session(
    servers: Servers, database: str
) -> None:
    """A retire interrupted (Ctrl-C) before its queue was answered and quiet ended the broker
    session anyway, dropping whatever was still queued in it unanswered. It keeps it now."""
    settings = gateway_settings(
        servers,
        database,
        topic_prefix=f"hb-retire-{secrets.token_hex(3)}/v2",  # no copy of other tests' requests
        share_group=f"g-{secrets.token_hex(3)}",
    )
    async with running_gateway(settings):
        pass  # subscribed once, then stopped: a session to retire
    retiring = Gateway(settings, retiring=True)
    run = asyncio.create_task(retiring.run())
    outcome = asyncio.create_task(retiring.retire(quiet_s=30))
    await asyncio.wait_for(retiring.started.wait(), 30)
    await asyncio.sleep(1.0)
    retiring.stop()
    assert await asyncio.wait_for(outcome, 30) is False
    await asyncio.wait_for(run, 30)
    assert await session_present(servers, settings.mqtt_client_id)

    retiring = Gateway(settings, retiring=True)  # run again: done, and the session is gone
    run = asyncio.create_task(retiring.run())
    assert await asyncio.wait_for(retiring.retire(quiet_s=0.5), 60) is True
    await asyncio.wait_for(run, 60)
    assert not await session_present(servers, settings.mqtt_client_id)
