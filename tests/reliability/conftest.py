"""Fixtures for destructive tests: their own PostgreSQL and Mosquitto, which they may stop,
kill and restart without disturbing the rest of the suite."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from gateway.devstack import MosquittoServer, PostgresServer
from gateway.store.migrate import migrate
from gateway.store.postgres import PostgresStore
from tests.support.procs import GatewayProcess
from tests.support.tenants import Tenant, make_tenant


@dataclass
class PrivateStack:
    """A PostgreSQL cluster, a broker and the gateway processes a test started on them."""

    base: Path
    pg: PostgresServer
    broker: MosquittoServer
    dsn: str
    prefix: str
    gateways: list[GatewayProcess] = field(default_factory=list)

    def gateway(self, name: str = "gw", **settings: Any) -> GatewayProcess:
        """A (not yet started) ``gateway run`` process on this stack; a fixed client id per
        name, so a restart finds its persistent session."""
        values: dict[str, Any] = {
            "database_url": self.dsn,
            "mqtt_url": self.broker.url,
            "topic_prefix": self.prefix,
            "mqtt_client_id": f"gw-{self.prefix.split('/')[0]}-{name}",
            "mqtt_keepalive_s": 5,
            "log_level": "INFO",
        }
        values.update(settings)
        proc = GatewayProcess(self.base / f"{name}-{len(self.gateways)}.log", **values)
        self.gateways.append(proc)
        return proc

    async def tenant(self, **kw: Any) -> Tenant:
        store = await PostgresStore.connect(self.dsn, max_size=1)
        try:
            return await make_tenant(store, **kw)
        finally:
            await store.close()


@pytest.fixture
def private_servers(tmp_path: Path) -> Iterator[tuple[PostgresServer, MosquittoServer]]:
    pg = PostgresServer(tmp_path / "pg")
    broker = MosquittoServer(tmp_path / "mq")
    pg.start()
    try:
        broker.start()
        try:
            yield pg, broker
        finally:
            broker.stop()
    finally:
        pg.remove()


@pytest.fixture
async def stack(
    private_servers: tuple[PostgresServer, MosquittoServer], tmp_path: Path
) -> AsyncIterator[PrivateStack]:
    pg, broker = private_servers
    dsn = await asyncio.to_thread(pg.create_database, f"rel_{secrets.token_hex(3)}")
    await migrate(dsn)
    s = PrivateStack(tmp_path, pg, broker, dsn, f"rel{secrets.token_hex(3)}/v2")
    try:
        yield s
    finally:
        for proc in s.gateways:
            proc.close()
