"""Order across the pipeline's shards, with stand-ins for the broker link and the dispatcher.

Requests are sharded by the id in their topic, so a bulk (no id: shard 0) or a void (by record
id) can sit in another shard than its session's close. A close, extend or update is a barrier:
it is applied only once everything received before it is, and nothing received after it is
applied before it. Without that, a bulk sent before a close was answered SESSION_CLOSED (1000
records refused under no load at all), and a void sent before a close left the mistaken record
paid.
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest

from gateway.core.topics import Topics
from gateway.metrics import Metrics
from gateway.transport.dispatch import Dispatcher, Reply
from gateway.transport.mqtt import Inbound, MqttLink
from gateway.transport.pipeline import Pipeline
from tests.core.test_pipeline_policy import Link
from tests.core.test_pipeline_policy import inbound as policy_inbound

P = "hydrobit/v2"
S0, S1 = "sA", "sD"  # sessions of shard 0 and shard 1 (crc32 % 2)
R1 = "r1"  # a record id of shard 1
assert zlib.crc32(S0.encode()) % 2 == 0 and zlib.crc32(S1.encode()) % 2 == 1
assert zlib.crc32(R1.encode()) % 2 == 1


class SlowDispatcher:
    """Applies a batch in ``delay(topic)`` seconds per request; logs when each starts and ends."""

    def __init__(self, slow: dict[str, float]) -> None:
        self.slow = slow
        self.log: list[tuple[str, str]] = []

    async def handle(self, batch: Sequence[Inbound]) -> list[Reply]:
        for m in batch:
            self.log.append(("start", m.topic))
        await asyncio.sleep(sum(self.slow.get(m.topic.split("/", 2)[2], 0.0) for m in batch))
        for m in batch:
            self.log.append(("end", m.topic))
        return [Reply(f"{m.topic}/reply", b"ok", None) for m in batch]

    def fail_all(self, batch: Sequence[Inbound], exc: BaseException) -> list[Reply]:
        raise AssertionError("no batch fails here") from exc

    def index(self, event: str, suffix: str) -> int:
        return self.log.index((event, f"{P}/{suffix}"))


def inbound(suffix: str, mid: int, qos: int = 1) -> Inbound:
    return policy_inbound(mid, f"{P}/{suffix}", qos)


def two_shards(dispatcher: SlowDispatcher) -> tuple[Link, Pipeline]:
    link = Link()
    pipeline = Pipeline(
        cast(MqttLink, link),
        cast(Dispatcher, dispatcher),
        Metrics(),
        Topics(P),
        batch_max=100,
        batch_wait_s=0,
        depth=2,
    )
    return link, pipeline


async def run(
    dispatcher: SlowDispatcher, suffixes: Sequence[str], qos: int = 1
) -> tuple[Link, Pipeline]:
    link, pipeline = two_shards(dispatcher)
    running = asyncio.create_task(pipeline.run())
    for mid, suffix in enumerate(suffixes, 1):
        pipeline.submit(inbound(suffix, mid, qos))
    for _ in range(500):
        if sum(1 for e, _ in dispatcher.log if e == "end") == len(suffixes):
            break
        await asyncio.sleep(0.01)
    pipeline.stop()
    await asyncio.wait_for(running, 5)
    return link, pipeline


@pytest.mark.parametrize("control", ["close", "extend", "update"])
@pytest.mark.parametrize("qos", [0, 1])
async def test_a_bulk_received_before_a_close_is_applied_before_it(control: str, qos: int) -> None:
    dispatcher = SlowDispatcher({"records/bulk": 0.2})
    link, _ = await run(dispatcher, ["records/bulk", f"sessions/{S1}/{control}"], qos)
    assert dispatcher.index("end", "records/bulk") < dispatcher.index(
        "start", f"sessions/{S1}/{control}"
    ), dispatcher.log
    if qos:
        assert link.acked == [1, 2]


async def test_a_void_received_before_a_close_is_applied_before_it() -> None:
    dispatcher = SlowDispatcher({f"records/{R1}/void": 0.2})
    await run(dispatcher, [f"records/{R1}/void", f"sessions/{S0}/close"])
    assert dispatcher.index("end", f"records/{R1}/void") < dispatcher.index(
        "start", f"sessions/{S0}/close"
    ), dispatcher.log


async def test_nothing_received_after_a_close_is_applied_before_it() -> None:
    """The other way round: a bulk or void sent after the close does not overtake it."""
    dispatcher = SlowDispatcher({f"sessions/{S1}/close": 0.2})
    await run(dispatcher, [f"sessions/{S1}/close", "records/bulk", f"records/{R1}/void"])
    closed = dispatcher.index("end", f"sessions/{S1}/close")
    assert closed < dispatcher.index("start", "records/bulk"), dispatcher.log
    assert closed < dispatcher.index("start", f"records/{R1}/void"), dispatcher.log


async def test_records_and_bulks_without_a_barrier_still_run_side_by_side() -> None:
    """Only a session change waits: the two shards keep applying their batches at once."""
    dispatcher = SlowDispatcher({"records/bulk": 0.2, f"sessions/{S1}/records": 0.2})
    await run(dispatcher, ["records/bulk", f"sessions/{S1}/records"])
    assert dispatcher.index("start", f"sessions/{S1}/records") < dispatcher.index(
        "end", "records/bulk"
    ), dispatcher.log


async def test_the_oldest_pending_arrival_is_what_the_sweeper_may_close_up_to() -> None:
    """A session is not swept past a request still queued from before its deadline (an
    extend sent in time was refused SESSION_EXPIRED when the sweeper got there first)."""
    link, pipeline = two_shards(SlowDispatcher({"records/bulk": 0.3}))
    assert pipeline.oldest_pending_arrival() is None
    running = asyncio.create_task(pipeline.run())
    early = inbound("records/bulk", 1)
    early.received_at = datetime.now(UTC) - timedelta(seconds=30)
    pipeline.submit(early)
    pipeline.submit(inbound(f"sessions/{S1}/extend", 2))
    await asyncio.sleep(0.05)
    assert pipeline.oldest_pending_arrival() == early.received_at
    for _ in range(200):
        if link.acked == [1, 2]:
            break
        await asyncio.sleep(0.01)
    assert link.acked == [1, 2]
    assert pipeline.oldest_pending_arrival() is None
    pipeline.stop()
    await asyncio.wait_for(running, 5)
