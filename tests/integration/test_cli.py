"""The ``gateway`` command (SPEC §6) run as a subprocess: migrate, seed, token, run."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import shlex
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import orjson
import pytest

from tests.support.extra_helpers import (
    clean_env,
    fetch,
    fresh_database,
    run_cli,
    run_process,
)
from tests.support.servers import Servers
from tests.support.tenants import JWT_SECRET

MIGRATIONS = sorted((Path(__file__).resolve().parents[2] / "migrations").glob("*.sql"))

SEED_YAML = """\
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

SEED_JSON: dict[str, Any] = {
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

TABLES = ("companies", "users", "projects", "sectors")


@pytest.fixture
async def fresh(servers: Servers) -> AsyncIterator[str]:
    """A new, empty database (no schema)."""
    async with fresh_database(servers) as dsn:
        yield dsn


@pytest.fixture
async def migrated(servers: Servers) -> AsyncIterator[str]:
    """A new database migrated by ``gateway migrate``."""
    async with fresh_database(servers) as dsn:
        done = await run_cli("migrate", env=clean_env(GATEWAY_DATABASE_URL=dsn))
        assert done.returncode == 0, done
        yield dsn


async def applied_versions(dsn: str) -> list[int]:
    rows = await fetch(dsn, "SELECT version FROM schema_migrations ORDER BY version")
    return [int(r["version"]) for r in rows]


async def table_state(dsn: str) -> dict[str, list[tuple[Any, ...]]]:
    """Every row (with its xmin, so a rewrite shows) of the seeded tables."""
    out: dict[str, list[tuple[Any, ...]]] = {}
    for table in TABLES:
        rows = await fetch(dsn, f"SELECT xmin::text AS xmin, * FROM {table} ORDER BY 2, 3")
        out[table] = [tuple(r.values()) for r in rows]
    return out


async def test_migrate_applies_once(fresh: str) -> None:
    """``migrate`` on a fresh database applies every migration; a second run applies nothing."""
    env = clean_env(GATEWAY_DATABASE_URL=fresh)
    first = await run_cli("migrate", env=env)
    assert first.returncode == 0, first
    assert f"applied {len(MIGRATIONS)} migration" in first.stdout, first
    versions = await applied_versions(fresh)
    assert versions == [int(p.name[:3]) for p in MIGRATIONS]
    assert versions[0] == 1
    tables = await fetch(
        fresh,
        "SELECT count(*) AS n FROM information_schema.tables WHERE table_name = ANY($1::text[])",
        ["production_sessions", "production_records", "dead_letters", *TABLES],
    )
    assert tables[0]["n"] == 7
    second = await run_cli("migrate", env=env)
    assert second.returncode == 0, second
    assert "applied 0 migration" in second.stdout
    assert await applied_versions(fresh) == versions


async def test_concurrent_migrate_processes(fresh: str) -> None:
    """Two ``migrate`` processes at once on a fresh database: both exit 0, each migration once."""
    env = clean_env(GATEWAY_DATABASE_URL=fresh)
    results = await asyncio.gather(run_cli("migrate", env=env), run_cli("migrate", env=env))
    for r in results:
        assert r.returncode == 0, r
    applied = sorted(r.stdout for r in results)
    assert applied.count("applied 0 migration(s)\n") == len(results) - 1, applied
    rows = await fetch(
        fresh, "SELECT version, count(*) AS n FROM schema_migrations GROUP BY version"
    )
    assert sorted(int(r["version"]) for r in rows) == [int(p.name[:3]) for p in MIGRATIONS]
    assert all(r["n"] == 1 for r in rows)


async def test_seed_yaml_then_json_changes_nothing(migrated: str, tmp_path: Path) -> None:
    """The SPEC §6 seed in YAML, then the same data as JSON: the second load changes nothing."""
    env = clean_env(GATEWAY_DATABASE_URL=migrated)
    yaml_file = tmp_path / "tenants.yaml"
    yaml_file.write_text(SEED_YAML)
    first = await run_cli("seed", str(yaml_file), env=env)
    assert first.returncode == 0, first
    assert "(4 row(s) new or changed)" in first.stdout, first
    counts = {t: len(rows) for t, rows in (await table_state(migrated)).items()}
    assert counts == {"companies": 1, "users": 1, "projects": 1, "sectors": 1}
    project = (await fetch(migrated, "SELECT * FROM projects WHERE project_id = 'proj_123'"))[0]
    assert project["company_id"] == "comp_12345"
    assert project["timezone"] == "America/Mexico_City"
    assert project["sampling_unit"] == "box"
    assert float(project["price_per_unit"]) == 5.5
    assert project["max_duration_hours"] == 12
    assert json.loads(project["bonus"]) == {
        "type": "percent",
        "value": 10,
        "note": "High quality bonus",
    }
    sector = (await fetch(migrated, "SELECT * FROM sectors"))[0]
    assert (sector["project_id"], sector["sector_id"], sector["sector_name"]) == (
        "proj_123",
        "sector_001",
        "Lote A-1",
    )
    before = await table_state(migrated)

    json_file = tmp_path / "tenants.json"
    json_file.write_text(json.dumps(SEED_JSON))
    second = await run_cli("seed", str(json_file), env=env)
    assert second.returncode == 0, second
    assert "(0 row(s) new or changed)" in second.stdout, second
    assert await table_state(migrated) == before
    third = await run_cli("seed", str(yaml_file), env=env)
    assert third.returncode == 0, third
    assert await table_state(migrated) == before


async def test_seed_with_unknown_company_is_refused(migrated: str, tmp_path: Path) -> None:
    """A seed naming a company it does not define: exit 2, a clear message, nothing loaded."""
    env = clean_env(GATEWAY_DATABASE_URL=migrated)
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "companies:\n  - {companyId: comp_1, name: One}\n"
        "users:\n  - {auth0Id: user_1, companyId: comp_missing}\n"
    )
    done = await run_cli("seed", str(bad), env=env)
    assert done.returncode == 2, done
    assert "comp_missing" in done.stderr
    assert "Traceback" not in done.stderr
    counts = {t: len(rows) for t, rows in (await table_state(migrated)).items()}
    assert counts == dict.fromkeys(TABLES, 0)


async def test_seed_refuses_a_project_duration_above_the_limit(
    migrated: str, tmp_path: Path
) -> None:
    """A project default above GATEWAY_MAX_SESSION_HOURS would make every open without an
    explicit maxDurationHours fail: the seed is refused naming both, nothing loaded."""
    env = clean_env(GATEWAY_DATABASE_URL=migrated, GATEWAY_MAX_SESSION_HOURS="24")
    bad = tmp_path / "long.yaml"
    bad.write_text(
        "companies:\n  - {companyId: comp_1, name: One}\n"
        "projects:\n  - {projectId: proj_1, companyId: comp_1, name: P, "
        "timezone: UTC, maxDurationHours: 36}\n"
    )
    done = await run_cli("seed", str(bad), env=env)
    assert done.returncode == 2, done
    assert "proj_1" in done.stderr and "GATEWAY_MAX_SESSION_HOURS" in done.stderr
    assert "Traceback" not in done.stderr
    counts = {t: len(rows) for t, rows in (await table_state(migrated)).items()}
    assert counts == dict.fromkeys(TABLES, 0)
    ok = await run_cli("seed", str(bad), env=clean_env(GATEWAY_DATABASE_URL=migrated))
    assert ok.returncode == 0, ok  # within the default limit of 48


async def test_seed_with_missing_or_broken_file_is_refused(migrated: str, tmp_path: Path) -> None:
    """A missing file or one that is not YAML/JSON: exit 2 with a message naming the file."""
    env = clean_env(GATEWAY_DATABASE_URL=migrated)
    missing = await run_cli("seed", str(tmp_path / "nope.yaml"), env=env)
    assert missing.returncode == 2, missing
    assert "nope.yaml" in missing.stderr
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    done = await run_cli("seed", str(broken), env=env)
    assert done.returncode == 2, done
    assert "broken.json" in done.stderr
    assert "Traceback" not in done.stderr + missing.stderr


async def test_seed_file_in_another_encoding_or_a_folder_is_refused(
    migrated: str, tmp_path: Path
) -> None:
    """Not UTF-8: one line saying to save it as UTF-8 (no traceback); a folder is named as
    one; a JSON file starting with a UTF-8 byte order mark loads."""
    env = clean_env(GATEWAY_DATABASE_URL=migrated)
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01")
    done = await run_cli("seed", str(binary), env=env)
    assert done.returncode == 2, done
    assert "bin.yaml: not UTF-8 text" in done.stderr and "save the file as UTF-8" in done.stderr
    assert "Traceback" not in done.stderr
    folder = await run_cli("seed", str(tmp_path), env=env)
    assert folder.returncode == 2, folder
    assert "is a directory" in folder.stderr and "not found" not in folder.stderr
    bom = tmp_path / "tenants.json"
    bom.write_bytes(b"\xef\xbb\xbf" + orjson.dumps(SEED_JSON))
    ok = await run_cli("seed", str(bom), env=env)
    assert ok.returncode == 0, ok
    assert "(4 row(s) new or changed)" in ok.stdout, ok


async def test_token_mints_a_verifiable_jwt() -> None:
    """``token --sub user_x --ttl 1h`` prints an HS256 JWT for user_x expiring in an hour."""
    env = clean_env(GATEWAY_JWT_SECRET=JWT_SECRET)
    done = await run_cli("token", "--sub", "user_x", "--ttl", "1h", env=env)
    assert done.returncode == 0, done
    token = done.stdout.strip()
    assert token.count(".") == 2
    assert jwt.get_unverified_header(token)["alg"] == "HS256"
    claims = jwt.decode(token, JWT_SECRET, algorithms=["HS256"])
    assert claims["sub"] == "user_x"
    assert abs(claims["exp"] - (time.time() + 3600)) < 120
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "x" * 40, algorithms=["HS256"])


async def test_token_without_secret_names_the_variable() -> None:
    """``token`` without GATEWAY_JWT_SECRET: exit 2 and a message naming GATEWAY_JWT_SECRET."""
    done = await run_cli("token", "--sub", "user_x", env=clean_env())
    assert done.returncode == 2, done
    assert "GATEWAY_JWT_SECRET" in done.stderr
    assert done.stdout.strip() == ""
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("sub", ["", "   "])
async def test_token_for_nobody_is_refused(sub: str) -> None:
    """``token --sub ''`` minted a token with an empty sub: a usage error now."""
    done = await run_cli("token", "--sub", sub, env=clean_env(GATEWAY_JWT_SECRET=JWT_SECRET))
    assert done.returncode == 2, done
    assert "--sub" in done.stderr and done.stdout.strip() == ""


@pytest.mark.parametrize("ttl", ["soon", "0", "10000000000h", "367d"])
async def test_token_with_bad_ttl_is_refused(ttl: str) -> None:
    """``token --ttl soon`` (or zero, or over a year) is a usage error (exit 2)."""
    done = await run_cli(
        "token", "--sub", "user_x", "--ttl", ttl, env=clean_env(GATEWAY_JWT_SECRET=JWT_SECRET)
    )
    assert done.returncode == 2, done
    assert ttl in done.stderr


@pytest.mark.parametrize("url", ["http://127.0.0.1:1883", "mqtt://", "not a url"])
async def test_run_with_invalid_mqtt_url_names_the_variable(
    servers: Servers, database: str, url: str
) -> None:
    """``run`` with an invalid GATEWAY_MQTT_URL: exit 2 and a message naming the variable."""
    env = clean_env(
        GATEWAY_DATABASE_URL=database, GATEWAY_JWT_SECRET=JWT_SECRET, GATEWAY_MQTT_URL=url
    )
    done = await run_cli("run", env=env, timeout=60)
    assert done.returncode == 2, done
    assert "GATEWAY_MQTT_URL" in done.stderr
    assert "Traceback" not in done.stderr


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_run_stops_on_sigterm_while_the_broker_is_unreachable(database: str) -> None:
    """Waiting for a broker that never answers, SIGTERM still ends ``run`` (exit 0)."""
    env = clean_env(
        GATEWAY_DATABASE_URL=database,
        GATEWAY_JWT_SECRET=JWT_SECRET,
        GATEWAY_MQTT_URL=f"mqtt://127.0.0.1:{closed_port()}",
        GATEWAY_HTTP_PORT="0",
        GATEWAY_LOG_FORMAT="text",
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "run",
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        async with asyncio.timeout(60):
            while "mqtt connection" not in (line := (await proc.stderr.readline()).decode()):
                assert line, "run ended before trying the broker:\n" + "".join(seen)
                seen.append(line)
        proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            raise AssertionError("SIGTERM did not stop a gateway waiting for its broker") from None
        assert code == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_run_with_the_http_port_taken_names_the_variable(database: str) -> None:
    """Another process on GATEWAY_HTTP_PORT: exit 2 naming the variable, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = clean_env(
            GATEWAY_DATABASE_URL=database,
            GATEWAY_JWT_SECRET=JWT_SECRET,
            GATEWAY_MQTT_URL=f"mqtt://127.0.0.1:{closed_port()}",
            GATEWAY_HTTP_PORT=str(taken.getsockname()[1]),
        )
        done = await run_cli("run", env=env, timeout=60)
    assert done.returncode == 2, done
    assert "GATEWAY_HTTP_PORT" in done.stderr
    assert "Traceback" not in done.stderr


async def test_migrate_without_a_database_says_what_to_check(servers: Servers) -> None:
    """Nothing listening, or no such database: a one-line error each, no traceback."""
    down = clean_env(GATEWAY_DATABASE_URL=f"postgresql://x@127.0.0.1:{closed_port()}/x")
    done = await run_cli("migrate", "--wait", "1", env=down, timeout=60)
    assert done.returncode == 1, done
    assert "waiting for PostgreSQL" in done.stderr  # --wait retried before giving up
    assert "Is PostgreSQL running" in done.stderr
    assert "Traceback" not in done.stderr
    missing = clean_env(GATEWAY_DATABASE_URL=servers.dsn("no_such_database"))
    for command in (["migrate"], ["dead-letters"]):
        done = await run_cli(*command, env=missing, timeout=60)
        assert done.returncode == 2, (command, done)
        assert "GATEWAY_DATABASE_URL" in done.stderr
        assert "Traceback" not in done.stderr


async def test_migrate_wait_keeps_trying_until_its_deadline() -> None:
    """``--wait 3`` with nothing listening: attempts until the 3 s are up, the last one at the
    deadline (it used to stop at 1.5 s, as the next backoff step would pass it), then one
    error line saying how many attempts were made."""
    down = clean_env(GATEWAY_DATABASE_URL=f"postgresql://x@127.0.0.1:{closed_port()}/x")
    began = time.monotonic()
    done = await run_cli("migrate", "--wait", "3", env=down, timeout=60)
    took = time.monotonic() - began
    assert done.returncode == 1, done
    assert took >= 2.7, (took, done.stderr)
    waits = re.findall(r"attempt (\d+) failed; next in ([\d.]+) s, ([\d.]+) s left", done.stderr)
    assert [int(n) for n, _, _ in waits] == list(range(1, len(waits) + 1)), done.stderr
    _, pause, left = waits[-1]
    assert pause == left, done.stderr  # the last sleep ends at the deadline
    gave_up = re.search(r"\((\d+) attempts in ([\d.]+) s\)", done.stderr)
    assert gave_up, done.stderr
    assert int(gave_up[1]) == len(waits) + 1 and float(gave_up[2]) >= 2.9, done.stderr
    assert "Is PostgreSQL running" in done.stderr and "Traceback" not in done.stderr


async def test_dead_letters_into_a_closed_pipe_ends_quietly(migrated: str) -> None:
    """``gateway dead-letters | head -c 100``: no BrokenPipeError traceback."""
    conn = await asyncpg.connect(migrated)
    try:
        await conn.execute(
            """INSERT INTO dead_letters (topic, reason, message, payload, payload_size)
               SELECT 'hydrobit/v2/records/bulk', 'VALIDATION_ERROR', 'bad', $1, 5000
               FROM generate_series(1, 300)""",
            b"x" * 5000,
        )
    finally:
        await conn.close()
    argv = [sys.executable, "-m", "gateway.cli", "dead-letters", "--json", "--limit", "300"]
    cmd = " ".join(shlex.quote(a) for a in argv) + " | head -c 100 >/dev/null"
    done = await run_process(
        ["bash", "-o", "pipefail", "-c", cmd], env=clean_env(GATEWAY_DATABASE_URL=migrated)
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert "BrokenPipeError" not in done.stderr, done.stderr


async def test_dead_letters_keep_bytes_that_are_not_utf8_recoverable(migrated: str) -> None:
    """Garbage bytes are shown as bytes (b'\\xff...'), and --json gives them back exactly."""
    garbage = b"\xff\xfe\x00\x01garbage"
    conn = await asyncpg.connect(migrated)
    try:
        await conn.execute(
            """INSERT INTO dead_letters (topic, reason, message, payload, payload_size)
               VALUES ('hydrobit/v2/sessions/open', 'VALIDATION_ERROR', 'not UTF-8', $1, 12)""",
            garbage,
        )
    finally:
        await conn.close()
    env = clean_env(GATEWAY_DATABASE_URL=migrated)
    text = await run_cli("dead-letters", env=env)
    assert text.returncode == 0, text
    assert r"payload=b'\xff\xfe\x00\x01garbage'" in text.stdout
    as_json = await run_cli("dead-letters", "--json", env=env)
    row = orjson.loads(as_json.stdout.splitlines()[0])
    assert base64.b64decode(row["payloadBase64"]) == garbage
    capped = await run_cli("dead-letters", "--limit", "1", env=env)
    assert "1 dead letter(s) (the newest 1: --limit to see more)" in capped.stderr, capped


async def test_dead_letters_prune_before_deletes_only_older_rows(migrated: str) -> None:
    """``dead-letters --prune-before 30d`` deletes what is older than 30 days, nothing newer."""
    conn = await asyncpg.connect(migrated)
    try:
        await conn.execute(
            """INSERT INTO dead_letters (received_at, topic, reason, payload, payload_size)
               SELECT now() - make_interval(days => d), 't', 'VALIDATION_ERROR', '', 0
               FROM unnest(ARRAY[1, 29, 31, 90]) AS d"""
        )
        env = clean_env(GATEWAY_DATABASE_URL=migrated)
        done = await run_cli("dead-letters", "--prune-before", "30d", env=env)
        assert done.returncode == 0, done
        assert "deleted 2 dead letter(s)" in done.stdout
        ages = await conn.fetch(
            "SELECT extract(day FROM now() - received_at)::int AS d FROM dead_letters ORDER BY 1"
        )
    finally:
        await conn.close()
    assert [r["d"] for r in ages] == [1, 29]


async def test_seed_and_dead_letters_on_an_unmigrated_database_say_to_migrate(
    fresh: str, tmp_path: Path
) -> None:
    """No traceback: exit 2 and the command to run."""
    env = clean_env(GATEWAY_DATABASE_URL=fresh)
    seed = tmp_path / "seed.yaml"
    seed.write_text("companies:\n  - {companyId: comp_1, name: One}\n")
    for args in (["seed", str(seed)], ["dead-letters"], ["dead-letters", "--prune-before", "1d"]):
        done = await run_cli(*args, env=env)
        assert done.returncode == 2, (args, done)
        assert "gateway migrate" in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr, (args, done.stderr)


async def test_prune_takes_no_filter_and_limit_must_be_positive(migrated: str) -> None:
    """`--prune-before 1s --reason X` deleted every row, the filter ignored: now refused, and
    nothing deleted; `--limit -1` is refused by name."""
    conn = await asyncpg.connect(migrated)
    try:
        await conn.execute(
            """INSERT INTO dead_letters (received_at, topic, reason, payload, payload_size)
               SELECT now() - interval '1 day', 't', r, '', 0
               FROM unnest(ARRAY['UNAUTHORIZED', 'VALIDATION_ERROR']) AS r"""
        )
        env = clean_env(GATEWAY_DATABASE_URL=migrated)
        for extra in (["--reason", "UNAUTHORIZED"], ["--since", "2d"], ["--limit", "5"]):
            done = await run_cli("dead-letters", "--prune-before", "1s", *extra, env=env)
            assert done.returncode == 2, (extra, done)
            assert "--prune-before deletes by age alone" in done.stderr
        assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 2
        bad = await run_cli("dead-letters", "--limit", "-1", env=env)
        assert bad.returncode == 2, bad
        assert "not a positive whole number" in bad.stderr
        assert "Traceback" not in bad.stderr
    finally:
        await conn.close()


async def test_dead_letters_reason_is_an_error_code_in_any_case(migrated: str) -> None:
    """`--reason validation_error` listed nothing (the codes are stored upper case) and
    `--reason BOGUS` said "0 dead letter(s)": any case is taken, an unknown code refused."""
    conn = await asyncpg.connect(migrated)
    try:
        await conn.execute(
            """INSERT INTO dead_letters (topic, reason, message, payload, payload_size)
               VALUES ('reason-case-test', 'RATE_LIMITED', 'slow down', '', 0)"""
        )
    finally:
        await conn.close()
    env = clean_env(GATEWAY_DATABASE_URL=migrated)
    found = await run_cli("dead-letters", "--reason", "rate_limited", env=env)
    assert found.returncode == 0, found
    assert "reason-case-test" in found.stdout
    bogus = await run_cli("dead-letters", "--reason", "BOGUS", env=env)
    assert bogus.returncode == 2, bogus
    assert "'BOGUS' is not an error code" in bogus.stderr and "RATE_LIMITED" in bogus.stderr
