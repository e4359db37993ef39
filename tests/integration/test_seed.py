"""Seeding in steps: a later file may add users and projects to a company already loaded."""

from __future__ import annotations

import secrets

import pytest

from gateway.app import Gateway
from gateway.core.seedfile import SeedFile
from gateway.errors import ConfigError, InvalidRequest
from gateway.store.postgres import PostgresStore
from tests.conftest import gateway_settings
from tests.support.extra_helpers import fetchval
from tests.support.servers import Servers
from tests.support.tenants import make_tenant


async def test_users_may_join_a_company_already_in_the_database(store: PostgresStore) -> None:
    """A file with only users for an existing company loads; an unknown company is refused."""
    tenant = await make_tenant(store)
    newcomer = f"{tenant.user}_new"
    counts = await store.seed(
        SeedFile.model_validate({"users": [{"auth0Id": newcomer, "companyId": tenant.company_id}]})
    )
    assert counts["users"] == 1
    assert await store.companies_of([newcomer]) == {newcomer: tenant.company_id}
    with pytest.raises(InvalidRequest) as info:
        await store.seed(
            SeedFile.model_validate(
                {"users": [{"auth0Id": f"{newcomer}_2", "companyId": "comp_nowhere"}]}
            )
        )
    assert "comp_nowhere" in info.value.message
    assert await store.companies_of([f"{newcomer}_2"]) == {}


async def test_gateway_refuses_an_unmigrated_database(servers: Servers) -> None:
    """A gateway pointed at a database without the schema says to run gateway migrate."""
    import asyncpg

    name = f"bare_{secrets.token_hex(3)}"
    conn = await asyncpg.connect(servers.admin_dsn)
    try:
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    settings = gateway_settings(servers, servers.dsn(name))
    with pytest.raises(ConfigError) as info:
        await Gateway(settings).run()
    assert "gateway migrate" in str(info.value)


async def test_a_project_never_moves_to_another_company(
    store: PostgresStore, database: str
) -> None:
    """A second tenant's file reusing a projectId is refused, not a takeover: the project,
    its name and its price stay as they were, and nothing of that file is written."""
    tenant = await make_tenant(store)
    other = f"comp_{secrets.token_hex(4)}"
    hijack = SeedFile.model_validate(
        {
            "companies": [{"companyId": other, "name": "Other Farms"}],
            "projects": [
                {
                    "projectId": tenant.project_id,
                    "companyId": other,
                    "name": "Hijack",
                    "timezone": "UTC",
                }
            ],
        }
    )
    with pytest.raises(InvalidRequest) as info:
        await store.seed(hijack)
    assert tenant.project_id in info.value.message
    assert tenant.company_id in info.value.message
    project = await store.project(tenant.project_id)
    assert project is not None
    assert (project.company_id, project.name) != (other, "Hijack")
    assert project.company_id == tenant.company_id
    assert (
        await fetchval(database, "SELECT count(*) FROM companies WHERE company_id = $1", other) == 0
    )
