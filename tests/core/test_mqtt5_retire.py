"""MQTT 5 packets for retiring a replica: UNSUBSCRIBE, UNSUBACK, DISCONNECT ending the session."""

from __future__ import annotations

import pytest

from gateway.core import mqtt5


def test_unsubscribe_packet() -> None:
    """UNSUBSCRIBE (MQTT 5 §3.10): fixed header 0xA2, packet id, no properties, the filters."""
    pkt = mqtt5.encode_unsubscribe(7, ["$share/g/a/+", "b"])
    body = b"\x00\x07" + b"\x00" + b"\x00\x0c$share/g/a/+" + b"\x00\x01b"
    assert pkt == bytes((0xA2, len(body))) + body


def test_unsuback_is_read_with_its_reason_codes() -> None:
    reader = mqtt5.PacketReader()
    (ack,) = reader.feed(b"\xb0\x05\x00\x07\x00\x00\x11")  # success, no subscription existed
    assert isinstance(ack, mqtt5.Ack)
    assert (ack.kind, ack.packet_id, ack.reasons) == (mqtt5.UNSUBACK, 7, b"\x00\x11")
    with pytest.raises(mqtt5.ProtocolError):
        reader.feed(b"\xb0\x01\x00")


def test_disconnect_can_end_the_session() -> None:
    """Session Expiry Interval 0 on DISCONNECT (§3.14.2.2.2): the broker forgets the session."""
    assert mqtt5.encode_disconnect() == b"\xe0\x00"
    assert mqtt5.encode_disconnect(session_expiry=0) == b"\xe0\x07\x00\x05\x11\x00\x00\x00\x00"
