"""The micro-batching pipeline: collect requests, answer each batch, PUBACK in receive order.

A batch is whatever arrived while the previous one was being applied (at most ``batch_max``,
after waiting at most ``batch_wait`` for company). Its replies are queued without awaiting
their PUBACKs; then its requests are marked done and acknowledged, always in the order they
arrived (MQTT 5 §4.6), so a request is never acknowledged before its effect is committed or its
error reply is on the wire ahead of the PUBACK.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence

from gateway.errors import StoreUnavailable
from gateway.metrics import Metrics
from gateway.transport.dispatch import Dispatcher, Reply
from gateway.transport.mqtt import Inbound, MqttLink, PublishError

log = logging.getLogger(__name__)

RETRY_INITIAL_S = 0.2
RETRY_MAX_S = 5.0
MAX_UNCONFIRMED_REPLIES = 20_000  # paho's packet ids wrap at 65,535


class Pipeline:
    """Batches inbound requests through the dispatcher and acknowledges them in order."""

    def __init__(
        self,
        link: MqttLink,
        dispatcher: Dispatcher,
        metrics: Metrics,
        *,
        batch_max: int,
        batch_wait_s: float,
        max_inflight: int = 2_000,
    ) -> None:
        self._link = link
        self._dispatcher = dispatcher
        self._metrics = metrics
        self._batch_max = batch_max
        self._batch_wait_s = batch_wait_s
        self._queue: deque[Inbound] = deque()
        self._unacked: deque[Inbound] = deque()
        self._arrived = asyncio.Event()
        self._stopping = asyncio.Event()
        self.store_ok = True
        # flow control: past max_inflight unacknowledged requests we stop reading the socket
        # (the broker keeps the backlog), and start again below half of it
        self._max_inflight = max_inflight
        self._paused = False

    # fed by the link ----------------------------------------------------------------------

    def submit(self, msg: Inbound) -> None:
        self._queue.append(msg)
        if msg.qos:
            self._unacked.append(msg)
        self._arrived.set()
        if not self._paused and len(self._queue) + len(self._unacked) >= 2 * self._max_inflight:
            self._paused = True
            self._link.pause_reading()
            self._metrics.inc("gateway_read_pauses_total")

    def connection_lost(self) -> None:
        """Forget what the old connection delivered: the broker redelivers it, unacknowledged."""
        self._unacked.clear()
        self._queue.clear()
        self._paused = False

    @property
    def backlog(self) -> int:
        return len(self._queue)

    @property
    def unacked(self) -> int:
        return len(self._unacked)

    def stop(self) -> None:
        """Take no new batch; the one in hand is finished and acknowledged."""
        self._stopping.set()
        self._arrived.set()

    # the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        while not self._stopping.is_set():
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                if self._stopping.is_set():
                    break
                if self._batch_wait_s > 0 and len(self._queue) < self._batch_max:
                    await asyncio.sleep(self._batch_wait_s)
            if not self._queue:
                continue
            n = min(len(self._queue), self._batch_max)
            batch = [self._queue.popleft() for _ in range(n)]
            replies = await self._apply(batch)
            if replies is None:
                return  # stopped while the database was away: nothing acknowledged
            await self._answer(batch, replies)

    async def _apply(self, batch: Sequence[Inbound]) -> list[Reply] | None:
        delay = RETRY_INITIAL_S
        while True:
            try:
                replies = await self._dispatcher.handle(batch)
            except StoreUnavailable as exc:
                self.store_ok = False
                self._metrics.inc("gateway_store_retries_total")
                log.warning(
                    "database unavailable (%s); holding %d requests unacknowledged, "
                    "retrying in %.1f s",
                    exc,
                    len(batch),
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), delay)
                if self._stopping.is_set():
                    return None
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if not self.store_ok:
                log.info("database is back; resuming")
            self.store_ok = True
            self._metrics.observe_batch(len(batch))
            return replies

    async def _answer(self, batch: Sequence[Inbound], replies: Sequence[Reply]) -> None:
        link = self._link
        if link.unconfirmed_publishes > MAX_UNCONFIRMED_REPLIES:
            await link.confirmations_below(MAX_UNCONFIRMED_REPLIES // 2)
        for msg, reply in zip(batch, replies, strict=True):
            try:
                link.publish(reply.topic, reply.payload, correlation=reply.correlation)
            except PublishError:
                # Not connected: the request stays unacknowledged and will be redelivered.
                self._metrics.inc("gateway_replies_lost_total")
            msg.done = True
        self._flush_acks()

    def _flush_acks(self) -> None:
        unacked = self._unacked
        link = self._link
        while unacked and unacked[0].done:
            link.ack(unacked.popleft())
        if self._paused and len(self._queue) + len(unacked) < self._max_inflight:
            self._paused = False
            link.resume_reading()
