"""The retained-state publisher's memory of what the broker holds, with stand-ins for the
store and the broker link."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any, cast

from gateway.config import load_settings
from gateway.core.rules import SessionFacts
from gateway.core.topics import Topics
from gateway.core.views import Session
from gateway.metrics import Metrics
from gateway.publisher import Publisher
from gateway.store.postgres import PostgresStore
from gateway.transport.mqtt import MqttLink, PublishError, PublishRefused


class Link:
    """Confirms every publish at once and writes down its topic."""

    def __init__(self) -> None:
        self.published: list[str] = []

    def publish(self, topic: str, payload: bytes, **_: Any) -> asyncio.Future[None]:
        self.published.append(topic)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def session(session_id: str) -> Session:
    facts = SessionFacts(
        session_id=session_id,
        company_id="comp_1",
        owner="user_1",
        status="open",
        opened_at=datetime(2025, 10, 19, 8, tzinfo=UTC),
        closed_at=None,
        close_reason=None,
        max_duration_hours=12.0,
        version=1,
    )
    return Session(
        facts, "proj_1", None, None, "UTC", date(2025, 10, 19), "box", Decimal("5.5"), None, None
    )


async def test_a_broker_that_lost_our_session_gets_every_state_again() -> None:
    """A state already published is not published again until its session changes; but once
    the broker comes back without our session (restarted without persistence: its retained
    messages are gone too), every listed session's state is published again, as a new leader
    does. With the session present (persistence on), nothing is repeated."""
    link = Link()
    publisher = Publisher(
        cast(PostgresStore, None),
        cast(MqttLink, link),
        Topics("hydrobit/v2"),
        load_settings(jwt_secret="x" * 40),
        Metrics(),
    )
    states = [(7, session("s1")), (9, session("s2"))]
    assert await publisher._publish_states(states)
    assert await publisher._publish_states(states)  # unchanged: not again
    publisher.broker_connected(session_present=True)
    assert await publisher._publish_states(states)
    assert len(link.published) == 2
    publisher.broker_connected(session_present=False)
    assert await publisher._publish_states(states)
    assert link.published == ["hydrobit/v2/sessions/s1/state", "hydrobit/v2/sessions/s2/state"] * 2


async def test_a_publish_too_large_for_the_broker_is_given_up_not_sent_again() -> None:
    """A session event or state over the broker's message_size_limit is refused (PUBACK 0x95)
    however often it is sent: it was sent again every round for ever (a 1.7 MB event of a
    session with 10,000 workers, every second). It counts as settled now, and is counted; a
    refusal that may pass later (0x87: an ACL being fixed) and a missing PUBACK are not."""
    metrics = Metrics()
    publisher = Publisher(
        cast(PostgresStore, None),
        cast(MqttLink, Link()),
        Topics("hydrobit/v2"),
        load_settings(),
        metrics,
    )
    loop = asyncio.get_running_loop()
    outcomes: list[asyncio.Future[None]] = [loop.create_future() for _ in range(4)]
    outcomes[0].set_result(None)
    outcomes[1].set_exception(PublishRefused(0x95))
    outcomes[2].set_exception(PublishRefused(0x87))
    outcomes[3].set_exception(PublishError("link down"))
    assert await publisher._confirmed(outcomes) == [True, True, False, False]
    assert metrics.value("gateway_publishes_too_large_total") == 1
