"""The hardened broker (mosquitto/production.conf, mosquitto/acl): logins, what devices may
publish and read, and the gateway over plain TCP, mqtts and wss against it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import orjson
import pytest

from gateway.app import Gateway
from gateway.devstack import render_mosquitto_config
from gateway.errors import ConfigError
from gateway.resources import data_dir
from gateway.simulate import MqttWsConnection, SimulationError, parse_ws_url
from gateway.store.postgres import PostgresStore
from tests.conftest import create_database, gateway_settings, running_gateway
from tests.support.extra_broker import (
    PREFIX,
    USERS,
    WAIT_S,
    SecureBroker,
    Transport,
    connect_refusal,
    correlation_of,
    live_topics,
    mosquitto_passwd_binary,
    secure_broker,
)
from tests.support.servers import Servers
from tests.support.tenants import Tenant, make_tenant

pytestmark = pytest.mark.skipif(
    mosquitto_passwd_binary() is None, reason="mosquitto_passwd (package mosquitto) not installed"
)

NOT_AUTHORIZED = 0x87
BAD_CREDENTIALS = 0x86


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBroker]:
    with secure_broker(tmp_path_factory.mktemp("secure-broker")) as b:
        yield b


@pytest.fixture(scope="module")
async def secure_database(servers: Servers) -> str:
    return await create_database(servers)


@pytest.fixture(scope="module")
async def secure_store(secure_database: str) -> AsyncIterator[PostgresStore]:
    s = await PostgresStore.connect(secure_database, max_size=2)
    yield s
    await s.close()


def marker() -> str:
    """A topic only device-a may read, to prove that nothing else arrived before it."""
    return f"{PREFIX}/clients/device-a/marker-{secrets.token_hex(4)}"


# --- the rendered configuration -----------------------------------------------------------------


def test_production_conf_without_certificates_keeps_the_plain_listeners(tmp_path: Path) -> None:
    """Rendered without certs_dir, the TLS listeners go away with their protocol and TLS lines,
    so `protocol websockets` of 9443 cannot fall onto another listener."""
    text = render_mosquitto_config(
        data_dir("mosquitto") / "production.conf",
        tcp_port=21883,
        ws_port=29001,
        state_dir=tmp_path,
        as_root=False,
        tls_port=28883,
        wss_port=29443,
        password_file=tmp_path / "passwd",
    )
    lines = [line.split() for line in text.splitlines() if line and not line.startswith("#")]
    listeners = [i for i, words in enumerate(lines) if words[0] == "listener"]
    assert [lines[i] for i in listeners] == [
        ["listener", "21883", "127.0.0.1"],
        ["listener", "29001", "127.0.0.1"],
    ]
    assert [lines[i + 1] for i in listeners] == [["protocol", "mqtt"], ["protocol", "websockets"]]
    assert [w[0] for w in lines].count("protocol") == 2
    assert not [w for w in lines if w[0] in ("certfile", "keyfile", "cafile")]
    assert ["allow_anonymous", "false"] in lines
    assert ["password_file", str(tmp_path / "passwd")] in lines
    assert ["acl_file", str(data_dir("mosquitto") / "acl")] in lines


# --- logins -------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["tcp", "ws", "mqtts", "wss"])
async def test_anonymous_clients_are_refused(broker: SecureBroker, transport: Transport) -> None:
    """A client without username is refused with CONNACK 0x87 (not authorized) on every listener."""
    code = await connect_refusal(broker.client(None, transport=transport))
    assert code == NOT_AUTHORIZED


async def test_wrong_password_is_refused(broker: SecureBroker) -> None:
    """A known user with a wrong password is refused (CONNACK 0x86 or 0x87)."""
    code = await connect_refusal(broker.client("device-a", password="not-the-password"))
    assert code in (BAD_CREDENTIALS, NOT_AUTHORIZED)


@pytest.mark.parametrize("transport", ["tcp", "ws", "mqtts", "wss"])
async def test_known_users_log_in(broker: SecureBroker, transport: Transport) -> None:
    """Every user of the password file logs in on every listener (TLS ones verified by the CA)."""
    for user in USERS:
        assert await connect_refusal(broker.client(user, transport=transport)) is None


@pytest.mark.parametrize("transport", ["mqtts", "wss"])
async def test_tls_listeners_need_the_private_ca(
    broker: SecureBroker, transport: Transport
) -> None:
    """The mqtts/wss listeners serve the CA-signed certificate; without the CA, TLS fails."""
    port = broker.port(transport)
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.wait_for(
            asyncio.open_connection(broker.host, port, ssl=ssl.create_default_context()), WAIT_S
        )
    _reader, writer = await asyncio.wait_for(
        asyncio.open_connection(broker.host, port, ssl=broker.certs.client_context()), WAIT_S
    )
    try:
        peer = writer.get_extra_info("peercert")
        assert ("IP Address", "127.0.0.1") in peer["subjectAltName"]
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()


# --- what devices may read ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "secret_topic",
    [
        f"{PREFIX}/clients/device-b/replies",
        f"{PREFIX}/sessions/s1/records/reply",  # the default reply topic: operators only
        f"{PREFIX}/records/check-idempotency",  # another device's request
    ],
)
async def test_device_cannot_read_another_clients_replies(
    broker: SecureBroker, secret_topic: str
) -> None:
    """device-a, subscribed to everything, gets nothing of device-b's; device-b and operators do."""
    async with (
        broker.client("hydrobit-gateway", client_id=f"gw-{secrets.token_hex(3)}") as gateway,
        broker.client("device-a", transport="ws") as device_a,
        broker.client("device-b", transport="ws") as device_b,
        broker.client("operator") as op,
    ):
        assert len(await device_a.subscribe(f"{PREFIX}/#", f"{PREFIX}/clients/device-b/#")) == 2
        await device_b.subscribe(f"{PREFIX}/clients/device-b/#", secret_topic)
        await op.subscribe(f"{PREFIX}/#")
        done = marker()
        assert await gateway.publish(secret_topic, b"secret") == 0
        assert await gateway.publish(done, b"done") == 0

        seen_by_a = await device_a.until(done)
        assert live_topics(seen_by_a) == [done]
        if secret_topic.startswith(f"{PREFIX}/clients/device-b/"):
            assert (await device_b.until(secret_topic))[-1].payload == b"secret"
        # operators read everything but requests (they carry the device's token)
        is_request = secret_topic == f"{PREFIX}/records/check-idempotency"
        expected = [done] if is_request else [secret_topic, done]
        assert live_topics(await op.until(done)) == expected


async def test_borrowed_client_id_does_not_open_another_clients_replies(
    broker: SecureBroker,
) -> None:
    """device-a connecting with client id "device-b" still cannot read device-b's replies."""
    async with (
        broker.client("hydrobit-gateway", client_id=f"gw-{secrets.token_hex(3)}") as gateway,
        broker.client("device-a", client_id="device-b", transport="ws") as impostor,
    ):
        await impostor.subscribe(f"{PREFIX}/clients/device-b/#", f"{PREFIX}/clients/device-a/#")
        done = marker()
        assert await gateway.publish(f"{PREFIX}/clients/device-b/replies", b"secret") == 0
        assert await gateway.publish(done, b"done") == 0
        assert live_topics(await impostor.until(done)) == [done]


async def test_device_reads_events_state_and_gateway_status(broker: SecureBroker) -> None:
    """Session events, retained session state and the gateway status reach a device."""
    topics = [
        f"{PREFIX}/sessions/s-read/events",
        f"{PREFIX}/sessions/s-read/state",
        f"{PREFIX}/gateway/status",
    ]
    async with (
        broker.client("hydrobit-gateway", client_id=f"gw-{secrets.token_hex(3)}") as gateway,
        broker.client("device-a", transport="ws") as device,
    ):
        await device.subscribe(*topics, f"{PREFIX}/clients/device-a/#")
        done = marker()
        for topic in topics:
            assert await gateway.publish(topic, b"{}") == 0
        assert await gateway.publish(done, b"done") == 0
        assert live_topics(await device.until(done)) == [*topics, done]


# --- what devices may publish -------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic",
    [
        f"{PREFIX}/sessions/X/state",
        f"{PREFIX}/sessions/X/events",
        f"{PREFIX}/gateway/status",
        f"{PREFIX}/clients/device-b/replies",
        f"{PREFIX}/sessions/X/records/reply",
        f"{PREFIX}/somewhere/else",
        "outside/the/prefix",
    ],
)
@pytest.mark.parametrize("user", ["device-a", "operator"])
async def test_devices_and_operators_cannot_publish_gateway_topics(
    broker: SecureBroker, topic: str, user: str
) -> None:
    """A publish outside the request topics gets PUBACK 0x87 and reaches no subscriber (the
    gateway's user, which reads everything, watches; a device sends the closing marker, as
    operators may send no request at all)."""
    async with (
        broker.client(user, transport="ws") as sender,
        broker.client("device-b", transport="ws") as device,
        broker.client("hydrobit-gateway", client_id=f"gw-{secrets.token_hex(3)}") as watcher,
    ):
        await watcher.subscribe(f"{PREFIX}/#", "outside/#")
        assert await sender.publish(topic, b'{"status":"online"}', retain=True) == NOT_AUTHORIZED
        done = f"{PREFIX}/sessions/open"
        assert await device.publish(done, b"{}") == 0
        assert live_topics(await watcher.until(done)) == [done]


@pytest.mark.parametrize(
    "suffix",
    [
        "sessions/open",
        "sessions/S1/get",
        "sessions/S1/update",
        "sessions/S1/close",
        "sessions/S1/extend",
        "sessions/S1/records",
        "records/bulk",
        "records/R1/get",
        "records/R1/void",
        "records/check-idempotency",
    ],
)
async def test_device_may_publish_every_request_topic(broker: SecureBroker, suffix: str) -> None:
    """Each of the ten request topics of SPEC §2 is accepted (PUBACK 0) and reaches the
    gateway's user, not operators: a request carries its device's token. Its reply topic
    still reaches operators."""
    async with (
        broker.client("device-a", transport="wss") as device,
        broker.client("operator", client_id=f"op-{secrets.token_hex(3)}") as op,
        broker.client("hydrobit-gateway", client_id=f"gw-{secrets.token_hex(3)}") as gw,
    ):
        await op.subscribe(f"{PREFIX}/#")
        await gw.subscribe(f"{PREFIX}/#")
        topic = f"{PREFIX}/{suffix}"
        assert await device.publish(topic, b'{"requestId":"r"}') == 0
        received = await gw.until(topic)
        assert received[-1].payload == b'{"requestId":"r"}'
        assert await gw.publish(f"{topic}/reply", b'{"status":"success"}') == 0
        seen = await op.until(f"{topic}/reply")
        assert [str(m.topic) for m in seen] == [f"{topic}/reply"]  # the request never came
        assert await op.publish(topic, b'{"requestId":"op"}') != 0  # nor may they send one


# --- the gateway against the hardened broker ----------------------------------------------------


@pytest.mark.parametrize(
    ("gateway_transport", "device_transport"),
    [("tcp", "ws"), ("mqtts", "wss"), ("wss", "ws")],
)
async def test_gateway_answers_a_device_through_the_hardened_broker(
    broker: SecureBroker,
    servers: Servers,
    secure_database: str,
    secure_store: PostgresStore,
    gateway_transport: Transport,
    device_transport: Transport,
) -> None:
    """The gateway user (mqtt, mqtts or wss with the private CA) answers device-a's open request
    on hydrobit/v2/clients/device-a/replies; the device also reads its session's state."""
    tenant: Tenant = await make_tenant(secure_store)
    settings = gateway_settings(
        servers,  # only for its PostgreSQL (secure_database): the broker is ours
        secure_database,
        mqtt_url=broker.url(gateway_transport),
        mqtt_username="hydrobit-gateway",
        mqtt_password=USERS["hydrobit-gateway"],
        mqtt_ca_file=str(broker.certs.ca),
        mqtt_keepalive_s=10,
        # a group of its own: the gateways of earlier tests keep persistent sessions on this
        # broker, and an offline member of a shared subscription still gets its share
        share_group=f"gw-{secrets.token_hex(3)}",
    )
    assert settings.mqtt.tls == (gateway_transport in ("mqtts", "wss"))
    # On mqtts and wss the broker makes the username the client id: the earlier cases' gateway
    # left a persistent session "hydrobit-gateway" subscribed to *their* group, which this one
    # would resume and get every request twice. A clean start on 1883 ends that session first.
    async with broker.client("hydrobit-gateway", client_id="hydrobit-gateway"):
        pass
    async with (
        running_gateway(settings),
        broker.client("device-a", transport=device_transport) as device,
    ):
        await device.subscribe(f"{PREFIX}/clients/device-a/#")
        code, corr = await device.request(
            "sessions/open", tenant.open_payload(requestId="open-1"), token=tenant.token()
        )
        assert code == 0
        reply = await device.reply(corr)
        assert reply["status"] == "success", reply
        assert reply["requestId"] == "open-1"
        session_id = reply["data"]["sessionId"]

        state_topic = f"{PREFIX}/sessions/{session_id}/state"
        await device.subscribe(state_topic)
        state = orjson.loads((await device.until(state_topic))[-1].payload)
        assert state["sessionId"] == session_id
        code, corr = await device.request(f"sessions/{session_id}/close", {}, token=tenant.token())
        assert code == 0
        closed = await device.reply(corr)
        assert closed["status"] == "success", closed
        assert closed["data"]["status"] == "closed"
        # each request answered once: nothing more carries the close's correlation data by the
        # time a later request is answered
        code, last = await device.request(f"sessions/{session_id}/get", {}, token=tenant.token())
        assert code == 0
        extra = []
        async with asyncio.timeout(WAIT_S):
            while (msg := await device.inbox.get()) and correlation_of(msg) != last:
                if correlation_of(msg) is not None:
                    extra.append(msg.payload)
        assert extra == []


async def test_a_login_in_the_broker_url_is_used_and_never_logged(
    broker: SecureBroker,
    servers: Servers,
    secure_database: str,
    secure_store: PostgresStore,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """GATEWAY_MQTT_URL=mqtt://user:password@host: the login is used (it was ignored, and the
    broker refused the anonymous gateway) and the password never reaches a log line (every
    connect line carried it)."""
    tenant: Tenant = await make_tenant(secure_store)
    password = USERS["hydrobit-gateway"]
    settings = gateway_settings(
        servers,
        secure_database,
        mqtt_url=broker.url("tcp").replace(
            "mqtt://", f"mqtt://hydrobit-gateway:{quote(password, safe='')}@"
        ),
        share_group=f"gw-{secrets.token_hex(3)}",
    )
    assert settings.mqtt_username is None and settings.broker_password == password
    caplog.set_level(logging.INFO)
    async with (
        running_gateway(settings),
        broker.client("device-a", transport="ws") as device,
    ):
        await device.subscribe(f"{PREFIX}/clients/device-a/#")
        code, corr = await device.request(
            "sessions/open", tenant.open_payload(), token=tenant.token()
        )
        assert code == 0
        assert (await device.reply(corr))["status"] == "success"
    assert "mqtt://hydrobit-gateway@127.0.0.1" in caplog.text  # where it connected, as whom
    assert password not in caplog.text and quote(password, safe="") not in caplog.text


@pytest.mark.parametrize("transport", ["ws", "wss", "mqtts"])
async def test_a_device_cannot_take_the_gateways_client_id(
    broker: SecureBroker, transport: Transport
) -> None:
    """device-a connecting with the gateway's client id gets its own username as id: the
    gateway stays connected (its persistent session, with the queued requests, is untouched)
    and the impostor reads only device-a's replies."""
    gateway_id = f"hydrobit-gateway-{secrets.token_hex(3)}"
    async with broker.client("hydrobit-gateway", client_id=gateway_id) as gateway:
        await gateway.subscribe(f"{PREFIX}/clients/#")
        async with broker.client("device-a", client_id=gateway_id, transport=transport) as imp:
            await imp.subscribe(f"{PREFIX}/clients/#")
            done = marker()  # under clients/device-a/: the impostor reads it as device-a
            # the gateway was not thrown off: it still publishes (PUBACK 0) and receives
            assert await gateway.publish(f"{PREFIX}/clients/device-b/replies", b"secret") == 0
            assert await gateway.publish(done, b"done") == 0
            assert live_topics(await gateway.until(done))[-1] == done
            assert live_topics(await imp.until(done)) == [done]


@pytest.mark.parametrize(
    ("transport", "changes", "named"),
    [
        ("tcp", {"mqtt_password": "wrong"}, "GATEWAY_MQTT_PASSWORD"),
        ("tcp", {"mqtt_username": "nobody"}, "GATEWAY_MQTT_USERNAME"),
        ("mqtts", {"mqtt_ca_file": None}, "GATEWAY_MQTT_CA_FILE"),
        ("wss", {"mqtt_ca_file": None}, "GATEWAY_MQTT_CA_FILE"),
    ],
)
async def test_a_setting_the_broker_refuses_stops_the_gateway_at_start(
    broker: SecureBroker,
    servers: Servers,
    secure_database: str,
    transport: Transport,
    changes: dict[str, object],
    named: str,
) -> None:
    """A wrong password or an untrusted certificate is not an outage to wait out: the first
    connection fails with a ConfigError naming the setting (it retried for ever)."""
    settings = gateway_settings(
        servers,
        secure_database,
        mqtt_url=broker.url(transport),
        mqtt_username="hydrobit-gateway",
        mqtt_password=USERS["hydrobit-gateway"],
        mqtt_ca_file=str(broker.certs.ca),
    ).model_copy(update=changes)
    gateway = Gateway(settings)
    with pytest.raises(ConfigError) as info:
        await asyncio.wait_for(gateway.run(), 30)
    assert named in str(info.value)


def test_the_simulator_refused_by_the_hardened_broker_says_why(broker: SecureBroker) -> None:
    """gateway simulate's devices connect anonymously: the hardened broker's refusal is named
    (it read as 'is the gateway running?'), and a URL with a password in it is refused."""
    with pytest.raises(SimulationError, match=r"refused .*0x87.*gateway dev"):
        MqttWsConnection(broker.host, broker.port("ws"), "/mqtt", "sim-x")
    with pytest.raises(ConfigError) as info:
        parse_ws_url(f"ws://device-a:{USERS['device-a']}@127.0.0.1:9001/mqtt")
    assert USERS["device-a"] not in str(info.value)


async def test_a_prefix_the_acl_does_not_give_the_gateway_is_warned_about(
    broker: SecureBroker,
    servers: Servers,
    secure_database: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """GATEWAY_TOPIC_PREFIX outside the gateway user's ACL: the broker refuses its status
    publish (0x87) and the log says which settings to check (it said nothing, /readyz 200)."""
    settings = gateway_settings(
        servers,
        secure_database,
        mqtt_url=broker.url("tcp"),
        mqtt_username="hydrobit-gateway",
        mqtt_password=USERS["hydrobit-gateway"],
        topic_prefix="elsewhere/v2",
        share_group=f"gw-{secrets.token_hex(3)}",
    )
    with caplog.at_level(logging.WARNING, logger="gateway.transport.mqtt"):
        async with running_gateway(settings):
            for _ in range(100):
                if "GATEWAY_TOPIC_PREFIX" in caplog.text:
                    break
                await asyncio.sleep(0.05)
    assert "0x87" in caplog.text and "GATEWAY_TOPIC_PREFIX" in caplog.text
