"""The pipeline's retry policy, with stand-ins for the broker link and the dispatcher: a batch
that fails unexpectedly while the database does not answer is an outage (held, retried, never
answered INTERNAL); one that fails while the database answers is a bug (answered INTERNAL, so
acknowledged rather than redelivered for ever)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import cast

from gateway.core.topics import Topics
from gateway.metrics import Metrics
from gateway.transport.dispatch import Dispatcher, Reply
from gateway.transport.mqtt import Inbound, MqttLink
from gateway.transport.pipeline import Pipeline


class Link:
    """What the pipeline calls on the broker link, written down."""

    unconfirmed_publishes = 0

    def __init__(self) -> None:
        self.replies: list[tuple[str, bytes]] = []
        self.acked: list[int] = []

    def reply(self, topic: str, payload: bytes, correlation: bytes | None) -> None:
        self.replies.append((topic, payload))

    def ack(self, msg: Inbound) -> None:
        self.acked.append(msg.mid)

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class Dispatcher_:
    """Fails its first ``failures`` batches with ``exc``, then answers each request "ok"."""

    def __init__(self, failures: int, exc: Exception) -> None:
        self.failures = failures
        self.exc = exc
        self.calls = 0

    async def handle(self, batch: Sequence[Inbound]) -> list[Reply]:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.exc
        return [Reply(f"{m.topic}/reply", b"ok", None) for m in batch]

    def fail_all(self, batch: Sequence[Inbound], exc: BaseException) -> list[Reply]:
        return [Reply(f"{m.topic}/reply", b"INTERNAL", None) for m in batch]


def inbound(mid: int, topic: str = "hydrobit/v2/sessions/s1/records", qos: int = 1) -> Inbound:
    return Inbound(
        topic=topic,
        payload=b"{}",
        qos=qos,
        mid=mid,
        response_topic=None,
        correlation=None,
        authorization=None,
        received_at=datetime.now(UTC),
        epoch=1,
    )


async def run_one_batch(dispatcher: Dispatcher_, probe_fails: bool) -> tuple[Link, Metrics]:
    link, metrics = Link(), Metrics()
    probes: list[int] = []

    async def probe() -> None:
        probes.append(1)
        if probe_fails:
            raise ConnectionRefusedError("connection refused")

    pipeline = Pipeline(
        cast(MqttLink, link),
        cast(Dispatcher, dispatcher),
        metrics,
        Topics("hydrobit/v2"),
        batch_max=10,
        batch_wait_s=0,
        depth=1,
        probe=probe,
    )
    running = asyncio.create_task(pipeline.run())
    for mid in (1, 2, 3):
        pipeline.submit(inbound(mid))
    for _ in range(200):
        if len(link.acked) == 3:
            break
        await asyncio.sleep(0.02)
    pipeline.stop()
    await asyncio.wait_for(running, 5)
    assert probes, "the database was not asked"
    return link, metrics


async def test_an_odd_failure_while_the_database_is_away_is_held_and_retried() -> None:
    link, metrics = await run_one_batch(
        Dispatcher_(1, RuntimeError("cannot switch to state 12")), probe_fails=True
    )
    assert [payload for _, payload in link.replies] == [b"ok"] * 3
    assert link.acked == [1, 2, 3]
    assert metrics.value("gateway_store_retries_total") == 1
    assert metrics.value("gateway_batch_failures_total") == 0


async def test_a_failure_while_the_database_answers_is_a_bug_answered_internal() -> None:
    link, metrics = await run_one_batch(Dispatcher_(1, RuntimeError("a bug")), probe_fails=False)
    assert [payload for _, payload in link.replies] == [b"INTERNAL"] * 3
    assert link.acked == [1, 2, 3]
    assert metrics.value("gateway_batch_failures_total") == 1
    assert metrics.value("gateway_store_retries_total") == 0


class Recorder(Dispatcher_):
    """Answers each request "ok" and writes down how many came in each batch."""

    def __init__(self) -> None:
        super().__init__(0, RuntimeError())
        self.sizes: list[int] = []

    async def handle(self, batch: Sequence[Inbound]) -> list[Reply]:
        self.sizes.append(len(batch))
        return await super().handle(batch)


async def test_a_burst_of_bulks_is_cut_into_batches_by_bytes() -> None:
    """Batches are cut at BATCH_MAX_BYTES of payload as well as batch_max requests: twenty
    300 KB offline syncs queued together go three to a batch (a single 500-request batch of
    1,000-record bulks would be one statement past the statement timeout, retried for ever);
    small requests still fill a batch; one request over the bound still goes, alone."""
    link, recorder = Link(), Recorder()
    pipeline = Pipeline(
        cast(MqttLink, link),
        cast(Dispatcher, recorder),
        Metrics(),
        Topics("hydrobit/v2"),
        batch_max=500,
        batch_wait_s=0,
        depth=1,
    )
    sizes = [300_000] * 20 + [2_000_000] + [250] * 100
    for mid, size in enumerate(sizes, 1):
        msg = inbound(mid)
        msg.payload = b"x" * size
        pipeline.submit(msg)
    running = asyncio.create_task(pipeline.run())
    for _ in range(200):
        if len(link.acked) == len(sizes):
            break
        await asyncio.sleep(0.02)
    pipeline.stop()
    await asyncio.wait_for(running, 5)
    assert link.acked == list(range(1, len(sizes) + 1))
    assert recorder.sizes == [3] * 6 + [2, 1, 100]


def test_a_dead_letter_that_cannot_be_kept_never_stops_the_answers() -> None:
    """A refusal the dead-letter writer could not take (a lone surrogate it could not
    encode) raised out of the reply being built, then out of fail_all, which built the same
    reply again: the pipeline died and the gateway with it. The reply goes out regardless."""
    from gateway.core.auth import KeyRing, TokenVerifier
    from gateway.service import Service

    def refuse_to_keep(_refusal: object) -> None:
        raise UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed")

    dispatcher = Dispatcher(
        cast(Service, None),
        TokenVerifier(KeyRing(secret="s" * 32)),
        Topics("hydrobit/v2"),
        max_payload_bytes=1024,
        max_json_depth=16,
        on_refused=refuse_to_keep,
    )
    batch = [inbound(1), inbound(2)]
    replies = dispatcher.fail_all(batch, RuntimeError("a bug"))
    assert [r.topic for r in replies] == ["hydrobit/v2/sessions/s1/records/reply"] * 2
    assert all(b'"INTERNAL"' in r.payload for r in replies)
    answered = asyncio.run(dispatcher.handle([inbound(3)]))  # refused: no token
    assert b'"UNAUTHORIZED"' in answered[0].payload
