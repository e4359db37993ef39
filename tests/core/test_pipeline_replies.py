"""The pipeline on the real ``MqttLink`` with a stand-in wire that keeps the bytes written, so
that what goes out (replies, PUBACKs) is decoded with ``core.mqtt5``: requests whose replies
no packet can carry, and memory held for long topics."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

from gateway.core import mqtt5
from gateway.core.topics import Topics
from gateway.metrics import Metrics
from gateway.transport.dispatch import Dispatcher, Reply
from gateway.transport.mqtt import Inbound, MqttLink
from gateway.transport.pipeline import Pipeline
from tests.support.link_stub import connected_link

PREFIX = "hydrobit/v2"

# --- the pipeline on the real link -------------------------------------------------------------


class Echo:
    """A dispatcher that refuses every request on ``<topic>/reply`` (the default reply topic
    of a request that names no valid id, as Dispatcher._prepare picks it)."""

    async def handle(self, batch: Sequence[Inbound]) -> list[Reply]:
        return [Reply(f"{m.topic}/reply", b'{"status":"error"}', None) for m in batch]

    def fail_all(self, batch: Sequence[Inbound], exc: BaseException) -> list[Reply]:
        return [Reply(f"{m.topic}/reply", b"INTERNAL", None) for m in batch]


def inbound(topic: str, mid: int) -> Inbound:
    return Inbound(topic, b"{}", 1, mid, None, None, None, datetime.now(UTC), 1)


def pipeline_on(link: MqttLink) -> Pipeline:
    return Pipeline(
        link,
        cast(Dispatcher, Echo()),
        Metrics(),
        Topics(PREFIX),
        batch_max=100,
        batch_wait_s=0,
        depth=1,
    )


async def test_a_reply_topic_too_long_to_encode_does_not_kill_the_pipeline() -> None:
    """The broker takes a request on a 65,530-byte topic; its reply topic ``<topic>/reply`` is
    65,536 bytes, which no packet can carry. It is acknowledged unanswered and the next one is
    served (the pipeline died of it, and the gateway stopped: redelivered, again at every
    start), and no packet id is taken for the reply that never went out."""
    link, wire = connected_link()
    pipeline = pipeline_on(link)
    running = asyncio.create_task(pipeline.run())
    long_topic = f"{PREFIX}/sessions/" + "x" * 65_600
    long_topic = long_topic[: 65_530 - len("/records")] + "/records"
    assert len(long_topic.encode()) == 65_530
    pipeline.submit(inbound(long_topic, 1))
    pipeline.submit(inbound(f"{PREFIX}/sessions/s1/records", 2))
    for _ in range(100):
        if running.done():
            break
        acked = [p.packet_id for p in wire.packets() if isinstance(p, mqtt5.Ack)]
        if acked == [1, 2]:
            break
        await asyncio.sleep(0.01)
    pipeline.stop()
    crashed = running.done() and not running.cancelled() and running.exception() is not None
    if not running.done():
        await asyncio.wait_for(running, 5)
    acked = [p.packet_id for p in wire.packets() if isinstance(p, mqtt5.Ack)]
    assert not crashed, f"the pipeline died: {running.exception()!r}"
    assert acked == [1, 2]
    assert link.unconfirmed_publishes == 1  # the second reply only: no packet id leaked


async def test_long_request_topics_are_not_remembered() -> None:
    """Like ``Topics``, the pipeline's shard cache keeps only topics of at most 256
    characters: with any topic (up to 64 KiB), its 50,000 entries could hold ~3.3 GB for a
    device publishing long distinct topics. Short topics are still remembered."""
    link, _ = connected_link()
    pipeline = pipeline_on(link)
    running = asyncio.create_task(pipeline.run())
    try:
        for i in range(300):
            pipeline.submit(inbound(f"{PREFIX}/sessions/{i:04d}{'x' * 60_000}/records", i + 1))
        pipeline.submit(inbound(f"{PREFIX}/sessions/s1/records", 301))
        for _ in range(500):
            if pipeline.unacked == 0 and pipeline.backlog == 0:
                break
            await asyncio.sleep(0.01)
        assert pipeline.unacked == 0
        remembered = list(pipeline._shard_by_topic)
    finally:
        pipeline.stop()
        await asyncio.wait_for(running, 5)
    assert remembered == [f"{PREFIX}/sessions/s1/records"]
