"""Session fixtures: real PostgreSQL and Mosquitto, a migrated database, a running gateway."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.app import Gateway
from gateway.config import Settings, load_settings
from gateway.store.migrate import migrate
from gateway.store.postgres import PostgresStore
from tests.support.devices import Device, LegacyDevice
from tests.support.servers import Servers, start_servers
from tests.support.tenants import JWT_SECRET, Tenant, make_tenant

PREFIX = "hydrobit/v2"


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    with start_servers(tmp_path_factory.mktemp("servers")) as s:
        yield s


@pytest.fixture(scope="session")
async def database(servers: Servers) -> str:
    return await create_database(servers)


@pytest.fixture(scope="session")
async def store(database: str) -> AsyncIterator[PostgresStore]:
    s = await PostgresStore.connect(database, max_size=4)
    yield s
    await s.close()


def gateway_settings(servers: Servers, database: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": database,
        "mqtt_url": servers.mqtt_url,
        "mqtt_client_id": f"gw-test-{secrets.token_hex(4)}",
        "http_port": 0,
        "jwt_secret": JWT_SECRET,
        "topic_prefix": PREFIX,
        "log_format": "text",
        "shutdown_timeout_s": 5,
    }
    values.update(overrides)
    return load_settings(**values)


@contextlib.asynccontextmanager
async def running_gateway(settings: Settings, **options: bool) -> AsyncIterator[Gateway]:
    """An in-process gateway on the test loop; stopped (gracefully) on exit."""
    gw = Gateway(settings, **options)
    task = asyncio.create_task(gw.run(), name=f"gateway-{settings.mqtt_client_id}")
    started = asyncio.create_task(gw.started.wait())
    done, _ = await asyncio.wait([task, started], timeout=30, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        task.result()
        raise RuntimeError("gateway exited during startup")
    if started not in done:
        gw.stop()
        raise RuntimeError("gateway did not start within 30 s")
    try:
        yield gw
    finally:
        gw.stop()
        await asyncio.wait_for(task, 30)


@pytest.fixture(scope="session")
async def gateway(servers: Servers, database: str) -> AsyncIterator[Gateway]:
    async with running_gateway(gateway_settings(servers, database)) as gw:
        yield gw


@pytest.fixture
async def tenant(store: PostgresStore) -> Tenant:
    return await make_tenant(store)


@pytest.fixture
async def device(servers: Servers, gateway: Gateway, tenant: Tenant) -> AsyncIterator[Device]:
    async with Device(servers.mqtt_host, servers.ws_port, PREFIX, token=tenant.token()) as d:
        yield d


@pytest.fixture
async def legacy_device(
    servers: Servers, gateway: Gateway, tenant: Tenant
) -> AsyncIterator[LegacyDevice]:
    async with LegacyDevice(servers.mqtt_host, servers.ws_port, PREFIX, token=tenant.token()) as d:
        yield d


@pytest.fixture
async def session_id(device: Device, tenant: Tenant) -> str:
    """An open session of ``tenant.user`` (opened over MQTT)."""
    reply = await device.request("sessions/open", tenant.open_payload())
    assert reply["status"] == "success", reply
    return str(reply["data"]["sessionId"])


@pytest.fixture
def project_root() -> Path:
    return Path(__file__).resolve().parent.parent


async def create_database(servers: Servers) -> str:
    """A fresh, migrated database (for tests that need their own outbox or leader)."""
    import asyncpg

    name = f"gw_{secrets.token_hex(4)}"
    conn = await asyncpg.connect(servers.admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    dsn = servers.dsn(name)
    await migrate(dsn)
    return dsn
