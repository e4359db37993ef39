"""What ``MqttLink.reply`` / ``publish`` do with the topics they are given: one too long to
encode is refused without leaving a packet id taken, and long topics are not remembered. The
link runs with a stand-in wire that keeps the bytes written."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import pytest

from gateway.core import mqtt5
from tests.support.link_stub import connected_link

PREFIX = "hydrobit/v2"


async def _sent() -> None:
    for _ in range(3):  # the flush is scheduled with call_soon
        await asyncio.sleep(0)


async def test_a_topic_too_long_to_encode_is_refused_without_taking_a_packet_id() -> None:
    """A reply or publish whose topic is over 65,535 bytes (the reply topic of a request on a
    65,530-byte topic) cannot be encoded: ``ProtocolError`` goes to the caller, and no packet
    id stays taken for a PUBACK that will never come (65,535 of those and nothing publishes)."""
    link, wire = connected_link()
    too_long = f"{PREFIX}/sessions/" + "x" * 65_600 + "/reply"
    with pytest.raises(mqtt5.ProtocolError):
        link.reply(too_long, b"{}", b"c-1")
    with pytest.raises(mqtt5.ProtocolError):
        link.publish(too_long, b"{}")
    assert link.unconfirmed_publishes == 0
    link.reply(f"{PREFIX}/clients/dev-1/replies", b"{}", b"c-2")
    await _sent()
    (reply,) = wire.packets()
    assert isinstance(reply, mqtt5.Publish)
    assert reply.topic == f"{PREFIX}/clients/dev-1/replies"
    assert link.unconfirmed_publishes == 1


async def test_long_reply_topics_are_not_remembered() -> None:
    """The link remembers the encoded header of topics of at most 256 characters (as
    ``core.topics`` does for parsed topics); a longer one is encoded each time, so a device
    naming long distinct reply topics (up to 64 KiB each) cannot make it hold gigabytes.
    Here 300 replies on 60 KB topics, once sent and acknowledged, leave nothing behind,
    while a short topic's header is still encoded once and reused."""
    link, wire = connected_link()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(300):
            link.reply(f"{PREFIX}/clients/{i:04d}{'x' * 60_000}/replies", b"{}", None)
        await _sent()
        assert len(wire.packets()) == 300
        for pid in list(link._pending):  # the broker's PUBACKs
            link._received(mqtt5.PUBACK_HEAD + pid.to_bytes(2, "big"))
        assert link.unconfirmed_publishes == 0
        wire.data = bytearray()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 5_000_000, f"{held / 1e6:.0f} MB of reply topics kept"
    short = f"{PREFIX}/clients/dev-1/replies"  # the hot path: encoded once, then reused
    assert link._topic_header(short) is link._topic_header(short)
