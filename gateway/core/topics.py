"""The topic grammar of SPEC §2: parse request topics, build reply, event and state topics."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class Op(StrEnum):
    """A request operation, named after the seed endpoint it mirrors."""

    OPEN_SESSION = "sessions.open"
    GET_SESSION = "sessions.get"
    UPDATE_SESSION = "sessions.update"
    CLOSE_SESSION = "sessions.close"
    EXTEND_SESSION = "sessions.extend"
    CREATE_RECORD = "records.create"
    BULK_RECORDS = "records.bulk"
    GET_RECORD = "records.get"
    VOID_RECORD = "records.void"
    CHECK_IDEMPOTENCY = "records.check"


_SESSION_ACTIONS = {
    "get": Op.GET_SESSION,
    "update": Op.UPDATE_SESSION,
    "close": Op.CLOSE_SESSION,
    "extend": Op.EXTEND_SESSION,
    "records": Op.CREATE_RECORD,
}
_RECORD_ACTIONS = {"get": Op.GET_RECORD, "void": Op.VOID_RECORD}

MAX_ID_LENGTH = 128
TOPIC_CACHE = 50_000
# only topics of a sane length are remembered: a flood of long made-up topics must not fill
# memory (50,000 of at most this many characters: ~20 MB at worst)
CACHEABLE_TOPIC = 256

# What mosquitto (mosquitto_validate_utf8, 2.0) refuses in a topic, disconnecting the client
# that published it: NUL, control characters (U+0001-U+001F, U+007F-U+009F), surrogates and
# non-characters (U+FDD0-U+FDEF, U+xFFFE and U+xFFFF of every plane). A reply to such a topic
# (a device's replyTo) would cut the gateway off, and the redelivered request again each time.
_REFUSED_BY_BROKERS = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef"
    + "".join(f"{chr(plane << 16 | 0xFFFE)}{chr(plane << 16 | 0xFFFF)}" for plane in range(17))
    + "]"
)

# (levels after the prefix, first level, last level) of every topic the gateway reads or owns
_RESERVED_SHAPES = frozenset(
    [(3, "sessions", a) for a in (*_SESSION_ACTIONS, "events", "state")]
    + [(3, "records", a) for a in _RECORD_ACTIONS]
)
_FIXED = frozenset({"open", "bulk", "check-idempotency"})


@dataclass(frozen=True, slots=True)
class Route:
    """What a request topic asks for."""

    op: Op
    session_id: str | None = None
    record_id: str | None = None


def valid_id(value: str) -> bool:
    return 0 < len(value) <= MAX_ID_LENGTH and "\x00" not in value


class Topics:
    """Every topic the gateway reads or writes, under one prefix."""

    __slots__ = ("_allowed", "_n", "_parts", "_routes", "prefix")

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.strip("/")
        self._parts = tuple(self.prefix.split("/"))
        self._n = len(self._parts)
        # Devices reuse their topics: remember the answers (bounded; pure either way).
        self._routes: dict[str, Route | None] = {}
        self._allowed: dict[str, bool] = {}

    def parse(self, topic: str) -> Route | None:
        """The route of a request topic, or None if it is not one (or names no valid id)."""
        try:
            return self._routes[topic]
        except KeyError:
            pass
        route = self._parse(topic)
        if len(topic) <= CACHEABLE_TOPIC:
            if len(self._routes) >= TOPIC_CACHE:
                self._routes.clear()
            self._routes[topic] = route
        return route

    def _parse(self, topic: str) -> Route | None:
        levels = topic.split("/")
        n = self._n
        if len(levels) < n + 2 or tuple(levels[:n]) != self._parts:
            return None
        rest = levels[n:]
        kind = rest[0]
        if kind == "sessions":
            if len(rest) == 2 and rest[1] == "open":
                return Route(Op.OPEN_SESSION)
            if len(rest) == 3 and rest[2] in _SESSION_ACTIONS and valid_id(rest[1]):
                return Route(_SESSION_ACTIONS[rest[2]], session_id=rest[1])
        elif kind == "records":
            if len(rest) == 2:
                if rest[1] == "bulk":
                    return Route(Op.BULK_RECORDS)
                if rest[1] == "check-idempotency":
                    return Route(Op.CHECK_IDEMPOTENCY)
            elif len(rest) == 3 and rest[2] in _RECORD_ACTIONS and valid_id(rest[1]):
                return Route(_RECORD_ACTIONS[rest[2]], record_id=rest[1])
        return None

    def subscribed(self, topic: str) -> bool:
        """Does ``topic`` match one of the request filters of ``subscriptions`` (``+`` takes
        any one level, an empty or invalid id too)? A message on any other topic came through
        a subscription of another configuration (a retired replica's old prefix)."""
        levels = topic.split("/")
        n = self._n
        if len(levels) < n + 2 or tuple(levels[:n]) != self._parts:
            return False
        rest = levels[n:]
        if len(rest) == 2:
            return (rest[0], rest[1]) in {
                ("sessions", "open"),
                ("records", "bulk"),
                ("records", "check-idempotency"),
            }
        if len(rest) == 3:
            actions = {"sessions": _SESSION_ACTIONS, "records": _RECORD_ACTIONS}.get(rest[0])
            return actions is not None and rest[2] in actions
        return False

    def subscriptions(self, group: str) -> list[str]:
        """Shared subscription filters: exactly the request topics, nothing the gateway writes."""
        p = self.prefix
        filters = [
            f"{p}/sessions/open",
            *(f"{p}/sessions/+/{action}" for action in _SESSION_ACTIONS),
            f"{p}/records/bulk",
            f"{p}/records/check-idempotency",
            *(f"{p}/records/+/{action}" for action in _RECORD_ACTIONS),
        ]
        return [f"$share/{group}/{f}" for f in filters]

    def default_reply(self, request_topic: str) -> str:
        return f"{request_topic}/reply"

    def events(self, session_id: str) -> str:
        return f"{self.prefix}/sessions/{session_id}/events"

    def state(self, session_id: str) -> str:
        return f"{self.prefix}/sessions/{session_id}/state"

    @property
    def gateway_status(self) -> str:
        return f"{self.prefix}/gateway/status"

    def client_replies(self, client_id: str) -> str:
        """The per-client reply folder that the broker ACL lets only that client read."""
        return f"{self.prefix}/clients/{client_id}"

    def reply_refusal(self, what: str, topic: str) -> str:
        """Why ``topic`` (a Response Topic or replyTo) gets no reply there, and what to use."""
        shown = topic if len(topic) <= 80 else f"{topic[:80]}... ({len(topic)} characters)"
        return (
            f"{what} {shown!r} is not a topic replies may go to: not a wildcard (+, #), a $ "
            "topic, over 1024 characters, with a control character, or one of the gateway's "
            "own request, events, state or status topics; use for example "
            f"{self.client_replies('<client id>')}/replies"
        )

    def reply_allowed(self, topic: str) -> bool:
        """May the gateway publish a reply to ``topic``?

        Not to a wildcard or system topic, and never to a topic the gateway itself consumes
        (a reply would come back as a request) or owns (events, state, status).
        """
        known = self._allowed.get(topic)
        if known is not None:
            return known
        allowed = self._reply_allowed(topic)
        if len(topic) <= CACHEABLE_TOPIC:
            if len(self._allowed) >= TOPIC_CACHE:
                self._allowed.clear()
            self._allowed[topic] = allowed
        return allowed

    def _reply_allowed(self, topic: str) -> bool:
        if not topic or len(topic) > 1024 or topic.startswith("$"):
            return False
        if "+" in topic or "#" in topic or _REFUSED_BY_BROKERS.search(topic):
            return False
        levels = topic.split("/")
        n = self._n
        if tuple(levels[:n]) != self._parts:
            return True
        rest = levels[n:]
        if rest[:1] == ["gateway"]:
            return False
        # Anything our subscriptions match, whatever the id (the + wildcard takes any level).
        shape = (len(rest), rest[0] if rest else "", rest[-1] if rest else "")
        return shape not in _RESERVED_SHAPES and not (
            len(rest) == 2 and rest[0] in ("sessions", "records") and rest[1] in _FIXED
        )
