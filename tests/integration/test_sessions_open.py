"""Opening sessions (SPEC §5 "Open", seeds POST /sessions): company, day, defaults, uniqueness."""

from __future__ import annotations

import asyncio
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest

from gateway.app import Gateway
from gateway.core.models import OpenSession
from gateway.core.rules import Limits, Principal
from gateway.core.seedfile import SeedFile
from gateway.service import Service
from gateway.store.postgres import PostgresStore
from tests.conftest import PREFIX
from tests.support.devices import Device
from tests.support.extra_helpers import fetch, iso_ms
from tests.support.servers import Servers
from tests.support.tenants import Tenant, make_tenant, record

MAX_SESSION_HOURS = 48  # GATEWAY_MAX_SESSION_HOURS's default


def instant_with_other_local_date(tz_name: str, *, within_hours: float = 40) -> datetime:
    """A whole-minute instant in the past ``within_hours`` whose local date in ``tz_name``
    differs from its UTC date (the latest such instant, so that a session opened then with
    ``MAX_SESSION_HOURS`` has not expired)."""
    tz = ZoneInfo(tz_name)
    start = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)
    for step in range(int(within_hours * 4)):
        t = start - timedelta(minutes=15 * step)
        if t.astimezone(tz).date() != t.date():
            return t
    raise AssertionError(f"{tz_name} has no instant whose local date differs from UTC's")


def success(reply: dict[str, Any]) -> dict[str, Any]:
    assert reply["status"] == "success", reply
    data: dict[str, Any] = reply["data"]
    return data


def tenant_device(servers: Servers, tenant: Tenant, sub: str | None = None) -> Device:
    return Device(servers.mqtt_host, servers.ws_port, PREFIX, token=tenant.token(sub=sub))


async def test_company_comes_from_the_user(
    device: Device, tenant: Tenant, store: PostgresStore, database: str
) -> None:
    """The session's company is the user's (from the users table), never the payload's."""
    other = await make_tenant(store)
    sneaky = await device.request(
        "sessions/open", tenant.open_payload(companyId=other.company_id, requestId="r-0")
    )
    # a companyId in the payload is ignored or refused, never used
    if sneaky["status"] == "success":
        assert sneaky["data"]["companyId"] == tenant.company_id, sneaky
    else:
        assert sneaky["error"]["code"] == "VALIDATION_ERROR", sneaky
    rows = await fetch(
        database,
        "SELECT count(*) AS n FROM production_sessions WHERE company_id = $1",
        other.company_id,
    )
    assert rows[0]["n"] == 0
    data = success(
        await device.request(
            "sessions/open", tenant.open_payload(auth0Id=tenant.user, requestId="r-1")
        )
    )
    assert data["companyId"] == tenant.company_id
    assert data["auth0Id"] == tenant.user
    assert data["projectId"] == tenant.project_id
    assert data["sectorId"] == tenant.sector_id
    assert data["status"] == "open"
    assert data["closedAt"] is None
    rows = await fetch(
        database,
        "SELECT company_id, owner_id FROM production_sessions WHERE session_id = $1",
        data["sessionId"],
    )
    assert [(r["company_id"], r["owner_id"]) for r in rows] == [(tenant.company_id, tenant.user)]


@pytest.mark.parametrize(
    "tz_name", ["America/Mexico_City", "Asia/Tokyo", "Pacific/Kiritimati", "Pacific/Pago_Pago"]
)
async def test_day_is_the_local_date_of_opened_at_in_the_project_timezone(
    servers: Servers, gateway: Gateway, store: PostgresStore, tz_name: str
) -> None:
    """``day`` is openedAt's local date in the project's timezone, written as T00:00:00.000Z."""
    tenant = await make_tenant(store, timezone=tz_name)
    opened_at = instant_with_other_local_date(tz_name)
    local_day = opened_at.astimezone(ZoneInfo(tz_name)).date()
    assert local_day != opened_at.date()
    async with tenant_device(servers, tenant) as device:
        data = success(
            await device.request(
                "sessions/open",
                tenant.open_payload(openedAt=iso_ms(opened_at), maxDurationHours=MAX_SESSION_HOURS),
            )
        )
    assert data["timezone"] == tz_name
    assert data["openedAt"] == iso_ms(opened_at)
    assert data["day"] == f"{local_day.isoformat()}T00:00:00.000Z"
    assert data["day"] != f"{opened_at.date().isoformat()}T00:00:00.000Z"


async def test_opened_at_with_an_offset_is_the_same_instant(
    servers: Servers, gateway: Gateway, store: PostgresStore
) -> None:
    """openedAt written with a UTC offset names the same instant (and the same local day)."""
    tz_name = "America/Mexico_City"
    tenant = await make_tenant(store, timezone=tz_name)
    opened_at = instant_with_other_local_date(tz_name)
    local = opened_at.astimezone(ZoneInfo(tz_name))
    async with tenant_device(servers, tenant) as device:
        data = success(
            await device.request(
                "sessions/open",
                tenant.open_payload(
                    openedAt=local.isoformat(timespec="milliseconds"),
                    maxDurationHours=MAX_SESSION_HOURS,
                ),
            )
        )
    assert data["openedAt"] == iso_ms(opened_at)
    assert data["day"] == f"{local.date().isoformat()}T00:00:00.000Z"


async def test_opened_at_defaults_to_arrival(device: Device, tenant: Tenant) -> None:
    """Without openedAt the session opens now (its local day is today's in the project zone)."""
    before = datetime.now(UTC) - timedelta(seconds=5)
    data = success(await device.request("sessions/open", tenant.open_payload()))
    after = datetime.now(UTC) + timedelta(seconds=5)
    opened = datetime.fromisoformat(data["openedAt"].replace("Z", "+00:00"))
    assert before <= opened <= after
    local_day = opened.astimezone(ZoneInfo(tenant.timezone)).date()
    assert data["day"] == f"{local_day.isoformat()}T00:00:00.000Z"


async def test_project_defaults_apply_when_not_given(device: Device, tenant: Tenant) -> None:
    """samplingUnit, pricePerUnit, bonus, maxDurationHours default to the project's settings."""
    data = success(await device.request("sessions/open", tenant.open_payload()))
    assert data["samplingUnit"] == "box"
    assert data["pricePerUnit"] == 5.5
    assert data["bonus"] == {"type": "percent", "value": 10, "note": "High quality bonus"}
    assert data["maxDurationHours"] == 12
    assert data["sector_name"] == "Lote 0"
    assert data["notes"] is None
    opened = datetime.fromisoformat(data["openedAt"].replace("Z", "+00:00"))
    expires = datetime.fromisoformat(data["expiresAt"].replace("Z", "+00:00"))
    assert expires - opened == timedelta(hours=12)
    totals = data["totals"]
    assert (totals["units"], totals["records"], totals["voided"], totals["workers"]) == (
        0,
        0,
        0,
        0,
    )
    assert totals["amount"] == 0


async def test_given_settings_override_the_project_defaults(device: Device, tenant: Tenant) -> None:
    """Settings given in the open payload override the project's defaults."""
    bonus = {"type": "fixed", "value": 20, "note": "Sunday"}
    data = success(
        await device.request(
            "sessions/open",
            tenant.open_payload(
                samplingUnit="kg",
                pricePerUnit=6.25,
                bonus=bonus,
                maxDurationHours=18,
                notes="Good weather conditions",
                sector_name="Lote A-1",
            ),
        )
    )
    assert data["samplingUnit"] == "kg"
    assert data["pricePerUnit"] == 6.25
    assert data["bonus"] == bonus
    assert data["maxDurationHours"] == 18
    assert data["notes"] == "Good weather conditions"
    assert data["sector_name"] == "Lote A-1"
    got = success(await device.request(f"sessions/{data['sessionId']}/get", {}))
    for field in ("samplingUnit", "pricePerUnit", "bonus", "maxDurationHours", "notes"):
        assert got[field] == data[field], field


async def test_a_misspelled_setting_is_refused_not_replaced_by_the_default(
    device: Device, tenant: Tenant
) -> None:
    """ "pricePerunit": 9 left aside would open at the project's price: it is refused by name
    and nothing opens; a device's own extra field is left aside."""
    reply = await device.request("sessions/open", tenant.open_payload(pricePerunit=9))
    assert reply["status"] == "error", reply
    assert reply["error"]["code"] == "VALIDATION_ERROR"
    assert reply["error"]["details"]["fields"] == [
        {
            "field": "pricePerunit",
            "message": "is not a field of a session open; did you mean pricePerUnit?",
        }
    ]
    data = success(await device.request("sessions/open", tenant.open_payload(orderId="o-7")))
    assert data["idempotent"] is False  # the refused open opened nothing
    assert "orderId" not in data


async def test_max_duration_hours_is_bounded(device: Device, tenant: Tenant) -> None:
    """maxDurationHours over GATEWAY_MAX_SESSION_HOURS: VALIDATION_ERROR; the bound is fine."""
    reply = await device.request(
        "sessions/open", tenant.open_payload(maxDurationHours=MAX_SESSION_HOURS + 1)
    )
    assert reply["status"] == "error", reply
    assert reply["error"]["code"] == "VALIDATION_ERROR"
    fields = [f["field"] for f in reply["error"]["details"]["fields"]]
    assert "maxDurationHours" in fields
    for bad in (0, -1, "12"):
        reply = await device.request("sessions/open", tenant.open_payload(maxDurationHours=bad))
        assert reply["status"] == "error", (bad, reply)
        assert reply["error"]["code"] == "VALIDATION_ERROR", (bad, reply)
    data = success(
        await device.request(
            "sessions/open", tenant.open_payload(maxDurationHours=MAX_SESSION_HOURS)
        )
    )
    assert data["maxDurationHours"] == MAX_SESSION_HOURS


async def test_a_project_default_over_the_limit_says_what_to_send(
    servers: Servers, gateway: Gateway, store: PostgresStore
) -> None:
    """A project seeded with a default above the limit (before the limit was lowered): an open
    without maxDurationHours is refused naming the project; one that sends it opens."""
    tenant = await make_tenant(store, max_hours=MAX_SESSION_HOURS + 52)
    async with tenant_device(servers, tenant) as device:
        reply = await device.request("sessions/open", tenant.open_payload())
        assert reply["status"] == "error", reply
        assert reply["error"]["code"] == "VALIDATION_ERROR"
        assert tenant.project_id in reply["error"]["message"]
        assert "send maxDurationHours" in reply["error"]["message"]
        given = success(
            await device.request("sessions/open", tenant.open_payload(maxDurationHours=10))
        )
        assert given["maxDurationHours"] == 10


async def test_second_open_by_the_owner_returns_the_same_session(
    device: Device, tenant: Tenant, database: str
) -> None:
    """The same (project, day, sector) opened again by its owner: the same sessionId, idempotent."""
    first = success(await device.request("sessions/open", tenant.open_payload()))
    assert first["idempotent"] is False
    second = success(await device.request("sessions/open", tenant.open_payload()))
    assert second["sessionId"] == first["sessionId"]
    assert second["idempotent"] is True
    assert second["day"] == first["day"]
    assert second["openedAt"] == first["openedAt"]
    rows = await fetch(
        database,
        "SELECT session_id FROM production_sessions WHERE company_id = $1",
        tenant.company_id,
    )
    assert [r["session_id"] for r in rows] == [first["sessionId"]]


async def test_open_by_another_user_of_the_company_is_already_open(
    servers: Servers, device: Device, tenant: Tenant, database: str
) -> None:
    """A colleague opening the same (project, day, sector): SESSION_ALREADY_OPEN naming it."""
    first = success(await device.request("sessions/open", tenant.open_payload()))
    async with tenant_device(servers, tenant, sub=tenant.other_user) as colleague:
        reply = await colleague.request("sessions/open", tenant.open_payload(requestId="r-x"))
    assert reply["status"] == "error", reply
    assert reply["error"]["code"] == "SESSION_ALREADY_OPEN"
    assert reply["error"]["details"]["sessionId"] == first["sessionId"]
    assert reply["requestId"] == "r-x"
    count = await fetch(
        database,
        "SELECT count(*) AS n FROM production_sessions WHERE company_id = $1",
        tenant.company_id,
    )
    assert count[0]["n"] == 1


async def test_another_sector_opens_a_separate_session(
    servers: Servers, device: Device, tenant: Tenant
) -> None:
    """A different sector is a different key: a separate session, for the owner or a colleague."""
    first = success(await device.request("sessions/open", tenant.open_payload()))
    second = success(
        await device.request("sessions/open", tenant.open_payload(sectorId=tenant.extra_sectors[0]))
    )
    assert second["sessionId"] != first["sessionId"]
    assert second["idempotent"] is False
    assert second["sectorId"] == tenant.extra_sectors[0]
    assert second["day"] == first["day"]
    async with tenant_device(servers, tenant, sub=tenant.other_user) as colleague:
        third = success(
            await colleague.request(
                "sessions/open", tenant.open_payload(sectorId=tenant.extra_sectors[1])
            )
        )
    assert third["sessionId"] not in (first["sessionId"], second["sessionId"])
    assert third["auth0Id"] == tenant.other_user


async def test_another_day_opens_a_separate_session(
    servers: Servers, gateway: Gateway, store: PostgresStore
) -> None:
    """The same project and sector on another local day is a different key."""
    tz_name = "America/Mexico_City"
    tenant = await make_tenant(store, timezone=tz_name)
    tz = ZoneInfo(tz_name)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    yesterday = now - timedelta(hours=24)
    assert yesterday.astimezone(tz).date() != now.astimezone(tz).date()
    async with tenant_device(servers, tenant) as device:
        old = success(
            await device.request(
                "sessions/open",
                tenant.open_payload(openedAt=iso_ms(yesterday), maxDurationHours=30),
            )
        )
        new = success(
            await device.request("sessions/open", tenant.open_payload(openedAt=iso_ms(now)))
        )
    assert old["sessionId"] != new["sessionId"]
    assert old["day"] != new["day"]
    assert new["idempotent"] is False


async def test_unknown_sector_is_not_found(device: Device, tenant: Tenant) -> None:
    """A sectorId the project does not have: NOT_FOUND (and no session)."""
    reply = await device.request(
        "sessions/open", tenant.open_payload(sectorId=f"sector_nope_{secrets.token_hex(3)}")
    )
    assert reply["status"] == "error", reply
    assert reply["error"]["code"] == "NOT_FOUND"


async def test_sector_of_another_project_is_not_found(
    device: Device, tenant: Tenant, store: PostgresStore
) -> None:
    """A sectorId that belongs to another project (even of another company) is NOT_FOUND."""
    other = await make_tenant(store)
    reply = await device.request("sessions/open", tenant.open_payload(sectorId=other.sector_id))
    assert reply["status"] == "error", reply
    assert reply["error"]["code"] == "NOT_FOUND"


async def test_open_validates_its_fields(device: Device, tenant: Tenant) -> None:
    """Ill-typed open fields are VALIDATION_ERROR naming the field."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"sectorId": tenant.sector_id}, "projectId"),
        (tenant.open_payload(openedAt="not a date"), "openedAt"),
        (tenant.open_payload(pricePerUnit=-1), "pricePerUnit"),
        (tenant.open_payload(bonus={"type": "gift", "value": 1}), "bonus.type"),
    ]
    for payload, field in cases:
        reply = await device.request("sessions/open", payload)
        assert reply["status"] == "error", (payload, reply)
        assert reply["error"]["code"] == "VALIDATION_ERROR", (payload, reply)
        fields = [f["field"] for f in reply["error"]["details"]["fields"]]
        assert field in fields, (payload, reply)


async def test_open_without_sector_is_one_key(
    servers: Servers, device: Device, tenant: Tenant
) -> None:
    """Without sectorId, (company, project, day, no sector) is still one key."""
    payload = {"projectId": tenant.project_id}
    first = success(await device.request("sessions/open", payload))
    assert first["sectorId"] is None
    second = success(await device.request("sessions/open", payload))
    assert second["sessionId"] == first["sessionId"]
    assert second["idempotent"] is True
    async with tenant_device(servers, tenant, sub=tenant.other_user) as colleague:
        reply = await colleague.request("sessions/open", payload)
    assert reply["status"] == "error", reply
    assert reply["error"]["code"] == "SESSION_ALREADY_OPEN"
    assert reply["error"]["details"]["sessionId"] == first["sessionId"]


async def test_company_follows_the_users_table(
    servers: Servers, gateway: Gateway, store: PostgresStore
) -> None:
    """A user moved to another company (re-seeded) opens sessions in the new company."""
    old, new = await make_tenant(store), await make_tenant(store)
    async with tenant_device(servers, old) as device:
        before = success(await device.request("sessions/open", old.open_payload()))
        assert before["companyId"] == old.company_id
        await store.seed(
            SeedFile.model_validate(
                {
                    "companies": [{"companyId": new.company_id, "name": "New employer"}],
                    "users": [{"auth0Id": old.user, "companyId": new.company_id}],
                }
            )
        )
        after = await device.request("sessions/open", new.open_payload())
        assert after["status"] == "success", after
        assert after["data"]["companyId"] == new.company_id
        assert after["data"]["auth0Id"] == old.user


async def test_expired_session_does_not_block_a_new_open(device: Device, tenant: Tenant) -> None:
    """Once a session's deadline passed, opening its key again opens a new session."""
    short = success(
        await device.request("sessions/open", tenant.open_payload(maxDurationHours=0.001))
    )
    deadline = datetime.fromisoformat(short["expiresAt"].replace("Z", "+00:00"))
    wait = (deadline - datetime.now(UTC)).total_seconds() + 0.3
    assert wait < 10, short
    await asyncio.sleep(max(wait, 0))
    fresh = success(await device.request("sessions/open", tenant.open_payload()))
    assert fresh["sessionId"] != short["sessionId"]
    assert fresh["idempotent"] is False
    old = success(await device.request(f"sessions/{short['sessionId']}/get", {}))
    assert old["status"] == "closed"
    assert old["closeReason"] == "expired"
    assert old["closedAt"] == short["expiresAt"]


async def test_an_open_resent_after_its_own_deadline_finds_the_extended_session(
    servers: Servers, device: Device, tenant: Tenant
) -> None:
    """A handheld re-sends its buffered open (openedAt and maxDurationHours as first sent)
    after that deadline, but the session was extended meanwhile and is still open: the owner
    gets it back (idempotent), a colleague SESSION_ALREADY_OPEN, not SESSION_EXPIRED (which
    tells a device to give up on a session that is taking records)."""
    opened_at = datetime.now(UTC) - timedelta(hours=1) + timedelta(seconds=4)
    payload = tenant.open_payload(
        sectorId=tenant.extra_sectors[0], openedAt=iso_ms(opened_at), maxDurationHours=1
    )
    first = success(await device.request("sessions/open", payload))
    extended = await device.request(
        f"sessions/{first['sessionId']}/extend", {"maxDurationHours": 12}
    )
    assert extended["status"] == "success", extended
    deadline = datetime.fromisoformat(first["expiresAt"].replace("Z", "+00:00"))
    await asyncio.sleep(max((deadline - datetime.now(UTC)).total_seconds() + 0.3, 0))
    again = success(await device.request("sessions/open", payload))
    assert (again["sessionId"], again["idempotent"]) == (first["sessionId"], True)
    assert again["status"] == "open" and again["maxDurationHours"] == 12
    async with tenant_device(servers, tenant, sub=tenant.other_user) as colleague:
        theirs = await colleague.request("sessions/open", payload)
    assert theirs["status"] == "error", theirs
    assert theirs["error"]["code"] == "SESSION_ALREADY_OPEN", theirs
    assert theirs["error"]["details"]["sessionId"] == first["sessionId"]


@pytest.mark.parametrize("opener", ["owner", "colleague"])
async def test_an_open_that_finds_the_key_expired_announces_the_expiry(
    store: PostgresStore, database: str, opener: str
) -> None:
    """An open arriving after the old session's deadline but before the sweeper closes that
    session as expired itself: it must announce session.expired too (once), as the sweeper
    would have. The deadlines lie in the future of the real clock, so no sweeper gets there
    first: the open is given a later arrival."""
    tenant = await make_tenant(store)
    service = Service(store, Limits())
    owner = Principal(tenant.user, tenant.company_id)
    now = datetime.now(UTC).replace(microsecond=0)
    opened_at = iso_ms(now - timedelta(hours=1))
    old = await service.open_session(
        owner,
        OpenSession.model_validate(tenant.open_payload(openedAt=opened_at, maxDurationHours=2)),
        now,
    )
    who = owner if opener == "owner" else Principal(tenant.other_user, tenant.company_id)
    again = OpenSession.model_validate(tenant.open_payload(openedAt=opened_at, maxDurationHours=10))
    new = await service.open_session(who, again, now + timedelta(minutes=90))
    assert new["sessionId"] != old["sessionId"] and new["idempotent"] is False
    closed = await fetch(
        database,
        "SELECT status, close_reason, closed_at FROM production_sessions WHERE session_id = $1",
        old["sessionId"],
    )
    assert [tuple(r) for r in closed] == [("closed", "expired", now + timedelta(hours=1))]
    events = await fetch(
        database,
        "SELECT type, data FROM session_events WHERE session_id = $1 ORDER BY seq",
        old["sessionId"],
    )
    assert [e["type"] for e in events] == ["session.opened", "session.expired"]
    expired = orjson.loads(events[1]["data"])  # jsonb: text on a plain connection
    assert expired["status"] == "closed" and expired["closeReason"] == "expired"


async def test_a_null_bonus_opens_without_a_bonus(device: Device, tenant: Tenant) -> None:
    """`"bonus": null` opened with the project's bonus (10 % on the payroll amount) while the
    same null in an update clears the bonus: a form sending null for "no bonus" overpaid. At
    open it now means no bonus too; left out, the project's bonus applies (above)."""
    data = success(
        await device.request("sessions/open", tenant.open_payload(bonus=None, pricePerUnit=None))
    )
    assert data["bonus"] is None
    assert data["pricePerUnit"] == 5.5  # a null price cannot mean "no price": the project's
    sid = data["sessionId"]
    success(await device.request(f"sessions/{sid}/records", record(units=4)))
    got = success(await device.request(f"sessions/{sid}/get", {}))
    assert got["bonus"] is None
    assert got["totals"]["amount"] == 22  # 4 x 5.5, no 10 %
