"""A fresh company, user, project and sector per test, so tests never share state."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from gateway.core.auth import mint_token
from gateway.core.models import OpenSession
from gateway.core.rules import Principal
from gateway.core.seedfile import SeedFile
from gateway.service import Service
from gateway.store.postgres import PostgresStore

JWT_SECRET = "test-secret-0123456789abcdef0123456789abcdef"


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Tenant:
    company_id: str
    user: str
    project_id: str
    sector_id: str
    other_user: str  # same company, another person
    timezone: str = "America/Mexico_City"
    extra_sectors: list[str] = field(default_factory=list)

    def token(self, sub: str | None = None, ttl_s: float = 3600, **kw: Any) -> str:
        return mint_token(JWT_SECRET, sub or self.user, ttl_s=ttl_s, **kw)

    def open_payload(self, **overrides: Any) -> dict[str, Any]:
        return {"projectId": self.project_id, "sectorId": self.sector_id, **overrides}

    def principal(self, sub: str | None = None) -> Principal:
        return Principal(sub or self.user, self.company_id)


async def opened(service: Service, who: Principal, payload: dict[str, Any], at: datetime) -> str:
    """The id of the session ``who`` opens (or gets back) with ``payload``, through the service."""
    session = await service.open_session(who, OpenSession.model_validate(payload), at)
    return str(session["sessionId"])


def record(worker: str = "JS0315", event: str | None = None, **overrides: Any) -> dict[str, Any]:
    """A valid record payload (a fresh clientEventId unless given)."""
    return {
        "workerId": worker,
        "worker_name": "John Smith",
        "units": 5,
        "recordedAtUtc": now_iso(),
        "clientEventId": event or f"evt_{secrets.token_hex(6)}",
        **overrides,
    }


async def make_tenant(
    store: PostgresStore,
    *,
    timezone: str = "America/Mexico_City",
    max_hours: float = 12,
    sectors: int = 3,
) -> Tenant:
    tag = secrets.token_hex(5)
    t = Tenant(
        company_id=f"comp_{tag}",
        user=f"user_{tag}",
        project_id=f"proj_{tag}",
        sector_id=f"sector_{tag}_0",
        other_user=f"user_{tag}_other",
        timezone=timezone,
        extra_sectors=[f"sector_{tag}_{i}" for i in range(1, sectors)],
    )
    seed = {
        "companies": [{"companyId": t.company_id, "name": f"Farm {tag}"}],
        "users": [
            {"auth0Id": t.user, "companyId": t.company_id},
            {"auth0Id": t.other_user, "companyId": t.company_id},
        ],
        "projects": [
            {
                "projectId": t.project_id,
                "companyId": t.company_id,
                "name": "Berries",
                "timezone": timezone,
                "samplingUnit": "box",
                "pricePerUnit": 5.5,
                "bonus": {"type": "percent", "value": 10, "note": "High quality bonus"},
                "maxDurationHours": max_hours,
                "sectors": [
                    {"sectorId": s, "sector_name": f"Lote {i}"}
                    for i, s in enumerate([t.sector_id, *t.extra_sectors])
                ],
            }
        ],
    }
    await store.seed(SeedFile.model_validate(seed))
    return t
