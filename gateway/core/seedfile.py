"""The seed file of SPEC §6 (YAML or the same structure in JSON), parsed and checked."""

from __future__ import annotations

from typing import Annotated

import orjson
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from gateway.core.models import BOM, MONEY_MAX, Bonus, Id, Name, validation_error
from gateway.core.rules import zone
from gateway.errors import InvalidRequest


class _Seed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SeedCompany(_Seed):
    companyId: Id
    name: Name


class SeedUser(_Seed):
    auth0Id: Annotated[str, Field(min_length=1, max_length=256)]
    companyId: Id


class SeedSector(_Seed):
    sectorId: Id
    sector_name: Name


class SeedProject(_Seed):
    projectId: Id
    companyId: Id
    name: Name
    timezone: str
    samplingUnit: Name = "unit"
    pricePerUnit: Annotated[float, Field(ge=0, le=MONEY_MAX, allow_inf_nan=False)] = 0
    bonus: Bonus | None = None
    maxDurationHours: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 12
    sectors: list[SeedSector] = []

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            zone(value)
        except InvalidRequest as exc:
            raise ValueError(exc.message) from None
        return value


class SeedFile(_Seed):
    companies: list[SeedCompany] = []
    users: list[SeedUser] = []
    projects: list[SeedProject] = []

    def duplicate_ids(self) -> str | None:
        """What appears twice (a second entry would silently overwrite the first), or None."""
        named: list[tuple[str, list[str]]] = [
            ("companyId", [c.companyId for c in self.companies]),
            ("auth0Id", [u.auth0Id for u in self.users]),
            ("projectId", [p.projectId for p in self.projects]),
        ]
        named += [
            (f"sectorId of project {p.projectId}", [s.sectorId for s in p.sectors])
            for p in self.projects
        ]
        for what, ids in named:
            twice = sorted({i for i in ids if ids.count(i) > 1})
            if twice:
                return f"{what} {', '.join(twice)} appears more than once: keep one entry"
        return None

    def company_references(self) -> dict[str, str]:
        """Companies named by users and projects but not defined in this file (what -> company).

        They must already exist in the database; the store checks.
        """
        known = {c.companyId for c in self.companies}
        refs = {f"user {u.auth0Id}": u.companyId for u in self.users}
        refs |= {f"project {p.projectId}": p.companyId for p in self.projects}
        return {what: company for what, company in refs.items() if company not in known}


def seed_text(data: bytes, *, name: str = "seed") -> str:
    """A seed file's bytes as text: UTF-8, a leading byte order mark dropped (as MQTT payloads
    may carry one); InvalidRequest says to save it as UTF-8 otherwise."""
    body = data.removeprefix(BOM)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = exc.start + len(data) - len(body)
        utf16 = "; it looks like UTF-16" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise InvalidRequest(
            f"{name}: not UTF-8 text (byte 0x{data[at]:02x} at offset {at}{utf16}): "
            "save the file as UTF-8"
        ) from None


def parse_seed(source: str | bytes, *, name: str = "seed") -> SeedFile:
    """A seed file from YAML or JSON text, or its bytes (UTF-8); InvalidRequest says what is
    wrong and where. A leading byte order mark is ignored."""
    text = (
        seed_text(source, name=name) if isinstance(source, bytes) else source.removeprefix("\ufeff")
    )
    try:
        data = orjson.loads(text) if name.endswith(".json") else yaml.safe_load(text)
    except (orjson.JSONDecodeError, yaml.YAMLError) as exc:
        raise InvalidRequest(f"{name}: cannot parse: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest(f"{name}: expected a mapping with companies, users and projects")
    try:
        seed = SeedFile.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, prefix=f"{name}: ", what="seed file") from None
    if (twice := seed.duplicate_ids()) is not None:
        raise InvalidRequest(f"{name}: {twice}")
    return seed
