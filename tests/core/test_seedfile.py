"""The seed file of SPEC §6: YAML or the same structure in JSON, checked before loading."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.core.models import Bonus
from gateway.core.seedfile import SeedFile, parse_seed
from gateway.errors import InvalidRequest

# Verbatim from SPEC §6.
SPEC_YAML = """\
companies:
  - {companyId: comp_12345, name: Demo Farms}
users:
  - {auth0Id: user_123456789, companyId: comp_12345}
projects:
  - projectId: proj_123
    companyId: comp_12345
    name: Berries 2025
    timezone: America/Mexico_City      # IANA name
    samplingUnit: box                  # defaults for sessions of this project
    pricePerUnit: 5.5
    bonus: {type: percent, value: 10, note: High quality bonus}
    maxDurationHours: 12
    sectors:
      - {sectorId: sector_001, sector_name: Lote A-1}
"""

SPEC_DATA: dict[str, Any] = {
    "companies": [{"companyId": "comp_12345", "name": "Demo Farms"}],
    "users": [{"auth0Id": "user_123456789", "companyId": "comp_12345"}],
    "projects": [
        {
            "projectId": "proj_123",
            "companyId": "comp_12345",
            "name": "Berries 2025",
            "timezone": "America/Mexico_City",
            "samplingUnit": "box",
            "pricePerUnit": 5.5,
            "bonus": {"type": "percent", "value": 10, "note": "High quality bonus"},
            "maxDurationHours": 12,
            "sectors": [{"sectorId": "sector_001", "sector_name": "Lote A-1"}],
        }
    ],
}


def check_spec_example(seed: SeedFile) -> None:
    assert [(c.companyId, c.name) for c in seed.companies] == [("comp_12345", "Demo Farms")]
    assert [(u.auth0Id, u.companyId) for u in seed.users] == [("user_123456789", "comp_12345")]
    (project,) = seed.projects
    assert project.projectId == "proj_123"
    assert project.companyId == "comp_12345"
    assert project.name == "Berries 2025"
    assert project.timezone == "America/Mexico_City"
    assert project.samplingUnit == "box"
    assert project.pricePerUnit == 5.5
    assert project.bonus == Bonus(type="percent", value=10, note="High quality bonus")
    assert project.maxDurationHours == 12
    assert [(s.sectorId, s.sector_name) for s in project.sectors] == [("sector_001", "Lote A-1")]


def test_spec_yaml_example() -> None:
    """The SPEC §6 YAML example parses to its companies, users, projects and sectors."""
    check_spec_example(parse_seed(SPEC_YAML, name="seed.yaml"))


def test_spec_example_as_json() -> None:
    """The same data as JSON (a name ending in .json) parses to the same seed."""
    seed = parse_seed(json.dumps(SPEC_DATA), name="seed.json")
    check_spec_example(seed)
    assert seed == parse_seed(SPEC_YAML, name="seed.yaml")


def test_yaml_default_name() -> None:
    """Without a name the text is read as YAML (which also reads JSON)."""
    check_spec_example(parse_seed(SPEC_YAML))
    check_spec_example(parse_seed(json.dumps(SPEC_DATA)))


@pytest.mark.parametrize(
    ("source", "name"),
    [
        (b"\xef\xbb\xbf" + json.dumps(SPEC_DATA).encode(), "seed.json"),
        (b"\xef\xbb\xbf" + SPEC_YAML.encode(), "seed.yaml"),
        ("\ufeff" + json.dumps(SPEC_DATA), "seed.json"),
        (SPEC_YAML.encode(), "seed.yaml"),
    ],
)
def test_utf8_bytes_and_a_byte_order_mark_are_read(source: str | bytes, name: str) -> None:
    """A file's UTF-8 bytes parse, with or without the byte order mark some editors write."""
    check_spec_example(parse_seed(source, name=name))


@pytest.mark.parametrize(
    ("data", "shown"),
    [
        (b"\xff\xfe\x00\x01", "byte 0xff at offset 0; it looks like UTF-16"),
        (b"\xef\xbb\xbfcompanies: [caf\xe9]", "byte 0xe9 at offset 18"),
    ],
)
def test_bytes_that_are_not_utf8_say_to_save_as_utf8(data: bytes, shown: str) -> None:
    """A file in another encoding is InvalidRequest naming the file, the byte and the remedy."""
    with pytest.raises(InvalidRequest) as info:
        parse_seed(data, name="bin.yaml")
    assert info.value.message.startswith("bin.yaml: not UTF-8 text")
    assert shown in info.value.message
    assert "save the file as UTF-8" in info.value.message


def test_empty_sections_and_project_defaults() -> None:
    """Sections may be absent; a project's optional settings have defaults."""
    seed = parse_seed(
        "companies: [{companyId: c1, name: C}]\n"
        "projects: [{projectId: p1, companyId: c1, name: P, timezone: UTC}]\n"
    )
    assert seed.users == []
    (project,) = seed.projects
    assert project.sectors == []
    assert project.bonus is None
    assert project.maxDurationHours > 0
    assert project.pricePerUnit >= 0


def with_changes(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A deep copy of SPEC_DATA with the item at ``path`` set to ``value``."""
    data: dict[str, Any] = json.loads(json.dumps(SPEC_DATA))
    node: Any = data
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    return data


@pytest.mark.parametrize("name", ["seed.yaml", "seed.json"])
@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        pytest.param(("projects", 0, "timezone"), "Mars/Olympus", "Mars/Olympus", id="bad-tz"),
        pytest.param(("projects", 0, "timezone"), "America", "America", id="tz-folder"),
        pytest.param(("projects", 0, "timezone"), "", "timezone", id="empty-tz"),
        pytest.param(("workers",), [], "workers", id="extra-top-level"),
        pytest.param(("companies", 0, "address"), "x", "address", id="extra-company-field"),
        pytest.param(("users", 0, "role"), "admin", "role", id="extra-user-field"),
        pytest.param(("projects", 0, "colour"), "red", "colour", id="extra-project-field"),
        pytest.param(("projects", 0, "sectors", 0, "area"), 3, "area", id="extra-sector-field"),
        pytest.param(("projects", 0, "bonus", "type"), "bogus", "bonus", id="bad-bonus"),
        pytest.param(("projects", 0, "pricePerUnit"), -1, "pricePerUnit", id="negative-price"),
        pytest.param(("projects", 0, "maxDurationHours"), 0, "maxDurationHours", id="zero-hours"),
        pytest.param(("companies", 0, "companyId"), "", "companyId", id="empty-company-id"),
        pytest.param(("projects", 0, "sectors", 0, "sectorId"), None, "sectorId", id="null-sector"),
    ],
)
def test_refusals_name_the_problem(
    path: tuple[Any, ...], value: Any, named: str, name: str
) -> None:
    """Bad timezones, bad values and extra fields are InvalidRequest naming them."""
    with pytest.raises(InvalidRequest) as info:
        parse_seed(json.dumps(with_changes(path, value)), name=name)
    assert named in info.value.message
    assert info.value.message.startswith(f"invalid seed file: {name}: ")


@pytest.mark.parametrize(
    ("path", "what"),
    [
        (("users", 0, "companyId"), "user user_123456789"),
        (("projects", 0, "companyId"), "project proj_123"),
    ],
)
def test_companies_outside_the_file_are_reported_for_the_store(
    path: tuple[Any, ...], what: str
) -> None:
    """A reference to a company not in the file is left for the database to confirm."""
    seed = parse_seed(json.dumps(with_changes(path, "comp_elsewhere")), name="seed.json")
    assert seed.company_references() == {what: "comp_elsewhere"}
    assert (
        parse_seed(json.dumps(with_changes(path, "comp_12345")), name="s.json").company_references()
        == {}
    )


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("companies: [unclosed", "seed.yaml"),
        ("{not json", "seed.json"),
        ("- just\n- a list\n", "seed.yaml"),
        ('["a list"]', "seed.json"),
        ("plain text", "seed.yaml"),
        ("", "seed.yaml"),
    ],
)
def test_unreadable_files(text: str, name: str) -> None:
    """Text that does not parse, or is not a mapping, is InvalidRequest naming the file."""
    with pytest.raises(InvalidRequest) as info:
        parse_seed(text, name=name)
    assert name in info.value.message


@pytest.mark.parametrize(
    ("section", "named"),
    [
        (("companies",), "companyId comp_12345"),
        (("users",), "auth0Id user_123456789"),
        (("projects",), "projectId proj_123"),
        (("projects", 0, "sectors"), "sectorId of project proj_123 sector_001"),
    ],
)
def test_an_id_given_twice_is_refused(section: tuple[Any, ...], named: str) -> None:
    """A second entry with the same id would silently overwrite the first: refused, named."""
    data: dict[str, Any] = json.loads(json.dumps(SPEC_DATA))
    node: Any = data
    for step in section:
        node = node[step]
    node.append({**node[0]})
    with pytest.raises(InvalidRequest) as info:
        parse_seed(json.dumps(data), name="seed.json")
    assert named in info.value.message
    assert "more than once" in info.value.message
