"""Background work that talks to devices without being asked: expiry, events, retained state.

- ``Sweeper`` (every process): closes sessions past their deadline with one conditional UPDATE,
  so with several gateways each session is closed and announced exactly once.
- ``Publisher`` (one elected process, a PostgreSQL advisory lock): publishes the outbox of
  session events, marking each published only after the broker's PUBACK (a crash in between
  delays an event, never loses it), and the retained state of every changed session, at most
  once per ``GATEWAY_STATE_INTERVAL_S`` per session however fast records arrive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

import asyncpg
import orjson

from gateway.config import Settings
from gateway.core.topics import Topics
from gateway.core.views import Session, session_object
from gateway.errors import StoreUnavailable
from gateway.metrics import Metrics
from gateway.service import Service
from gateway.store.postgres import PostgresStore
from gateway.transport.mqtt import MqttLink, PublishError, PublishRefused

log = logging.getLogger(__name__)

LEADER_LOCK_KEY = 0x48594450  # "HYDP"
PUBACK_TIMEOUT_S = 10.0
CURSOR_SAVE_EVERY_S = 5.0


async def _sleep_or_stop(stopping: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), seconds)


class Sweeper:
    """Closes expired sessions now and then, or at once when nudged."""

    def __init__(
        self,
        service: Service,
        interval_s: float,
        oldest_pending: Callable[[], datetime | None] = lambda: None,
    ) -> None:
        self._service = service
        self._interval_s = interval_s
        # when the oldest request this process holds unanswered arrived: a session whose
        # deadline is past that waits, so that request is judged as it arrived (an extend or
        # close sent in time is not refused SESSION_EXPIRED because the sweep came first)
        self._oldest_pending = oldest_pending
        self._nudged = asyncio.Event()

    def nudge(self) -> None:
        self._nudged.set()

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                now = datetime.now(UTC)
                oldest = self._oldest_pending()
                due_by = now if oldest is None else min(now, oldest)
                closed = await self._service.expire_due(now, due_by)
            except StoreUnavailable as exc:
                log.warning("sweeper waits for the database: %s", exc)
            except Exception:
                log.exception("sweeper failed; retrying")
            else:
                if closed:  # (gateway_sessions_expired_total counts them, in the service)
                    log.info("closed %d expired session(s)", len(closed))
            self._nudged.clear()
            nudged = asyncio.ensure_future(self._nudged.wait())
            stopped = asyncio.ensure_future(stopping.wait())
            await asyncio.wait(
                [nudged, stopped], timeout=self._interval_s, return_when=asyncio.FIRST_COMPLETED
            )
            nudged.cancel()
            stopped.cancel()


class Publisher:
    """Outbox and retained state, published by whichever process holds the leader lock."""

    def __init__(
        self,
        store: PostgresStore,
        link: MqttLink,
        topics: Topics,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self._store = store
        self._link = link
        self._topics = topics
        self._settings = settings
        self._metrics = metrics
        self._published_ticks: dict[str, int] = {}
        self.leading = False
        self._polled_pending = 0  # events the last poll of the outbox found (at most its limit)

    def broker_connected(self, session_present: bool) -> None:
        """The link is (re)connected. A broker that kept no session for us most likely kept no
        retained messages either (restarted without persistence, or a new broker): every open
        session's state is published again, as a new leader does, not only those that change."""
        if not session_present:
            self._published_ticks.clear()

    @property
    def outbox_pending(self) -> int:
        """For gateway_outbox_pending: session events waiting, as of the last poll of the
        outbox (capped at the poll's limit); 0 when another process leads."""
        return self._polled_pending if self.leading else 0

    async def run(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            try:
                async with self._store.leadership(LEADER_LOCK_KEY) as conn:
                    if conn is not None:
                        await self._lead(conn, stopping)
            except StoreUnavailable as exc:
                log.debug("publisher waits for the database: %s", exc)
            except Exception:
                log.exception("publisher failed; retrying")
            finally:
                if self.leading:
                    log.info("no longer publishing events and state")
                self.leading = False
                self._polled_pending = 0
            await _sleep_or_stop(stopping, 2.0)

    async def _lead(self, conn: asyncpg.Connection, stopping: asyncio.Event) -> None:
        self.leading = True
        log.info("elected to publish session events and retained state")
        lost = asyncio.Event()
        tasks = [
            asyncio.create_task(self._watch(conn, lost, stopping), name="leader-watch"),
            asyncio.create_task(self._outbox_loop(lost, stopping), name="outbox"),
            asyncio.create_task(self._state_loop(lost, stopping), name="state"),
        ]
        try:
            _done, running = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if stopping.is_set():  # let the loops finish their round: mark what was confirmed
                await asyncio.wait(running, timeout=5)
        finally:
            lost.set()
            for task in tasks:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for result in results:
                if isinstance(result, Exception) and not isinstance(result, StoreUnavailable):
                    log.error("publisher task failed", exc_info=result)

    async def _watch(
        self, conn: asyncpg.Connection, lost: asyncio.Event, stopping: asyncio.Event
    ) -> None:
        """Leadership lasts as long as the lock's connection answers."""
        while not stopping.is_set():
            try:
                await asyncio.wait_for(conn.fetchval("SELECT 1"), 5)
            except Exception as exc:
                log.warning("leader connection lost (%s)", exc)
                return
            await _sleep_or_stop(stopping, 2.0)

    async def _confirmed(self, futures: Sequence[asyncio.Future[None]]) -> list[bool]:
        """Which publishes are settled: acknowledged (PUBACK) within the timeout, or refused
        as too large for the broker, which sending again every round cannot change (a 1.7 MB
        event of a session with 10,000 workers was re-sent every second, for ever)."""
        if not futures:
            return []
        await asyncio.wait(futures, timeout=PUBACK_TIMEOUT_S)
        settled = []
        for f in futures:
            exc = f.exception() if f.done() and not f.cancelled() else RuntimeError()
            if isinstance(exc, PublishRefused) and exc.too_large:
                log.error(
                    "the broker refused a publish as larger than its message_size_limit; "
                    "not sent again (raise the limit to carry sessions this large)"
                )
                self._metrics.inc("gateway_publishes_too_large_total")
                exc = None
            settled.append(f.done() and not f.cancelled() and exc is None)
        return settled

    # outbox -------------------------------------------------------------------------------

    async def _outbox_loop(self, lost: asyncio.Event, stopping: asyncio.Event) -> None:
        while not (lost.is_set() or stopping.is_set()):
            await self._link.wait_connected()
            events = await self._store.pending_events()
            self._polled_pending = len(events)
            if not events:
                await _sleep_or_stop(stopping, 0.1)
                continue
            futures: list[asyncio.Future[None]] = []
            sent: list[int] = []
            try:
                for seq, event in events:
                    payload = orjson.dumps(event.as_json())
                    futures.append(
                        self._link.publish(self._topics.events(event.session_id), payload)
                    )
                    sent.append(seq)
            except PublishError:
                pass  # the link dropped: what was queued is judged below, the rest waits
            ok = await self._confirmed(futures)
            acked = [seq for seq, good in zip(sent, ok, strict=True) if good]
            await self._store.mark_published(acked)
            self._metrics.inc("gateway_events_published_total", len(acked))
            if len(acked) < len(events):
                await _sleep_or_stop(stopping, 1.0)

    # retained state -----------------------------------------------------------------------

    async def _state_loop(self, lost: asyncio.Event, stopping: asyncio.Event) -> None:
        """Every round: the tick of every open session (records move it without touching any
        index, see the store) and of every other session changed by a transaction at or past
        the low mark; the state of each one whose tick this leader has not published.

        The low mark follows transaction ids (the snapshot's xmin, saved now and then), so a
        change that committed late is never missed; a new leader publishes each open session
        once, then what changes."""
        store = self._store
        low = await store.cursor("state") or await store.snapshot_xmin()
        last_save = time.monotonic()
        while not (lost.is_set() or stopping.is_set()):
            await self._link.wait_connected()
            xmin = await store.snapshot_xmin()
            listed = await store.state_ticks(low)
            published = self._published_ticks
            for session_id in [k for k in published if k not in listed]:
                del published[session_id]  # closed before the low mark: no longer tracked
            todo = sorted(k for k, tick in listed.items() if published.get(k, -1) < tick)
            if await self._publish_states(await store.session_states(todo) if todo else []):
                low = xmin
                if time.monotonic() - last_save > CURSOR_SAVE_EVERY_S:
                    await store.save_cursor("state", low)
                    last_save = time.monotonic()
            await _sleep_or_stop(stopping, self._settings.state_interval_s)
        with contextlib.suppress(Exception):
            await store.save_cursor("state", low)

    async def _publish_states(self, changed: Sequence[tuple[int, Session]]) -> bool:
        """Publish ``changed``; True when the broker confirmed all of it."""
        ticks = self._published_ticks
        todo = [(tick, s) for tick, s in changed if ticks.get(s.session_id, -1) < tick]
        futures: list[asyncio.Future[None]] = []
        try:
            for _tick, session in todo:
                futures.append(self._publish_state(session))
        except PublishError:
            return False
        ok = await self._confirmed(futures)
        for (tick, session), good in zip(todo, ok, strict=True):
            if good:
                ticks[session.session_id] = tick
        self._metrics.inc("gateway_states_published_total", sum(ok))
        return all(ok)

    def _publish_state(self, session: Session) -> asyncio.Future[None]:
        try:
            body = orjson.dumps(session_object(session))
        except Exception:  # one session that cannot be shown must not hold back all the others
            log.exception("state of session %s cannot be rendered; skipped", session.session_id)
            skipped: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            skipped.set_result(None)
            return skipped
        expiry = self._settings.state_retain_s if session.facts.status == "closed" else None
        return self._link.publish(
            self._topics.state(session.session_id), body, retain=True, expiry_s=expiry
        )
