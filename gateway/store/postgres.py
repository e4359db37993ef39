"""PostgreSQL adapter: every query the gateway runs, on one asyncpg pool.

The database is the final word: uniqueness (one open session per key, one ledger row per
idempotency key) comes from constraints, and record inserts are guarded by the session's version
so a decision made on a stale snapshot never commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import date, datetime
from decimal import Decimal
from typing import Any, NamedTuple

import asyncpg
import orjson

from gateway.core.events import SessionEvent
from gateway.core.rules import SessionFacts
from gateway.core.seedfile import SeedFile
from gateway.core.views import Record, Session, Totals, WorkerTotals
from gateway.errors import ConfigError, InvalidRequest, StoreUnavailable

log = logging.getLogger(__name__)

# SQLSTATE classes worth a retry: connection, transaction rollback (deadlock, serialization),
# insufficient resources, operator intervention (shutdown, cannot connect now), system error.
_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58")
HOT_CONNECTIONS = 4  # at least GATEWAY_PIPELINE_DEPTH, plus room for the REST mirror
VOID_ID_ATTEMPTS = 3  # a counter-movement whose new id clashes with a stored one draws again


def is_transient(exc: BaseException) -> bool:
    """Worth a retry on a fresh connection: the database or the link to it failed, not us.

    ``InternalClientError`` is asyncpg's "cannot switch to state ...; another operation is in
    progress": on a fast shutdown the server's FATAL arrives on an idle connection and the next
    query meets it before the connection is seen closed. It is an outage, not a bug.
    """
    if isinstance(exc, asyncpg.PostgresError):
        return str(getattr(exc, "sqlstate", "") or "")[:2] in _TRANSIENT_CLASSES
    return isinstance(
        exc,
        OSError
        | asyncpg.InterfaceError
        | asyncpg.InternalClientError
        | TimeoutError
        | ConnectionError,
    )


def connect_error(exc: Exception) -> Exception:
    """What a failed connect means to the person running us: wait and retry (StoreUnavailable),
    fix the configuration (ConfigError: no such database, user or password), or a bug."""
    if is_transient(exc):
        return StoreUnavailable(f"cannot connect to PostgreSQL: {exc}")
    if isinstance(exc, asyncpg.PostgresError):
        return ConfigError(
            f"PostgreSQL refused the connection: {exc} (SQLSTATE {exc.sqlstate}); "
            "check the database, user and password in GATEWAY_DATABASE_URL"
        )
    return exc


@dataclass(frozen=True, slots=True)
class Project:
    project_id: str
    company_id: str
    name: str
    timezone: str
    sampling_unit: str
    price_per_unit: Decimal
    bonus: dict[str, Any] | None
    max_duration_hours: float


@dataclass(frozen=True, slots=True)
class NewSession:
    session_id: str
    company_id: str
    project_id: str
    owner: str
    sector_id: str | None
    sector_name: str | None
    timezone: str
    day: date
    opened_at: datetime
    max_duration_hours: float
    expires_at: datetime
    sampling_unit: str
    price_per_unit: Decimal
    bonus: dict[str, Any] | None
    notes: str | None


class NewRecord(NamedTuple):
    """A ledger row to insert; a tuple, so the batch serialises straight to a JSON array."""

    record_id: str
    company_id: str
    session_id: str
    owner: str
    worker_id: str
    worker_name: str
    units: float
    recorded_at: datetime
    client_event_id: str
    idempotency_key: str | None
    expected_version: int


_SESSION_COLUMNS = """
    s.session_id, s.company_id, s.project_id, s.owner_id, s.sector_id, s.sector_name, s.timezone,
    s.day, s.status, s.close_reason, s.opened_at, s.closed_at, s.max_duration_hours,
    s.sampling_unit, s.price_per_unit, s.bonus, s.notes, s.version, s.total_units,
    s.total_records, s.total_voided, s.total_workers
"""
_FACTS_COLUMNS = """
    session_id, company_id, owner_id, status, opened_at, closed_at, close_reason,
    max_duration_hours, version
"""
_RECORD_COLUMNS = """
    record_id, session_id, company_id, owner_id, worker_id, worker_name, units, recorded_at,
    client_event_id, idempotency_key, kind, state, void_of, void_reason, voided_by, created_at
"""

_INSERT_RECORDS = """
WITH input AS (
    SELECT e->>0 AS record_id, e->>1 AS company_id, e->>2 AS session_id, e->>3 AS owner_id,
           e->>4 AS worker_id, e->>5 AS worker_name, (e->>6)::float8 AS units,
           (e->>7)::timestamptz AS recorded_at, e->>8 AS client_event_id,
           e->>9 AS idempotency_key, (e->>10)::int8 AS expected_version, n
    FROM jsonb_array_elements($1::text::jsonb) WITH ORDINALITY AS a(e, n)
),
locked AS (
    SELECT s.session_id, s.version
    FROM production_sessions s
    WHERE s.session_id IN (SELECT DISTINCT session_id FROM input)
    ORDER BY s.session_id
    FOR NO KEY UPDATE
),
ins AS (
    INSERT INTO production_records (
        record_id, company_id, session_id, owner_id, worker_id, worker_name, units,
        recorded_at, client_event_id, idempotency_key)
    SELECT i.record_id, i.company_id, i.session_id, i.owner_id, i.worker_id, i.worker_name,
           i.units::numeric, i.recorded_at, i.client_event_id, i.idempotency_key
    FROM input i
    JOIN locked l ON l.session_id = i.session_id AND l.version = i.expected_version
    ORDER BY i.n  -- arrival order: of two records with one key, the first sent goes in
    ON CONFLICT DO NOTHING
    RETURNING record_id, session_id, worker_id, units
),
wd AS (
    SELECT session_id, worker_id, sum(units) AS units, count(*) AS n
    FROM ins GROUP BY session_id, worker_id
),
wk AS (
    INSERT INTO session_worker_totals AS w (session_id, worker_id, units, records, last_added)
    SELECT session_id, worker_id, units, n, n FROM wd ORDER BY session_id, worker_id
    ON CONFLICT (session_id, worker_id) DO UPDATE
        SET units = w.units + excluded.units, records = w.records + excluded.records,
            last_added = excluded.records
    RETURNING w.session_id, (w.records - w.last_added - w.voided = 0) AS first_active
),
sd AS (
    SELECT u.session_id, u.units, u.n, coalesce(k.new_workers, 0) AS new_workers
    FROM (SELECT session_id, sum(units) AS units, sum(n) AS n FROM wd GROUP BY session_id) u
    LEFT JOIN (SELECT session_id, count(*) FILTER (WHERE first_active) AS new_workers
               FROM wk GROUP BY session_id) k USING (session_id)
),
upd AS (
    UPDATE production_sessions s
    SET total_units = s.total_units + sd.units,
        total_records = s.total_records + sd.n,
        total_workers = s.total_workers + sd.new_workers,
        state_tick = nextval('session_state_tick'),
        -- unchanged while open: no indexed column moves, a HOT update (see state_ticks)
        state_xid = CASE WHEN s.status = 'open' THEN s.state_xid
                         ELSE pg_current_xact_id()::text::bigint END,
        updated_at = now()
    FROM sd WHERE s.session_id = sd.session_id
    RETURNING s.session_id
)
SELECT coalesce(array_agg(record_id), '{}') FROM ins
"""


def _rows(status: str) -> int:
    """The row count of a command status such as ``INSERT 0 1``."""
    return int(status.rsplit(" ", 1)[-1])


def _facts(row: asyncpg.Record) -> SessionFacts:
    return SessionFacts(
        session_id=row["session_id"],
        company_id=row["company_id"],
        owner=row["owner_id"],
        status=row["status"],
        opened_at=row["opened_at"],
        closed_at=row["closed_at"],
        close_reason=row["close_reason"],
        max_duration_hours=row["max_duration_hours"],
        version=row["version"],
    )


def _session(row: asyncpg.Record, workers: Iterable[asyncpg.Record] = ()) -> Session:
    return Session(
        facts=_facts(row),
        project_id=row["project_id"],
        sector_id=row["sector_id"],
        sector_name=row["sector_name"],
        timezone=row["timezone"],
        day=row["day"],
        sampling_unit=row["sampling_unit"],
        price_per_unit=row["price_per_unit"],
        bonus=row["bonus"],
        notes=row["notes"],
        totals=Totals(
            units=row["total_units"],
            records=row["total_records"],
            voided=row["total_voided"],
            workers=row["total_workers"],
            by_worker={
                w["worker_id"]: WorkerTotals(w["units"], w["records"], w["voided"]) for w in workers
            },
        ),
    )


async def _insert_events(conn: asyncpg.Connection, events: Sequence[SessionEvent]) -> None:
    """Write ``events`` to the outbox in the caller's transaction."""
    if not events:
        return
    await conn.execute(
        """INSERT INTO session_events (event_id, session_id, type, at, data)
           SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::timestamptz[],
                                $5::json[])""",
        [e.event_id for e in events],
        [e.session_id for e in events],
        [e.type for e in events],
        [e.at for e in events],
        [e.data for e in events],
    )


async def _workers(conn: asyncpg.Connection, session_id: str) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await conn.fetch(
        "SELECT worker_id, units, records, voided FROM session_worker_totals WHERE session_id = $1",
        session_id,
    )
    return rows


def _record(row: asyncpg.Record) -> Record:
    return Record(
        record_id=row["record_id"],
        session_id=row["session_id"],
        company_id=row["company_id"],
        owner=row["owner_id"],
        worker_id=row["worker_id"],
        worker_name=row["worker_name"],
        units=row["units"],
        recorded_at=row["recorded_at"],
        client_event_id=row["client_event_id"],
        idempotency_key=row["idempotency_key"],
        kind=row["kind"],
        state=row["state"],
        void_of=row["void_of"],
        void_reason=row["void_reason"],
        voided_by=row["voided_by"],
        created_at=row["created_at"],
    )


async def _init_connection(conn: asyncpg.Connection) -> None:
    # json (the outbox's event data: keys stay in the order written) and jsonb alike
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(
            kind,
            encoder=lambda v: orjson.dumps(v).decode(),
            decoder=orjson.loads,
            schema="pg_catalog",
        )


class PostgresStore:
    """All of the gateway's SQL. Transient failures surface as ``StoreUnavailable``."""

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self._pool = pool
        self._dsn = dsn
        # The hot path (the pipeline's batches) runs on one dedicated connection: a pooled
        # query costs a second round trip (asyncpg resets the connection on release).
        self._hot: list[asyncpg.Connection | None] = [None] * HOT_CONNECTIONS
        self._hot_free: asyncio.Queue[int] = asyncio.Queue()
        for slot in range(HOT_CONNECTIONS):
            self._hot_free.put_nowait(slot)

    @classmethod
    async def connect(
        cls, dsn: str, *, max_size: int = 8, command_timeout_s: float = 60
    ) -> PostgresStore:
        """``command_timeout_s`` bounds each statement on the pool's connections (the hot
        path's own connections keep 60 s): a REST call to a hung database answers 503 then."""
        try:
            pool = await asyncpg.create_pool(
                dsn,
                min_size=1,
                max_size=max_size,
                init=_init_connection,
                command_timeout=command_timeout_s,
                max_inactive_connection_lifetime=300,
            )
        except Exception as exc:
            raise connect_error(exc) from exc
        return cls(pool, dsn)

    async def close(self) -> None:
        for i, conn in enumerate(self._hot):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 5)
                self._hot[i] = None
        await self._pool.close()

    def terminate(self) -> None:
        for conn in self._hot:
            if conn is not None:
                conn.terminate()
        self._pool.terminate()

    @asynccontextmanager
    async def _hot_conn(self) -> AsyncIterator[asyncpg.Connection]:
        """A dedicated hot-path connection, (re)opened on demand, one user at a time each."""
        slot = await self._hot_free.get()
        try:
            conn = self._hot[slot]
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(self._dsn, command_timeout=60)
                await _init_connection(conn)
                self._hot[slot] = conn
            yield conn
        except Exception as exc:
            if is_transient(exc):
                broken = self._hot[slot]
                if broken is not None:
                    broken.terminate()
                self._hot[slot] = None
                raise StoreUnavailable(f"PostgreSQL unavailable: {exc}") from exc
            raise
        finally:
            self._hot_free.put_nowait(slot)

    async def listen(
        self, channels: dict[str, Callable[[str], None]], on_reset: Callable[[], None]
    ) -> None:
        """Deliver NOTIFY payloads of ``channels`` until cancelled, reconnecting as needed.

        ``on_reset`` runs whenever notifications may have been missed (every (re)connect):
        callers drop what they cached.
        """
        delay = 0.5
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn)
                for channel, handler in channels.items():
                    await conn.add_listener(
                        channel, lambda _c, _p, _ch, payload, h=handler: h(payload)
                    )
                on_reset()
                delay = 0.5
                while not conn.is_closed():
                    await asyncio.sleep(5)
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), 10)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("cache notifications interrupted (%s); caches cleared", exc)
                on_reset()
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10)

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[asyncpg.Connection]:
        try:
            async with self._pool.acquire(timeout=30) as conn:
                yield conn
        except StoreUnavailable:
            raise
        except Exception as exc:
            if is_transient(exc):
                raise StoreUnavailable(f"PostgreSQL unavailable: {exc}") from exc
            raise

    async def schema_version(self) -> int | None:
        """The latest migration applied, None on a database never migrated."""
        async with self._conn() as conn:
            if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
                return None
            version: int | None = await conn.fetchval("SELECT max(version) FROM schema_migrations")
        return version

    async def ping(self) -> None:
        async with self._conn() as conn:
            await conn.fetchval("SELECT 1")

    # tenants ------------------------------------------------------------------------------

    async def companies_of(self, subs: Sequence[str]) -> dict[str, str]:
        async with self._hot_conn() as conn:
            rows = await conn.fetch(
                "SELECT auth0_id, company_id FROM users WHERE auth0_id = ANY($1::text[])",
                list(subs),
            )
        return {r["auth0_id"]: r["company_id"] for r in rows}

    async def project(self, project_id: str) -> Project | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                """SELECT project_id, company_id, name, timezone, sampling_unit, price_per_unit,
                          bonus, max_duration_hours
                   FROM projects WHERE project_id = $1""",
                project_id,
            )
        return Project(**dict(row)) if row else None

    async def sector_name(self, project_id: str, sector_id: str) -> str | None:
        async with self._conn() as conn:
            name: str | None = await conn.fetchval(
                "SELECT sector_name FROM sectors WHERE project_id = $1 AND sector_id = $2",
                project_id,
                sector_id,
            )
        return name

    # sessions -----------------------------------------------------------------------------

    async def open_session(
        self,
        new: NewSession,
        arrival: datetime,
        events: Sequence[SessionEvent],
        announce: Callable[[Sequence[Session]], Sequence[SessionEvent]],
        *,
        create: bool = True,
    ) -> tuple[Session | None, bool, list[Session]]:
        """Insert ``new`` unless its key already has an open session (or ``create`` is off).

        Returns (the open session for the key, None if there is none and ``create`` is off,
        whether it is ``new``, sessions closed here because they had expired). ``events`` are
        written to the outbox only if ``new`` wins; the sessions closed here are announced
        (``announce``) in this transaction, whoever wins, as the sweeper would have.
        """
        async with self._conn() as conn, conn.transaction():
            expired_rows = await conn.fetch(
                f"""UPDATE production_sessions s
                    SET status = 'closed', close_reason = 'expired', closed_at = s.expires_at,
                        version = s.version + 1, updated_at = now(),
                        state_tick = nextval('session_state_tick'),
        state_xid = pg_current_xact_id()::text::bigint
                    WHERE company_id = $1 AND project_id = $2 AND day = $3
                      AND sector_id IS NOT DISTINCT FROM $4
                      AND status = 'open' AND expires_at <= $5
                    RETURNING {_SESSION_COLUMNS}""",
                new.company_id,
                new.project_id,
                new.day,
                new.sector_id,
                arrival,
            )
            expired = [_session(r, await _workers(conn, r["session_id"])) for r in expired_rows]
            if expired:
                await self._write_events(conn, announce(expired))
            row = None
            if create:
                row = await conn.fetchrow(
                    f"""INSERT INTO production_sessions AS s (
                        session_id, company_id, project_id, owner_id, sector_id, sector_name,
                        timezone, day, opened_at, max_duration_hours, expires_at, sampling_unit,
                        price_per_unit, bonus, notes)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
                    ON CONFLICT DO NOTHING
                    RETURNING {_SESSION_COLUMNS}""",
                    new.session_id,
                    new.company_id,
                    new.project_id,
                    new.owner,
                    new.sector_id,
                    new.sector_name,
                    new.timezone,
                    new.day,
                    new.opened_at,
                    new.max_duration_hours,
                    new.expires_at,
                    new.sampling_unit,
                    new.price_per_unit,
                    new.bonus,
                    new.notes,
                )
            created = row is not None
            if row is None:
                row = await conn.fetchrow(
                    f"""SELECT {_SESSION_COLUMNS} FROM production_sessions s
                        WHERE company_id = $1 AND project_id = $2 AND day = $3
                          AND sector_id IS NOT DISTINCT FROM $4 AND status = 'open'""",
                    new.company_id,
                    new.project_id,
                    new.day,
                    new.sector_id,
                )
                if row is None and not create:
                    return None, False, expired
                if row is None:
                    # The conflicting session closed between our insert and select: retryable.
                    raise StoreUnavailable("open session raced with a close; retry")
                workers = await conn.fetch(
                    "SELECT worker_id, units, records, voided FROM session_worker_totals "
                    "WHERE session_id = $1",
                    row["session_id"],
                )
                return _session(row, workers), False, expired
            await self._write_events(conn, events)
            return _session(row), created, expired

    async def _write_events(self, conn: asyncpg.Connection, events: Sequence[SessionEvent]) -> None:
        await _insert_events(conn, events)

    async def session_facts(self, session_ids: Sequence[str]) -> dict[str, SessionFacts]:
        async with self._hot_conn() as conn:
            rows = await conn.fetch(
                f"SELECT {_FACTS_COLUMNS} FROM production_sessions "
                "WHERE session_id = ANY($1::text[])",
                list(session_ids),
            )
        return {r["session_id"]: _facts(r) for r in rows}

    async def session(self, session_id: str) -> Session | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                f"SELECT {_SESSION_COLUMNS} FROM production_sessions s WHERE session_id = $1",
                session_id,
            )
            if row is None:
                return None
            workers = await conn.fetch(
                "SELECT worker_id, units, records, voided FROM session_worker_totals "
                "WHERE session_id = $1",
                session_id,
            )
        return _session(row, workers)

    @asynccontextmanager
    async def lock_session(self, session_id: str) -> AsyncIterator[SessionTx | None]:
        """The session locked FOR UPDATE inside a transaction (None if it does not exist).

        Leaving the block commits what the ``SessionTx`` changed; an exception rolls it back.
        """
        async with self._conn() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {_SESSION_COLUMNS} FROM production_sessions s "
                "WHERE session_id = $1 FOR UPDATE",
                session_id,
            )
            if row is None:
                yield None
                return
            yield SessionTx(conn, _session(row, await _workers(conn, session_id)))

    @asynccontextmanager
    async def lock_record(self, record_id: str) -> AsyncIterator[RecordTx | None]:
        """A record and its session, both locked (session first, as everywhere), in one
        transaction; None if the record does not exist."""
        async with self._conn() as conn, conn.transaction():
            session_id = await conn.fetchval(
                "SELECT session_id FROM production_records WHERE record_id = $1", record_id
            )
            if session_id is None:
                yield None
                return
            srow = await conn.fetchrow(
                f"SELECT {_SESSION_COLUMNS} FROM production_sessions s "
                "WHERE session_id = $1 FOR UPDATE",
                session_id,
            )
            rrow = await conn.fetchrow(
                f"SELECT {_RECORD_COLUMNS} FROM production_records WHERE record_id = $1 FOR UPDATE",
                record_id,
            )
            assert srow is not None and rrow is not None
            session_tx = SessionTx(conn, _session(srow, await _workers(conn, session_id)))
            yield RecordTx(conn, _record(rrow), session_tx)

    async def expire_due(
        self,
        now: datetime,
        announce: Callable[[Sequence[Session]], Sequence[SessionEvent]],
        limit: int = 500,
    ) -> list[Session]:
        """Close every open session whose deadline has passed, once, whoever else tries too.

        One conditional UPDATE: a session another process closed first no longer matches, so
        each is closed (and announced, in the same transaction) exactly once.
        """
        async with self._conn() as conn, conn.transaction():
            # the rows are locked in session id order, as a batch of records locks them: in
            # deadline order a sweep and a batch could each hold a session the other waits for
            rows = await conn.fetch(
                f"""WITH due AS (
                        SELECT session_id FROM production_sessions
                        WHERE status = 'open' AND expires_at <= $1
                        ORDER BY session_id LIMIT $2
                        FOR NO KEY UPDATE)
                    UPDATE production_sessions s
                    SET status = 'closed', close_reason = 'expired', closed_at = s.expires_at,
                        version = s.version + 1, updated_at = now(),
                        state_tick = nextval('session_state_tick'),
                        state_xid = pg_current_xact_id()::text::bigint
                    FROM due
                    WHERE s.session_id = due.session_id
                      AND s.status = 'open' AND s.expires_at <= $1
                    RETURNING {_SESSION_COLUMNS}""",
                now,
                limit,
            )
            if not rows:
                return []
            sessions = [_session(r, await _workers(conn, r["session_id"])) for r in rows]
            await self._write_events(conn, announce(sessions))
        return sessions

    # outbox and retained state ------------------------------------------------------------

    async def pending_events(self, limit: int = 500) -> list[tuple[int, SessionEvent]]:
        async with self._conn() as conn:
            rows = await conn.fetch(
                """SELECT seq, event_id, type, at, session_id, data FROM session_events
                   WHERE published_at IS NULL ORDER BY seq LIMIT $1""",
                limit,
            )
        return [
            (r["seq"], SessionEvent(r["event_id"], r["type"], r["at"], r["session_id"], r["data"]))
            for r in rows
        ]

    async def mark_published(self, seqs: Sequence[int]) -> None:
        if not seqs:
            return
        async with self._conn() as conn:
            await conn.execute(
                "UPDATE session_events SET published_at = now() WHERE seq = ANY($1::int8[])",
                list(seqs),
            )

    async def snapshot_xmin(self) -> int:
        """Every transaction with a smaller id has ended (committed or not)."""
        async with self._conn() as conn:
            value = await conn.fetchval("SELECT pg_snapshot_xmin(pg_current_snapshot())::text")
        return int(value)

    async def state_ticks(self, since_xid: int) -> dict[str, int]:
        """The state tick of every open session, and of every other session changed by a
        transaction >= ``since_xid``.

        Open sessions are listed whole because a record does not move ``state_xid`` while its
        session is open (``_INSERT_RECORDS``): the update of the totals then changes no indexed
        column and stays a HOT update. Every other change moves it (open, close, expiry,
        extend, void, update, and a late record into a closed session)."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                """SELECT session_id, state_tick FROM production_sessions WHERE status = 'open'
                   UNION ALL
                   SELECT session_id, state_tick FROM production_sessions
                   WHERE state_xid >= $1 AND status <> 'open'""",
                since_xid,
            )
        return {r["session_id"]: r["state_tick"] for r in rows}

    async def session_states(self, session_ids: Sequence[str]) -> list[tuple[int, Session]]:
        """(state tick, session with totals) of ``session_ids``, by tick."""
        async with self._conn() as conn:
            rows = await conn.fetch(
                f"""SELECT s.state_tick, {_SESSION_COLUMNS} FROM production_sessions s
                    WHERE s.session_id = ANY($1::text[]) ORDER BY s.state_tick""",
                list(session_ids),
            )
            if not rows:
                return []
            workers = await conn.fetch(
                """SELECT session_id, worker_id, units, records, voided
                   FROM session_worker_totals WHERE session_id = ANY($1::text[])""",
                [r["session_id"] for r in rows],
            )
        by_session: dict[str, list[asyncpg.Record]] = {}
        for w in workers:
            by_session.setdefault(w["session_id"], []).append(w)
        return [(r["state_tick"], _session(r, by_session.get(r["session_id"], ()))) for r in rows]

    async def cursor(self, name: str) -> int:
        async with self._conn() as conn:
            value = await conn.fetchval(
                "SELECT position FROM publisher_cursors WHERE name = $1", name
            )
        return int(value or 0)

    async def save_cursor(self, name: str, position: int) -> None:
        async with self._conn() as conn:
            await conn.execute(
                """INSERT INTO publisher_cursors (name, position) VALUES ($1, $2)
                   ON CONFLICT (name) DO UPDATE SET position = excluded.position,
                                                    updated_at = now()""",
                name,
                position,
            )

    @asynccontextmanager
    async def leadership(self, key: int) -> AsyncIterator[asyncpg.Connection | None]:
        """A dedicated connection holding advisory lock ``key`` (None if another holds it).

        The lock lives as long as the connection: if this process dies, it is released and
        another process takes over.
        """
        try:
            conn = await asyncpg.connect(self._dsn)
        except Exception as exc:
            if is_transient(exc):
                raise StoreUnavailable(f"PostgreSQL unavailable: {exc}") from exc
            raise
        try:
            got = await conn.fetchval("SELECT pg_try_advisory_lock($1)", key)
            yield conn if got else None
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 5)

    # records ------------------------------------------------------------------------------

    async def insert_records(self, rows: Sequence[NewRecord]) -> set[str]:
        """Insert what is new and allowed (session version unchanged); return the ids inserted.

        One statement, so one round trip and one implicit transaction: the ledger rows, the
        per-worker totals and the session totals commit together or not at all.
        """
        if not rows:
            return set()
        # One JSON document rather than eleven arrays: asyncpg checks every array element
        # against collections.abc (about 10 us a record); orjson writes the lot in C.
        document = orjson.dumps(rows, default=tuple)
        async with self._hot_conn() as conn:
            inserted: list[str] = await conn.fetchval(_INSERT_RECORDS, document.decode())
        return set(inserted)

    async def existing_records(
        self,
        client_keys: Sequence[tuple[str, str]],
        idempotency_keys: Sequence[tuple[str, str]],
    ) -> tuple[dict[tuple[str, str], Record], dict[tuple[str, str], Record]]:
        """Stored records by client key, as (session, "workerId:clientEventId") (the unique
        index's own terms, see migration 003), and by (company, idempotencyKey)."""
        async with self._hot_conn() as conn:
            rows = await conn.fetch(
                f"""SELECT {_RECORD_COLUMNS} FROM production_records
                    WHERE (session_id, worker_id || ':' || client_event_id) IN (
                        SELECT * FROM unnest($1::text[], $2::text[]))
                    UNION
                    SELECT {_RECORD_COLUMNS} FROM production_records
                    WHERE (company_id, idempotency_key) IN (
                        SELECT * FROM unnest($3::text[], $4::text[]))""",
                [k[0] for k in client_keys],
                [k[1] for k in client_keys],
                [k[0] for k in idempotency_keys],
                [k[1] for k in idempotency_keys],
            )
        by_client: dict[tuple[str, str], Record] = {}
        by_idem: dict[tuple[str, str], Record] = {}
        for row in rows:
            rec = _record(row)
            if rec.client_event_id is not None:
                by_client[(rec.session_id, f"{rec.worker_id}:{rec.client_event_id}")] = rec
            if rec.idempotency_key is not None:
                by_idem[(rec.company_id, rec.idempotency_key)] = rec
        return by_client, by_idem

    async def record(self, record_id: str) -> Record | None:
        async with self._conn() as conn:
            row = await conn.fetchrow(
                f"SELECT {_RECORD_COLUMNS} FROM production_records WHERE record_id = $1",
                record_id,
            )
        return _record(row) if row else None

    async def key_exists(
        self, company_id: str, key: str, client_key: tuple[str, str] | None
    ) -> bool:
        """Is ``key`` a stored client key or idempotencyKey of ``company_id``?"""
        async with self._conn() as conn:
            found = await conn.fetchval(
                """SELECT EXISTS (
                       SELECT 1 FROM production_records
                       WHERE company_id = $1 AND idempotency_key = $2)
                   OR ($3::text IS NOT NULL AND EXISTS (
                       SELECT 1 FROM production_records
                       WHERE session_id = $3 AND company_id = $1 AND kind = 'record'
                         AND worker_id || ':' || client_event_id = $4))""",
                company_id,
                key,
                client_key[0] if client_key else None,
                client_key[1] if client_key else None,
            )
        return bool(found)

    # seed ---------------------------------------------------------------------------------

    async def seed(self, seed: SeedFile) -> dict[str, int]:
        """Upsert companies, users, projects, sectors; loading a file twice changes nothing.

        The counts are of what the file holds, plus ``changed``: the rows written (new, or
        different from what was stored), 0 the second time.
        """
        changed = 0
        async with self._conn() as conn, conn.transaction():
            outside = seed.company_references()
            if outside:
                present = await conn.fetch(
                    "SELECT company_id FROM companies WHERE company_id = ANY($1::text[])",
                    sorted(set(outside.values())),
                )
                found = {r["company_id"] for r in present}
                missing = {what: c for what, c in outside.items() if c not in found}
                if missing:
                    what, company = next(iter(sorted(missing.items())))
                    raise InvalidRequest(
                        f"{what} names company {company}, which is neither in the file nor "
                        "in the database; add it under companies:",
                        {"missing": sorted(set(missing.values()))},
                    )
            moved = await conn.fetch(
                """SELECT p.project_id, p.company_id, f.company_id AS wanted
                   FROM projects p
                   JOIN unnest($1::text[], $2::text[]) AS f(project_id, company_id)
                     USING (project_id)
                   WHERE p.company_id <> f.company_id
                   ORDER BY p.project_id""",
                [p.projectId for p in seed.projects],
                [p.companyId for p in seed.projects],
            )
            if moved:
                m = moved[0]
                raise InvalidRequest(
                    f"project {m['project_id']} belongs to company {m['company_id']}, not "
                    f"{m['wanted']}: a project never moves to another company (its sessions "
                    "and records stay with it); give the other company's project its own "
                    "projectId",
                    {"projects": [r["project_id"] for r in moved]},
                )
            for c in seed.companies:
                status = await conn.execute(
                    """INSERT INTO companies (company_id, name) VALUES ($1, $2)
                       ON CONFLICT (company_id) DO UPDATE SET name = excluded.name
                       WHERE companies.name IS DISTINCT FROM excluded.name""",
                    c.companyId,
                    c.name,
                )
                changed += _rows(status)
            for u in seed.users:
                status = await conn.execute(
                    """INSERT INTO users (auth0_id, company_id) VALUES ($1, $2)
                       ON CONFLICT (auth0_id) DO UPDATE SET company_id = excluded.company_id
                       WHERE users.company_id IS DISTINCT FROM excluded.company_id""",
                    u.auth0Id,
                    u.companyId,
                )
                changed += _rows(status)
            for p in seed.projects:
                bonus = p.bonus.as_json() if p.bonus else None
                status = await conn.execute(
                    """INSERT INTO projects (project_id, company_id, name, timezone, sampling_unit,
                                             price_per_unit, bonus, max_duration_hours)
                       VALUES ($1, $2, $3, $4, $5, $6::float8::numeric, $7, $8)
                       ON CONFLICT (project_id) DO UPDATE SET
                           company_id = excluded.company_id, name = excluded.name,
                           timezone = excluded.timezone, sampling_unit = excluded.sampling_unit,
                           price_per_unit = excluded.price_per_unit, bonus = excluded.bonus,
                           max_duration_hours = excluded.max_duration_hours
                       WHERE (projects.company_id, projects.name, projects.timezone,
                              projects.sampling_unit, projects.price_per_unit, projects.bonus,
                              projects.max_duration_hours)
                             IS DISTINCT FROM
                             (excluded.company_id, excluded.name, excluded.timezone,
                              excluded.sampling_unit, excluded.price_per_unit, excluded.bonus,
                              excluded.max_duration_hours)""",
                    p.projectId,
                    p.companyId,
                    p.name,
                    p.timezone,
                    p.samplingUnit,
                    p.pricePerUnit,
                    bonus,
                    p.maxDurationHours,
                )
                changed += _rows(status)
                for s in p.sectors:
                    status = await conn.execute(
                        """INSERT INTO sectors (project_id, sector_id, sector_name)
                           VALUES ($1, $2, $3)
                           ON CONFLICT (project_id, sector_id) DO UPDATE
                           SET sector_name = excluded.sector_name
                           WHERE sectors.sector_name IS DISTINCT FROM excluded.sector_name""",
                        p.projectId,
                        s.sectorId,
                        s.sector_name,
                    )
                    changed += _rows(status)
        return {
            "companies": len(seed.companies),
            "users": len(seed.users),
            "projects": len(seed.projects),
            "sectors": sum(len(p.sectors) for p in seed.projects),
            "changed": changed,
        }

    # dead letters -------------------------------------------------------------------------

    async def add_dead_letters(self, rows: Sequence[DeadLetter]) -> None:
        if not rows:
            return
        async with self._conn() as conn:
            await conn.execute(
                """INSERT INTO dead_letters (received_at, topic, reason, message, auth0_id,
                                             payload, payload_size, truncated)
                   SELECT * FROM unnest($1::timestamptz[], $2::text[], $3::text[], $4::text[],
                                        $5::text[], $6::bytea[], $7::int4[], $8::bool[])""",
                [r.received_at for r in rows],
                [r.topic for r in rows],
                [r.reason for r in rows],
                [r.message for r in rows],
                [r.auth0_id for r in rows],
                [r.payload for r in rows],
                [r.payload_size for r in rows],
                [r.truncated for r in rows],
            )

    async def dead_letters(
        self, *, since: datetime | None, reason: str | None, limit: int
    ) -> list[asyncpg.Record]:
        async with self._conn() as conn:
            rows: list[asyncpg.Record] = await conn.fetch(
                """SELECT id, received_at, topic, reason, message, auth0_id, payload,
                          payload_size, truncated
                   FROM dead_letters
                   WHERE ($1::timestamptz IS NULL OR received_at >= $1)
                     AND ($2::text IS NULL OR reason = $2)
                   ORDER BY received_at DESC, id DESC LIMIT $3""",
                since,
                reason,
                limit,
            )
        return rows

    async def prune_dead_letters(self, before: datetime) -> int:
        """Delete the dead letters received before ``before``; how many went."""
        async with self._conn() as conn:
            status: str = await conn.execute(
                "DELETE FROM dead_letters WHERE received_at < $1", before
            )
        return int(status.rsplit(" ", 1)[-1])


@dataclass(frozen=True, slots=True)
class DeadLetter:
    received_at: datetime
    topic: str
    reason: str
    message: str | None
    auth0_id: str | None
    payload: bytes
    payload_size: int
    truncated: bool


_UPDATABLE = {
    "samplingUnit": "sampling_unit",
    "pricePerUnit": "price_per_unit",
    "bonus": "bonus",
    "notes": "notes",
}


class SessionTx:
    """Changes to one locked session, inside its transaction; each returns the new session."""

    def __init__(self, conn: asyncpg.Connection, session: Session) -> None:
        self._conn = conn
        self.session = session

    async def _apply(self, sql: str, *args: object) -> Session:
        row = await self._conn.fetchrow(
            f"""UPDATE production_sessions s SET {sql}, updated_at = now(),
                       state_tick = nextval('session_state_tick'),
        state_xid = pg_current_xact_id()::text::bigint
                WHERE s.session_id = $1 RETURNING {_SESSION_COLUMNS}""",
            self.session.session_id,
            *args,
        )
        assert row is not None
        self.session = _session(row, await _workers(self._conn, self.session.session_id))
        return self.session

    async def count_void(self, units: Decimal, *, worker_gone: bool) -> Session:
        """Totals after a void: net units down, one more voided, maybe one worker fewer."""
        return await self._apply(
            "total_units = s.total_units - $2, total_voided = s.total_voided + 1, "
            "total_workers = s.total_workers - $3",
            units,
            1 if worker_gone else 0,
        )

    async def expire(self) -> Session:
        return await self._apply(
            "status = 'closed', close_reason = 'expired', closed_at = s.expires_at, "
            "version = s.version + 1"
        )

    async def close(self, at: datetime) -> Session:
        return await self._apply(
            "status = 'closed', close_reason = 'closed', closed_at = $2, version = s.version + 1",
            at,
        )

    async def extend(self, hours: float, expires_at: datetime) -> Session:
        return await self._apply(
            "max_duration_hours = $2, expires_at = $3, version = s.version + 1",
            hours,
            expires_at,
        )

    async def update(self, changes: dict[str, Any]) -> Session:
        """Set the updatable fields in ``changes`` (wire names); the admission version stays."""
        sets, args = [], []
        for name, value in changes.items():
            column = _UPDATABLE[name]
            args.append(value)
            cast = "::float8::numeric" if column == "price_per_unit" else ""
            sets.append(f"{column} = ${len(args) + 1}{cast}")
        return await self._apply(", ".join(sets), *args)

    async def emit(self, events: Sequence[SessionEvent]) -> None:
        await _insert_events(self._conn, events)


class RecordTx:
    """Voiding one locked record, inside its (and its session's) transaction."""

    def __init__(self, conn: asyncpg.Connection, record: Record, session_tx: SessionTx) -> None:
        self._conn = conn
        self.record = record
        self.session_tx = session_tx

    async def void_of(self) -> Record | None:
        """The counter-movement that voided this record, if any."""
        if self.record.voided_by is None:
            return None
        row = await self._conn.fetchrow(
            f"SELECT {_RECORD_COLUMNS} FROM production_records WHERE record_id = $1",
            self.record.voided_by,
        )
        return _record(row) if row else None

    async def void(self, new_id: Callable[[], str], reason: str, at: datetime) -> Record:
        """Write the counter-movement (its id from ``new_id``, drawn again should one clash
        with a stored id), mark the original voided, move the totals."""
        r = self.record
        conn = self._conn
        row = None
        for _ in range(VOID_ID_ATTEMPTS):
            row = await conn.fetchrow(
                f"""INSERT INTO production_records (
                        record_id, company_id, session_id, owner_id, worker_id, worker_name,
                        units, recorded_at, kind, void_of, void_reason)
                    VALUES ($1, $2, $3, $4, $5, $6, -$7::numeric, $8, 'void', $9, $10)
                    ON CONFLICT (record_id) DO NOTHING
                    RETURNING {_RECORD_COLUMNS}""",
                new_id(),
                r.company_id,
                r.session_id,
                r.owner,
                r.worker_id,
                r.worker_name,
                r.units,
                at,
                r.record_id,
                reason,
            )
            if row is not None:
                break
        if row is None:
            raise RuntimeError(f"no free record id in {VOID_ID_ATTEMPTS} attempts")
        void_id: str = row["record_id"]
        await conn.execute(
            "UPDATE production_records SET state = 'voided', voided_by = $2 WHERE record_id = $1",
            r.record_id,
            void_id,
        )
        left = await conn.fetchval(
            """UPDATE session_worker_totals SET units = units - $3, voided = voided + 1
               WHERE session_id = $1 AND worker_id = $2 RETURNING records - voided""",
            r.session_id,
            r.worker_id,
            r.units,
        )
        await self.session_tx.count_void(r.units, worker_gone=left == 0)
        self.record = replace(r, state="voided", voided_by=void_id)
        return _record(row)
