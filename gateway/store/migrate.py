"""``gateway migrate``: apply ``migrations/NNN_name.sql`` in order, once, under an advisory lock."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from gateway.errors import StoreUnavailable
from gateway.resources import data_dir
from gateway.store.postgres import connect_error

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same for every process migrating this database.
ADVISORY_LOCK_KEY = 0x48594452  # "HYDR"
_NAME = re.compile(r"^(\d{3,})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """The migration files, ordered by version; refuses gaps in naming and duplicates."""
    folder = directory or data_dir("migrations")
    found: dict[int, Migration] = {}
    for path in sorted(folder.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise ValueError(f"migration {path.name} must be named NNN_snake_name.sql")
        version = int(match.group(1))
        if version in found:
            raise ValueError(f"two migrations share version {version}")
        found[version] = Migration(version, match.group(2), path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


# Closer than this to the deadline, the attempt just made was the last one (asyncio may wake
# a sleep a clock tick early: without a margin a sliver of time would buy another attempt).
LAST_ATTEMPT_MARGIN_S = 0.05


async def connect(dsn: str, wait_s: float = 0.0) -> asyncpg.Connection:
    """One connection; while PostgreSQL is unreachable, retry until ``wait_s`` seconds have
    passed, backing off from 0.5 s to 5 s between attempts, the last one at the deadline."""
    started = time.monotonic()
    deadline = started + wait_s
    delay = 0.5
    attempt = 1
    while True:
        try:
            conn: asyncpg.Connection = await asyncpg.connect(dsn)
            return conn
        except Exception as exc:
            err = connect_error(exc)
            left = deadline - time.monotonic()
            if not isinstance(err, StoreUnavailable):
                raise err from exc
            if left <= LAST_ATTEMPT_MARGIN_S:
                if attempt > 1:  # --wait ran out
                    waited = time.monotonic() - started
                    err = StoreUnavailable(f"{err} ({attempt} attempts in {waited:.1f} s)")
                raise err from exc
            pause = min(delay, left)
            log.warning(
                "waiting for PostgreSQL: %s (attempt %d failed; next in %.1f s, %.1f s left)",
                exc,
                attempt,
                pause,
                left,
            )
        await asyncio.sleep(pause)
        delay = min(delay * 2, 5.0)
        attempt += 1


async def migrate(dsn: str, directory: Path | None = None, *, wait_s: float = 0.0) -> list[int]:
    """Apply pending migrations; return the versions applied by this call."""
    migrations = load_migrations(directory)
    conn = await connect(dsn, wait_s)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", ADVISORY_LOCK_KEY)
        try:
            return await _apply(conn, migrations)
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", ADVISORY_LOCK_KEY)
    finally:
        await conn.close()


async def _apply(conn: asyncpg.Connection, migrations: list[Migration]) -> list[int]:
    await conn.execute(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version     integer PRIMARY KEY,
            name        text NOT NULL,
            checksum    text NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now()
        )
        """
    )
    rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
    applied = {r["version"]: r["checksum"] for r in rows}
    done: list[int] = []
    for m in migrations:
        if m.version in applied:
            if applied[m.version] != m.checksum:
                log.warning(
                    "migration %03d_%s changed after it was applied; "
                    "write a new migration instead of editing an applied one",
                    m.version,
                    m.name,
                )
            continue
        async with conn.transaction():
            await conn.execute(m.sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                m.version,
                m.name,
                m.checksum,
            )
        log.info("applied migration %03d_%s", m.version, m.name)
        done.append(m.version)
    return done
