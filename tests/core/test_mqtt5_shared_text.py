"""core.mqtt5: a device's repeated topic, reply topic and token decode to one shared string
(a backlog held ~1 KB of copies per request), within bounds an attacker cannot grow."""

from __future__ import annotations

from gateway.core import mqtt5
from gateway.simulate import publish_packet

TOPIC = "hydrobit/v2/sessions/s1/records"
REPLIES = "hydrobit/v2/clients/dev-1/replies"
TOKEN = "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0." + "s" * 43


def decoded(topic: str = TOPIC, token: str = TOKEN, n: int = 1) -> mqtt5.Publish:
    packet = publish_packet(
        topic,
        b'{"units": %d}' % n,
        packet_id=n,
        response_topic=REPLIES,
        correlation=b"c%d" % n,
        authorization=token,
    )
    [pkt] = mqtt5.PacketReader().feed(packet)
    assert isinstance(pkt, mqtt5.Publish)
    return pkt


def test_repeated_texts_are_one_object_each() -> None:
    first, second = decoded(n=1), decoded(n=2)
    assert (second.topic, second.response_topic, second.authorization) == (
        TOPIC,
        REPLIES,
        TOKEN,
    )
    assert second.topic is first.topic
    assert second.response_topic is first.response_topic
    assert second.authorization is first.authorization
    assert second.payload != first.payload and second.correlation != first.correlation


def test_different_texts_stay_different() -> None:
    other = decoded(token=TOKEN + "x")
    assert other.authorization == TOKEN + "x" != decoded().authorization


def test_the_table_is_bounded_in_entries_and_in_text_length() -> None:
    for i in range(mqtt5._SHARED_MAX * 2):
        decoded(token=f"Bearer t{i}")
        assert len(mqtt5._SHARED) <= mqtt5._SHARED_MAX
    long_token = "Bearer " + "x" * mqtt5._SHARED_TEXT_MAX
    a, b = decoded(token=long_token), decoded(token=long_token)
    assert a.authorization == b.authorization == long_token
    assert a.authorization is not b.authorization  # not kept: a flood of long ones grows nothing
    assert all(len(raw) <= mqtt5._SHARED_TEXT_MAX for raw in mqtt5._SHARED)
