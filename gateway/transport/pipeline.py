"""The micro-batching pipeline: collect requests, answer each batch, PUBACK in receive order.

Requests are sharded by session (``GATEWAY_PIPELINE_DEPTH`` shards): every request about one
session goes to the same shard, in arrival order, so two batches never wait on each other's
session locks in PostgreSQL and their statements run on two database backends at once. Each
shard takes whatever arrived while its previous batch was being applied (at most
``batch_max``, after waiting at most ``batch_wait`` for company when under load).

Sharding by the id in the topic leaves a bulk (no id: shard 0) or a void (by record id) in
another shard than its session. A session change (close, extend, update) is therefore a
barrier: it is applied only once every request received before it is, and no request received
after it is applied before it (rare requests; the shards run side by side otherwise). A bulk
or void sent before a close is applied, not refused SESSION_CLOSED; a record sent after it is
refused.

A batch's replies are queued without awaiting their PUBACKs; then its requests are marked done
and acknowledged, always in the order they arrived (MQTT 5 §4.6) across all shards, so a
request is never acknowledged before its effect is committed or its error reply is on the wire
ahead of the PUBACK. While PostgreSQL is away a shard holds its batch, unacknowledged, and
retries with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime

import orjson

from gateway.core.idempotency import split_client_key
from gateway.core.models import BOM
from gateway.core.topics import CACHEABLE_TOPIC, Op, Topics
from gateway.errors import StoreUnavailable
from gateway.logs import retrieved
from gateway.metrics import Metrics
from gateway.transport.dispatch import Dispatcher, Reply
from gateway.transport.mqtt import Inbound, MqttLink, PublishError

log = logging.getLogger(__name__)

# A batch is cut at this many payload bytes too: 500 requests of the hot path are ~125 KB, but
# 500 offline syncs of a thousand records each would be one statement of 500,000 rows, past
# the statement timeout (60 s), held as an outage and retried the same way for ever.
BATCH_MAX_BYTES = 1 << 20

RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 5.0
PROBE_TIMEOUT_S = 5.0
MAX_UNCONFIRMED_REPLIES = 30_000  # packet ids wrap at 65,535
# requests that change a session's admission: applied in arrival order against all shards
BARRIERS = frozenset({Op.CLOSE_SESSION, Op.EXTEND_SESSION, Op.UPDATE_SESSION})


def _checked_session(payload: bytes) -> str | None:
    """The session of a check's ``client:{sessionId}:...`` key: the check then goes where that
    session's creates go, and sees those sent before it."""
    try:
        data = orjson.loads(payload.removeprefix(BOM))
    except orjson.JSONDecodeError:
        return None
    key = data.get("key") if isinstance(data, dict) else None
    split = split_client_key(key) if isinstance(key, str) else None
    return split[0] if split else None


class _Shard:
    __slots__ = ("arrived", "busy", "queue")

    def __init__(self) -> None:
        self.queue: deque[Inbound] = deque()
        self.arrived = asyncio.Event()
        self.busy = False


class Pipeline:
    """Batches inbound requests through the dispatcher and acknowledges them in order."""

    def __init__(
        self,
        link: MqttLink,
        dispatcher: Dispatcher,
        metrics: Metrics,
        topics: Topics,
        *,
        batch_max: int,
        batch_wait_s: float,
        max_inflight: int = 2_000,
        depth: int = 2,
        probe: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self._link = link
        self._probe = probe
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._topics = topics
        self._batch_max = batch_max
        self._batch_wait_s = batch_wait_s
        self._shards = [_Shard() for _ in range(depth)]
        self._shard_by_topic: dict[str, tuple[_Shard, bool]] = {}
        self._queued = 0
        self._unacked: deque[Inbound] = deque()
        # order across shards: every request not yet answered (QoS 0 too), in arrival order,
        # and the session changes among them; a shard that must wait for another's progress
        # awaits _progress
        self._seq = 0
        self._open: deque[Inbound] = deque()
        self._barriers: deque[Inbound] = deque()
        self._progress: asyncio.Future[None] | None = None
        self._stopping = asyncio.Event()
        self.store_ok = True
        # flow control: past max_inflight unacknowledged requests we stop reading the socket
        # (the broker keeps the backlog), and start again below half of it
        self._max_inflight = max_inflight
        self._paused = False
        self.last_arrival = time.monotonic()

    # fed by the link ----------------------------------------------------------------------

    def _shard_of(self, msg: Inbound) -> tuple[_Shard, bool]:
        """The shard of ``msg``, and whether it is a barrier (a session change)."""
        known = self._shard_by_topic.get(msg.topic)
        if known is None:
            route = self._topics.parse(msg.topic)
            if route is not None and route.op is Op.CHECK_IDEMPOTENCY:
                return self._shard_by_key(_checked_session(msg.payload)), False  # not by topic
            known = (
                self._shard_by_key(route.session_id or route.record_id if route else None),
                route is not None and route.op in BARRIERS,
            )
            if len(msg.topic) <= CACHEABLE_TOPIC:  # a topic may be 64 KiB: not those
                if len(self._shard_by_topic) >= 50_000:
                    self._shard_by_topic.clear()
                self._shard_by_topic[msg.topic] = known
        return known

    def _shard_by_key(self, key: str | None) -> _Shard:
        shards = self._shards
        return shards[zlib.crc32(key.encode()) % len(shards)] if key else shards[0]

    def submit(self, msg: Inbound) -> None:
        self.last_arrival = time.monotonic()
        shard, barrier = self._shard_of(msg)
        self._seq += 1
        msg.seq = self._seq
        self._open.append(msg)
        if barrier:
            self._barriers.append(msg)
        shard.queue.append(msg)
        self._queued += 1
        if msg.qos:
            self._unacked.append(msg)
        shard.arrived.set()
        if not self._paused and self._queued + len(self._unacked) >= 2 * self._max_inflight:
            self._paused = True
            self._link.pause_reading()
            self._metrics.inc("gateway_read_pauses_total")

    def connection_lost(self) -> None:
        """Forget what the old connection delivered: the broker redelivers it, unacknowledged."""
        self._unacked.clear()
        self._open.clear()
        self._barriers.clear()
        for shard in self._shards:
            shard.queue.clear()
        self._queued = 0
        self._paused = False
        self._progressed()

    @property
    def backlog(self) -> int:
        return self._queued

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    def oldest_pending_arrival(self) -> datetime | None:
        """When the oldest request not yet answered arrived (None: none waits). The sweeper
        closes no session whose deadline is past this: a request that arrived before the
        deadline and still waits here is judged as it arrived (SPEC §5)."""
        oldest = self._oldest_open()
        return oldest.received_at if oldest is not None else None

    def _oldest_open(self) -> Inbound | None:
        """The oldest request not yet answered (answered ones are dropped on the way)."""
        open_ = self._open
        while open_ and open_[0].done:
            open_.popleft()
        return open_[0] if open_ else None

    def stop(self) -> None:
        """Take no new batch; the ones in hand are finished and acknowledged."""
        self._stopping.set()
        for shard in self._shards:
            shard.arrived.set()
        self._progressed()

    # order across shards ------------------------------------------------------------------

    def _progressed(self) -> None:
        """Requests were answered: shards waiting on a barrier look again."""
        waiting, self._progress = self._progress, None
        if waiting is not None and not waiting.done():
            waiting.set_result(None)

    async def _await_progress(self) -> None:
        if self._progress is None:
            self._progress = asyncio.get_running_loop().create_future()
        await self._progress

    def _first_barrier(self) -> Inbound | None:
        barriers = self._barriers
        while barriers and barriers[0].done:
            barriers.popleft()
        return barriers[0] if barriers else None

    def _barrier_ahead(self, head: Inbound) -> Inbound | None:
        """The barrier ``head`` (a shard's oldest request) must wait for, if any: the first
        unanswered session change, when it arrived before ``head``; or ``head`` itself, while
        something that arrived before it is unanswered."""
        barrier = self._first_barrier()
        if barrier is None or head.seq < barrier.seq:
            return None
        if head is barrier:
            return barrier if self._oldest_open() is not barrier else None
        return barrier

    # the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        workers = [
            asyncio.create_task(self._work(shard), name=f"pipeline-{i}")
            for i, shard in enumerate(self._shards)
        ]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()

    async def _work(self, shard: _Shard) -> None:
        queue = shard.queue
        while not self._stopping.is_set():
            if not queue:
                shard.arrived.clear()
                await shard.arrived.wait()
                if self._stopping.is_set():
                    break
                # Under load (another shard busy) wait a moment for company; idle, answer now.
                if (
                    self._batch_wait_s > 0
                    and len(queue) < self._batch_max
                    and any(s.busy for s in self._shards)
                ):
                    await asyncio.sleep(self._batch_wait_s)
            if not queue:
                continue
            if self._barrier_ahead(queue[0]) is not None:
                await self._await_progress()  # another shard's requests go first
                continue
            batch = [queue.popleft()]
            size = len(batch[0].payload)
            barrier = self._first_barrier()
            if barrier is batch[0]:
                pass  # a session change goes alone: what follows it waits for its answer
            else:
                while queue and len(batch) < self._batch_max:
                    if barrier is not None and queue[0].seq >= barrier.seq:
                        break
                    size += len(queue[0].payload)
                    if size > BATCH_MAX_BYTES:  # a burst of bulks: a few per batch, not 500
                        break
                    batch.append(queue.popleft())
            self._queued -= len(batch)
            shard.busy = True
            try:
                replies = await self._apply(batch)
                if replies is None:
                    return  # stopped while the database was away: nothing acknowledged
                await self._answer(batch, replies)
                self._observe_wait(batch[0])
            finally:
                shard.busy = False

    async def _apply(self, batch: Sequence[Inbound]) -> list[Reply] | None:
        delay = RETRY_INITIAL_S
        while True:
            started = time.perf_counter()
            try:
                try:
                    replies = await self._dispatcher.handle(batch)
                except StoreUnavailable:
                    raise
                except Exception as exc:
                    if await self._database_answers():
                        raise
                    # the database went away and its driver said so in an unexpected way:
                    # an outage, not a bug; nothing is answered, the batch waits
                    raise StoreUnavailable(f"PostgreSQL unavailable: {exc!r}") from exc
            except StoreUnavailable as exc:
                self.store_ok = False
                self._metrics.inc("gateway_store_retries_total")
                log.warning(
                    "database unavailable (%s); holding %d requests unanswered and "
                    "unacknowledged (applied once it is back), retrying in %.1f s: check that "
                    "PostgreSQL is running and reachable at GATEWAY_DATABASE_URL",
                    exc,
                    max(len(self._unacked), len(batch)),
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set():
                    return None
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            except Exception as exc:  # a bug: answer INTERNAL rather than die or loop
                log.exception("a batch of %d requests failed unexpectedly", len(batch))
                self._metrics.inc("gateway_batch_failures_total")
                return self._dispatcher.fail_all(batch, exc)
            if not self.store_ok:
                log.info("database is back; resuming")
            self.store_ok = True
            self._metrics.observe_batch(len(batch), time.perf_counter() - started)
            return replies

    def _observe_wait(self, oldest: Inbound) -> None:
        """gateway_request_wait_seconds, once per batch (not per request): from the arrival of
        its oldest request (its first: a shard's queue keeps arrival order) to its replies
        handed to the link. ``received_at`` is wall-clock (one per socket read; no per-request
        stamp to keep): a clock stepped back counts 0, not a negative wait."""
        waited = (datetime.now(UTC) - oldest.received_at).total_seconds()
        self._metrics.observe_wait(max(waited, 0.0))

    async def _database_answers(self) -> bool:
        """After an unexpected failure: is PostgreSQL still there (then it was a bug)?"""
        if self._probe is None:
            return True
        try:
            await asyncio.wait_for(self._probe(), PROBE_TIMEOUT_S)
        except Exception:
            return False
        return True

    async def _answer(self, batch: Sequence[Inbound], replies: Sequence[Reply]) -> None:
        link = self._link
        if link.unconfirmed_publishes > MAX_UNCONFIRMED_REPLIES:
            await link.confirmations_below(MAX_UNCONFIRMED_REPLIES // 2)
        for msg, reply in zip(batch, replies, strict=True):
            try:
                if reply.topic is not None:
                    link.reply(reply.topic, reply.payload, reply.correlation)
                if reply.clear_retained is not None:
                    link.publish(
                        reply.clear_retained, b"", retain=True, json=False
                    ).add_done_callback(retrieved)
            except PublishError:
                # Not connected: the request stays unacknowledged and will be redelivered.
                self._metrics.inc("gateway_replies_lost_total")
            except Exception:
                # A reply no MQTT packet can carry (a topic over 65,535 bytes: the default
                # reply topic of a request on a topic just under it). Redelivered, it would fail
                # the same way for ever, and it took the pipeline down with it: the request is
                # acknowledged unanswered (its refusal is in the dead-letter table).
                log.exception("reply to a request on %.200s could not be published", msg.topic)
                self._metrics.inc("gateway_replies_unpublishable_total")
            msg.done = True
        self._flush_acks()
        self._oldest_open()  # (drops the answered: the deque stays as long as the backlog)
        self._progressed()

    def _flush_acks(self) -> None:
        unacked = self._unacked
        link = self._link
        while unacked and unacked[0].done:
            link.ack(unacked.popleft())
        if self._paused and self._queued + len(unacked) < self._max_inflight:
            self._paused = False
            link.resume_reading()
