"""Session events (SPEC §4): ``{"eventId", "type", "at", "sessionId", "data"}``."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from gateway.core.rules import iso


class EventType(StrEnum):
    OPENED = "session.opened"
    UPDATED = "session.updated"
    EXTENDED = "session.extended"
    CLOSED = "session.closed"
    EXPIRED = "session.expired"
    RECORD_VOIDED = "record.voided"


@dataclass(frozen=True, slots=True)
class SessionEvent:
    event_id: str
    type: str
    at: datetime
    session_id: str
    data: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "eventId": self.event_id,
            "type": self.type,
            "at": iso(self.at),
            "sessionId": self.session_id,
            "data": self.data,
        }


def new_event(
    type_: EventType, session_id: str, data: dict[str, Any], at: datetime
) -> SessionEvent:
    return SessionEvent(f"ev_{secrets.token_hex(12)}", type_.value, at, session_id, data)


def new_session_id() -> str:
    """24 hex digits, like the seeds' ``6507f1e3c9d8e2a4b1f9c3d5``."""
    return secrets.token_hex(12)


def new_record_id() -> str:
    return f"rec_{secrets.token_hex(8)}"


def new_record_ids(n: int) -> list[str]:
    """``n`` record ids from one read of the system's random source."""
    raw = secrets.token_hex(8 * n)
    return [f"rec_{raw[i : i + 16]}" for i in range(0, 16 * n, 16)]
