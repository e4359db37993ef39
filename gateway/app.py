"""The composition root: the one place that builds and wires every part of a running gateway.

Three visible phases: start (database, HTTP, broker link, pipeline), serve until ``stop()``,
and a graceful drain bounded by ``GATEWAY_SHUTDOWN_TIMEOUT_S``: stop taking messages, finish
and acknowledge the batch in hand, publish ``offline``, disconnect, close the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web

from gateway import __version__
from gateway.config import Settings
from gateway.core.auth import KeyRing, TokenVerifier
from gateway.core.ratelimit import RateLimiter
from gateway.core.rules import Limits, iso
from gateway.core.topics import Topics
from gateway.deadletters import DeadLetterWriter
from gateway.errors import ConfigError, StoreUnavailable
from gateway.jwks import JwksLocation, JwksSource, load_keys
from gateway.logs import retrieved
from gateway.metrics import Metrics
from gateway.publisher import Publisher, Sweeper
from gateway.service import Service
from gateway.store.migrate import load_migrations
from gateway.store.postgres import PostgresStore
from gateway.transport.dispatch import Dispatcher
from gateway.transport.http import HttpSidecar, parse_origins, start_http, starting_app
from gateway.transport.mqtt import MqttLink, PublishError
from gateway.transport.pipeline import Pipeline

log = logging.getLogger(__name__)


def limits_from(settings: Settings) -> Limits:
    return Limits(
        max_units=settings.max_units,
        max_session_hours=settings.max_session_hours,
        clock_skew_s=settings.clock_skew_s,
        late_sync_grace_s=settings.late_sync_grace_s,
        max_bulk=settings.max_bulk,
    )


def verifier_from(settings: Settings) -> TokenVerifier:
    """The verifier with the HS256 secret; JWKS keys arrive later (``load_keys`` in ``run``),
    but a bad GATEWAY_JWT_JWKS location is refused here, before anything starts."""
    settings.require_jwt_keys()
    if settings.jwt_jwks:
        JwksLocation.parse(settings.jwt_jwks)
    keys = KeyRing(secret=settings.jwt_secret)
    return TokenVerifier(
        keys,
        audience=settings.jwt_audience,
        issuer=settings.jwt_issuer,
        leeway_s=settings.jwt_leeway_s,
    )


async def first_of(
    wanted: Coroutine[Any, Any, None],
    stop: Coroutine[Any, Any, bool],
    watched: asyncio.Task[None] | None = None,
) -> bool:
    """Wait for ``wanted`` unless ``stop`` comes first; True if ``wanted`` finished. Should
    ``watched`` fail meanwhile (the link refusing a setting), its exception is raised."""
    want = asyncio.ensure_future(wanted)
    halt = asyncio.ensure_future(stop)
    try:
        await asyncio.wait(
            [want, halt, *([watched] if watched else [])], return_when=asyncio.FIRST_COMPLETED
        )
        if watched is not None and watched.done() and not want.done():
            watched.result()  # raises what ended it
        return want.done()
    finally:
        for task in (want, halt):
            task.cancel()


async def connect_store(settings: Settings, stopping: asyncio.Event) -> PostgresStore | None:
    """Connect to PostgreSQL, waiting with backoff while it is unreachable (None if stopped)."""
    delay = 0.5
    while not stopping.is_set():
        try:
            store = await PostgresStore.connect(
                settings.database_url,
                max_size=settings.database_pool_size,
                # REST calls and the background publishers: a hung database is a 503 after
                # this long, not a minute's wait (batches of MQTT requests wait and retry)
                command_timeout_s=POOL_STATEMENT_TIMEOUT_S,
            )
        except StoreUnavailable as exc:
            log.warning(
                "waiting for PostgreSQL at %s%s: %s (retry in %.1f s)",
                settings.database_display,
                ""
                if "database_url" in settings.model_fields_set
                else " (GATEWAY_DATABASE_URL is not set: the default)",
                exc,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), delay)
            delay = min(delay * 2, 10)
            continue
        await check_schema(store)
        return store
    return None


async def check_schema(store: PostgresStore) -> None:
    latest = load_migrations()[-1].version
    applied = await store.schema_version()
    if applied is None or applied < latest:
        await store.close()
        raise ConfigError(
            f"the database schema is at version {applied or 0}, this gateway needs {latest}: "
            "run `gateway migrate` first"
        )


READY_PING_S = 2.0  # /readyz waits this long for the database's answer
POOL_STATEMENT_TIMEOUT_S = 10.0


class Gateway:
    """A running gateway. ``await run()``; ``stop()`` from a signal handler or a test."""

    def __init__(
        self, settings: Settings, *, retiring: bool = False, any_http_port: bool = False
    ) -> None:
        self.settings = settings
        self.retiring = retiring
        # `gateway dev`: when another process took the HTTP port since it was found free, take
        # any free one (the instructions print the one bound) rather than stopping
        self.any_http_port = any_http_port
        self.topics = Topics(settings.topic_prefix)
        self.metrics = Metrics()
        self.verifier = verifier_from(settings)
        self.limits = limits_from(settings)
        self._stopping = asyncio.Event()
        self.started = asyncio.Event()
        self.http_port: int | None = None
        self._ping: asyncio.Task[None] | None = None
        self.store: PostgresStore | None = None
        self.service: Service | None = None
        self.link: MqttLink | None = None
        self.pipeline: Pipeline | None = None
        self.sweeper: Sweeper | None = None
        self.publisher: Publisher | None = None
        self._register_gauges()

    def stop(self) -> None:
        self._stopping.set()

    async def retire(self, quiet_s: float = 2.0) -> bool:
        """Take this replica out for good (``Gateway(..., retiring=True)``, then ``run()``).

        Its broker session holds a share of the requests that arrived while it was down (and,
        being persistent, would go on taking its share for GATEWAY_MQTT_SESSION_EXPIRY_S).
        Connected, it unsubscribes, answers what was queued for it until nothing has arrived
        for ``quiet_s`` and all is acknowledged, then stops and ends the session.
        """
        await self.started.wait()
        assert self.link is not None and self.pipeline is not None
        if not self.link.session_present:
            log.warning(
                "the broker had no session for %s: nothing to retire (check "
                "GATEWAY_MQTT_CLIENT_ID)",
                self.link.client_id,
            )
            self.link.end_session_on_stop = True  # the one this connection made: leave none
            self.stop()
            return False
        pipeline, link = self.pipeline, self.link
        unsubscribed = asyncio.ensure_future(link.wait_unsubscribed())
        stopped = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([unsubscribed, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if unsubscribed.done():
            unsubscribed.result()
            log.info("retiring %s: unsubscribed; answering what was queued", link.client_id)
            while not self._stopping.is_set():
                await asyncio.sleep(0.1)
                idle = time.monotonic() - pipeline.last_arrival
                quiet = pipeline.backlog == 0 and pipeline.unacked == 0 and idle >= quiet_s
                # the session is ended by a DISCONNECT on a connection that has held a while
                # (one that keeps dropping may be fighting a live replica for the client id)
                if quiet and link.connected_for >= quiet_s:
                    break
        else:
            unsubscribed.cancel()
        if self._stopping.is_set():  # a signal, or a request of another prefix: not done
            log.warning(
                "retiring %s stopped before its queue was answered; its session is kept",
                link.client_id,
            )
            return False
        log.info("retiring %s: nothing more queued; ending its session", link.client_id)
        link.end_session_on_stop = True
        self.stop()
        return True

    def _status(self, status: str) -> bytes:
        return orjson.dumps(
            {
                "status": status,
                "instance": self.settings.mqtt_client_id,
                "version": __version__,
                "at": iso(datetime.now(UTC)),
            }
        )

    async def ready(self) -> dict[str, bool]:
        """For /readyz: the database answers a query now, and the broker link is up."""
        database = False
        if self.store is not None:
            # A hung PostgreSQL (stopped, not refusing) holds a cancelled query for half a
            # minute (asyncpg's cancel request waits for it too): the ping is waited for 2 s and
            # then left to finish alone; while one is still out, the answer is "not ready".
            ping = self._ping
            if ping is None or ping.done():
                ping = self._ping = asyncio.create_task(self.store.ping(), name="readyz-ping")
                ping.add_done_callback(retrieved)
            done, _ = await asyncio.wait({ping}, timeout=READY_PING_S)
            database = ping in done and not ping.cancelled() and ping.exception() is None
        return {"database": database, "broker": self.link is not None and self.link.connected}

    def _register_gauges(self) -> None:
        """The gauges of GET /metrics, read when it is rendered: through self, so they are
        there (at 0) from the start, while the gateway still waits for PostgreSQL."""
        self.metrics.gauge("gateway_backlog", lambda: self.pipeline.backlog if self.pipeline else 0)
        self.metrics.gauge("gateway_unacked", lambda: self.pipeline.unacked if self.pipeline else 0)
        self.metrics.gauge(
            "gateway_unconfirmed_publishes",
            lambda: self.link.unconfirmed_publishes if self.link else 0,
        )
        self.metrics.gauge(
            "gateway_database_up", lambda: float(bool(self.pipeline and self.pipeline.store_ok))
        )
        self.metrics.gauge(
            "gateway_broker_connected", lambda: float(bool(self.link and self.link.connected))
        )
        self.metrics.gauge(
            "gateway_publisher_leading",
            lambda: float(bool(self.publisher and self.publisher.leading)),
        )
        self.metrics.gauge(
            "gateway_outbox_pending", lambda: self.publisher.outbox_pending if self.publisher else 0
        )

    async def run(self, on_started: Callable[[Gateway], Any] | None = None) -> None:
        s = self.settings
        jwks, store = await self._prepare()
        if store is None:
            return
        self.store = store
        service = self.service = Service(
            store,
            self.limits,
            on_expired=lambda n: self.metrics.inc("gateway_sessions_expired_total", n),
        )
        dead_letters = DeadLetterWriter(store, self.metrics, payload_cap=s.dead_letter_payload_cap)
        limiter = RateLimiter(s.rate_limit_per_s, s.rate_limit_burst)
        dispatcher = Dispatcher(
            service,
            self.verifier,
            self.topics,
            max_payload_bytes=s.max_payload_bytes,
            max_json_depth=s.max_json_depth,
            on_refused=dead_letters,
            limiter=limiter,
            metrics=self.metrics,  # gateway_requests_total
        )
        link = MqttLink(
            s,
            subscriptions=self.topics.subscriptions(s.share_group),
            # a retiring replica says nothing on the one status topic the live ones share
            status_topic=None if self.retiring else self.topics.gateway_status,
            online_payload=lambda: self._status("online"),
            offline_payload=lambda: self._status("offline"),
        )
        link.retiring = self.retiring  # (the session is ended by retire(), once done)
        if self.retiring:  # a request of another prefix: stop, keep it (and the session) queued
            link.subscribed = self.topics.subscribed
            link.on_foreign = lambda _topic: self.stop()
        pipeline = Pipeline(
            link,
            dispatcher,
            self.metrics,
            self.topics,
            batch_max=s.batch_max,
            batch_wait_s=s.batch_wait_ms / 1000,
            max_inflight=s.max_inflight,
            depth=s.pipeline_depth,
            probe=store.ping,
        )
        link.on_message = pipeline.submit
        link.on_disconnected = pipeline.connection_lost
        self.link, self.pipeline = link, pipeline
        sidecar = HttpSidecar(
            service,
            self.verifier,
            self.metrics,
            ready=self.ready,
            max_payload_bytes=s.max_payload_bytes,
            max_json_depth=s.max_json_depth,
            cors_origins=parse_origins(s.cors_origins),
            limiter=limiter,  # one budget per user, over MQTT and REST alike
            on_refused=dead_letters,
        )
        try:
            # retiring runs next to a live gateway on the same host: no sidecar of its own
            runner, self.http_port = (
                (None, None)
                if self.retiring
                else await self._start_http(sidecar.app, self.http_port or s.http_port)
            )
        except ConfigError:
            await store.close()
            raise
        if self.http_port is not None:
            log.info("http sidecar on %s:%d", s.http_host, self.http_port)
        self.sweeper = Sweeper(service, s.sweep_interval_s, pipeline.oldest_pending_arrival)
        service.on_expired_seen = self.sweeper.nudge
        self.publisher = Publisher(store, link, self.topics, s, self.metrics)
        link.on_connected = self.publisher.broker_connected
        tasks = {
            "link": asyncio.create_task(link.run(), name="mqtt-link"),
            "pipeline": asyncio.create_task(pipeline.run(), name="pipeline"),
            "dead-letters": asyncio.create_task(dead_letters.run(), name="dead-letters"),
            "sweeper": asyncio.create_task(self.sweeper.run(self._stopping), name="sweeper"),
            "publisher": asyncio.create_task(self.publisher.run(self._stopping), name="publisher"),
            "cache-notifications": asyncio.create_task(
                store.listen(
                    {
                        "hydrobit_sessions": service.session_changed,
                        "hydrobit_users": service.user_changed,
                    },
                    on_reset=service.forget_all,
                ),
                name="cache-notifications",
            ),
        }
        if jwks is not None:
            tasks["jwks"] = asyncio.create_task(jwks.run(), name="jwks-refresh")
        if not self.retiring:
            tasks["status"] = asyncio.create_task(self._announce(link), name="status")
        try:
            # A stop while the broker is still out of reach (first connect) must not wait for it.
            if not await first_of(link.wait_connected(), self._stopping.wait(), tasks["link"]):
                log.info("stopping before the broker was reached")
                return
            # Long-lived startup objects out of the collector's way, and fewer young-generation
            # collections: the hot path allocates many short-lived objects and few cycles.
            gc.freeze()
            gc.set_threshold(20_000, 20, 20)
            self.started.set()
            if on_started is not None:
                on_started(self)
            stop_wait = asyncio.create_task(self._stopping.wait())
            done, _ = await asyncio.wait(
                [stop_wait, *tasks.values()], return_when=asyncio.FIRST_COMPLETED
            )
            stop_wait.cancel()
            for task in done:
                if task is not stop_wait and task.exception() is not None:
                    log.error("task %s failed", task.get_name(), exc_info=task.exception())
        finally:
            await self._drain(tasks, dead_letters, runner, store)

    async def _prepare(self) -> tuple[JwksSource | None, PostgresStore | None]:
        """The JWKS keys (tokens need them) and the database (None if stopped meanwhile).

        The process is alive at once, ready later: a sidecar of its own answers /healthz
        meanwhile (a liveness probe must not restart a gateway for waiting), until the real
        one takes its port.
        """
        starting = None
        if not self.retiring:
            starting, self.http_port = await self._start_http(
                starting_app(self.metrics, parse_origins(self.settings.cors_origins))
            )
        try:
            jwks = await load_keys(self.settings, self.verifier)
            return jwks, await connect_store(self.settings, self._stopping)
        finally:
            if starting is not None:
                await starting.cleanup()

    async def _start_http(
        self, app: web.Application, port: int | None = None
    ) -> tuple[web.AppRunner, int]:
        s = self.settings
        port = s.http_port if port is None else port
        try:
            try:
                return await start_http(app, s.http_host, port)
            except OSError as exc:
                if not self.any_http_port or exc.errno != errno.EADDRINUSE:
                    raise
                log.warning("http port %d was taken meanwhile: taking a free one", port)
                return await start_http(app, s.http_host, 0)
        except OSError as exc:
            raise ConfigError(
                f"the HTTP sidecar cannot listen on {s.http_host}:{port}: "
                f"{exc.strerror or exc}; set GATEWAY_HTTP_HOST to an address of this machine "
                "and GATEWAY_HTTP_PORT to a free port"
            ) from None

    async def _announce(self, link: MqttLink) -> None:
        """Re-publish `online` (retained) every GATEWAY_STATUS_INTERVAL_S while connected: one
        status topic serves every replica, and a live one must outlast another's `offline`."""
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.status_interval_s)
            if self._stopping.is_set() or not link.connected:
                continue
            with contextlib.suppress(PublishError):
                sent = link.publish(self.topics.gateway_status, self._status("online"), retain=True)
                sent.add_done_callback(retrieved)

    async def _drain(
        self,
        tasks: dict[str, asyncio.Task[None]],
        dead_letters: DeadLetterWriter,
        runner: Any,
        store: PostgresStore,
    ) -> None:
        self._stopping.set()  # also when a task's failure is why we stop: all of them end
        timeout = self.settings.shutdown_timeout_s
        log.info("stopping: finishing the batch in hand (at most %.0f s)", timeout)
        assert self.pipeline is not None and self.link is not None
        self.pipeline.stop()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(tasks["pipeline"]), timeout)
        for name in ("publisher", "sweeper"):
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(tasks[name]), 5)
        self.link.stop()
        with contextlib.suppress(Exception, asyncio.CancelledError):  # it may be why we stop
            await asyncio.wait_for(asyncio.shield(tasks["link"]), 5)
        await dead_letters.close()
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)
        if runner is not None:
            await runner.cleanup()
        if self._ping is not None:
            self._ping.cancel()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(store.close(), 5)
        log.info("stopped")
