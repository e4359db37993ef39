"""The topic grammar of SPEC §2: request topics, subscriptions and where replies may go."""

from __future__ import annotations

import aiomqtt
import pytest

from gateway.core.topics import Op, Route, Topics

P = "hydrobit/v2"
GROUP = "hydrobit-gateway"
SID = "6507f1e3c9d8e2a4b1f9c3d5"
RID = "rec_1234567890abcdef"

# Every request topic of SPEC §2 with the route it must parse to.
REQUESTS: list[tuple[str, Route]] = [
    ("sessions/open", Route(Op.OPEN_SESSION)),
    (f"sessions/{SID}/get", Route(Op.GET_SESSION, session_id=SID)),
    (f"sessions/{SID}/update", Route(Op.UPDATE_SESSION, session_id=SID)),
    (f"sessions/{SID}/close", Route(Op.CLOSE_SESSION, session_id=SID)),
    (f"sessions/{SID}/extend", Route(Op.EXTEND_SESSION, session_id=SID)),
    (f"sessions/{SID}/records", Route(Op.CREATE_RECORD, session_id=SID)),
    ("records/bulk", Route(Op.BULK_RECORDS)),
    (f"records/{RID}/get", Route(Op.GET_RECORD, record_id=RID)),
    (f"records/{RID}/void", Route(Op.VOID_RECORD, record_id=RID)),
    ("records/check-idempotency", Route(Op.CHECK_IDEMPOTENCY)),
]

# Topics the gateway writes (or that are nobody's request): no subscription may match them.
GATEWAY_OWNED = [
    f"{P}/sessions/{SID}/events",
    f"{P}/sessions/{SID}/state",
    f"{P}/gateway/status",
    f"{P}/clients/device-1",
    f"{P}/clients/device-1/replies",
]


@pytest.mark.parametrize("prefix", [P, "acme", "acme/prod/hb/v9"])
@pytest.mark.parametrize(("suffix", "route"), REQUESTS, ids=[s for s, _ in REQUESTS])
def test_parse_request_topics(prefix: str, suffix: str, route: Route) -> None:
    """Each SPEC §2 request topic parses to its operation and ids, under any prefix."""
    assert Topics(prefix).parse(f"{prefix}/{suffix}") == route


def test_prefix_slashes_are_normalised() -> None:
    """A prefix given with leading or trailing slashes means the same prefix."""
    topics = Topics("/hydrobit/v2/")
    assert topics.prefix == P
    assert topics.parse(f"{P}/sessions/open") == Route(Op.OPEN_SESSION)


def test_ids_are_taken_verbatim() -> None:
    """Ids keep their characters (dots, dashes, colons) and may be up to 128 characters."""
    topics = Topics(P)
    long_id = "s" * 128
    assert topics.parse(f"{P}/sessions/{long_id}/get") == Route(Op.GET_SESSION, session_id=long_id)
    assert topics.parse(f"{P}/records/a.b-c:d/void") == Route(Op.VOID_RECORD, record_id="a.b-c:d")


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("", id="empty"),
        pytest.param(P, id="prefix-only"),
        pytest.param(f"{P}/", id="prefix-slash"),
        pytest.param("hydrobit/v1/sessions/open", id="wrong-version"),
        pytest.param("other/v2/sessions/open", id="wrong-root"),
        pytest.param("hydrobit/sessions/open", id="short-prefix"),
        pytest.param(f"/{P}/sessions/open", id="leading-slash"),
        pytest.param(f"x/{P}/sessions/open", id="prefix-not-at-start"),
        pytest.param(f"{P}/Sessions/open", id="case-sensitive"),
        pytest.param(f"{P}/sessions", id="missing-action"),
        pytest.param(f"{P}/records", id="records-missing-action"),
        pytest.param(f"{P}/sessions/{SID}", id="session-without-action"),
        pytest.param(f"{P}/records/{RID}", id="record-without-action"),
        pytest.param(f"{P}/sessions/open/", id="trailing-slash"),
        pytest.param(f"{P}/sessions/open/x", id="open-extra-level"),
        pytest.param(f"{P}/records/bulk/x", id="bulk-extra-level"),
        pytest.param(f"{P}/sessions/{SID}/records/x", id="records-extra-level"),
        pytest.param(f"{P}/sessions/{SID}/records/reply", id="reply-of-records"),
        pytest.param(f"{P}/sessions/open/reply", id="reply-of-open"),
        pytest.param(f"{P}/records/{RID}/void/reply", id="reply-of-void"),
        pytest.param(f"{P}/sessions//get", id="empty-session-id"),
        pytest.param(f"{P}/records//void", id="empty-record-id"),
        pytest.param(f"{P}/sessions/{'s' * 129}/get", id="session-id-too-long"),
        pytest.param(f"{P}/sessions/a\x00b/get", id="nul-in-id"),
        pytest.param(f"{P}/sessions/{SID}/delete", id="unknown-session-action"),
        pytest.param(f"{P}/sessions/{SID}/void", id="record-action-on-session"),
        pytest.param(f"{P}/records/{RID}/update", id="unknown-record-action"),
        pytest.param(f"{P}/records/open", id="open-under-records"),
        pytest.param(f"{P}/sessions/bulk", id="bulk-under-sessions"),
        pytest.param(f"{P}/sessions/check-idempotency", id="check-under-sessions"),
        pytest.param(f"{P}/sessions/{SID}/events", id="events"),
        pytest.param(f"{P}/sessions/{SID}/state", id="state"),
        pytest.param(f"{P}/gateway/status", id="gateway-status"),
        pytest.param(f"{P}/workers/w1/get", id="unknown-kind"),
    ],
)
def test_parse_refuses_non_request_topics(topic: str) -> None:
    """Wrong prefix, extra or missing levels, empty ids and unknown actions are not requests."""
    assert Topics(P).parse(topic) is None


def test_subscriptions_are_the_ten_request_filters() -> None:
    """subscriptions() is exactly the 10 request filters, each under $share/<group>/."""
    filters = Topics(P).subscriptions(GROUP)
    assert len(filters) == 10
    assert len(set(filters)) == 10
    assert set(filters) == {
        f"$share/{GROUP}/{P}/sessions/open",
        f"$share/{GROUP}/{P}/sessions/+/get",
        f"$share/{GROUP}/{P}/sessions/+/update",
        f"$share/{GROUP}/{P}/sessions/+/close",
        f"$share/{GROUP}/{P}/sessions/+/extend",
        f"$share/{GROUP}/{P}/sessions/+/records",
        f"$share/{GROUP}/{P}/records/bulk",
        f"$share/{GROUP}/{P}/records/+/get",
        f"$share/{GROUP}/{P}/records/+/void",
        f"$share/{GROUP}/{P}/records/check-idempotency",
    }
    assert not any("#" in f for f in filters)


def _matching(topic: str, filters: list[str]) -> list[str]:
    return [f for f in filters if aiomqtt.Topic(topic).matches(f)]


@pytest.mark.parametrize(("suffix", "route"), REQUESTS, ids=[s for s, _ in REQUESTS])
def test_each_request_topic_has_exactly_one_filter(suffix: str, route: Route) -> None:
    """Every request topic is delivered by exactly one shared subscription."""
    assert len(_matching(f"{P}/{suffix}", Topics(P).subscriptions(GROUP))) == 1


@pytest.mark.parametrize(("suffix", "route"), REQUESTS, ids=[s for s, _ in REQUESTS])
def test_no_filter_matches_a_default_reply_topic(suffix: str, route: Route) -> None:
    """The default reply topic `<topic>/reply` of every request is not subscribed to."""
    topics = Topics(P)
    reply = topics.default_reply(f"{P}/{suffix}")
    assert reply == f"{P}/{suffix}/reply"
    assert _matching(reply, topics.subscriptions(GROUP)) == []


@pytest.mark.parametrize("topic", GATEWAY_OWNED)
def test_no_filter_matches_what_the_gateway_writes(topic: str) -> None:
    """Events, state, gateway status and client reply folders are not subscribed to."""
    assert _matching(topic, Topics(P).subscriptions(GROUP)) == []


def test_built_topics() -> None:
    """Events, state, status and client reply topics have the SPEC §2 shapes."""
    topics = Topics(P)
    assert topics.events(SID) == f"{P}/sessions/{SID}/events"
    assert topics.state(SID) == f"{P}/sessions/{SID}/state"
    assert topics.gateway_status == f"{P}/gateway/status"
    assert topics.client_replies("dev-1") == f"{P}/clients/dev-1"


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param("", id="empty"),
        pytest.param("#", id="hash"),
        pytest.param(f"{P}/#", id="prefix-hash"),
        pytest.param(f"{P}/clients/+/replies", id="plus"),
        pytest.param(f"{P}/sessions/{SID}/records/#", id="records-hash"),
        pytest.param("$SYS/broker/uptime", id="sys"),
        pytest.param(f"$share/{GROUP}/{P}/sessions/open", id="share"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("t" * 1025, id="too-long"),
        *(pytest.param(f"{P}/{suffix}", id=f"request-{suffix}") for suffix, _ in REQUESTS),
        pytest.param(f"{P}/sessions/{SID}/events", id="events"),
        pytest.param(f"{P}/sessions/{SID}/state", id="state"),
        pytest.param(f"{P}/gateway/status", id="status"),
        pytest.param(f"{P}/gateway/anything", id="gateway-folder"),
    ],
)
def test_reply_allowed_refuses(topic: str) -> None:
    """Wildcards, $-topics, request topics and events/state/status topics take no replies."""
    assert Topics(P).reply_allowed(topic) is False


@pytest.mark.parametrize(
    "topic",
    [
        f"{P}/clients/x/replies",
        f"{P}/sessions/S/records/reply",
        f"{P}/sessions/open/reply",
        f"{P}/records/bulk/reply",
        f"{P}/records/{RID}/void/reply",
        "devices/handheld-7/inbox",
    ],
)
def test_reply_allowed_accepts(topic: str) -> None:
    """Client reply folders and `<request>/reply` topics may take replies."""
    assert Topics(P).reply_allowed(topic) is True


@pytest.mark.parametrize(
    "topic",
    [
        pytest.param(f"{P}/sessions/open/reply", id="reply-of-open"),
        pytest.param(f"{P}/clients/x/replies", id="client-folder"),
        pytest.param(f"{P}/sessions//get", id="empty-session-id"),
        pytest.param(f"{P}/sessions//records", id="empty-session-id-records"),
        pytest.param(f"{P}/records//void", id="empty-record-id"),
        pytest.param(f"{P}/sessions/{'s' * 129}/records", id="session-id-too-long"),
        pytest.param(f"{P}/records/{'r' * 129}/get", id="record-id-too-long"),
    ],
)
def test_an_allowed_reply_topic_is_never_subscribed(topic: str) -> None:
    """A reply is never published where a gateway subscription would read it back as a request."""
    topics = Topics(P)
    assert not (topics.reply_allowed(topic) and _matching(topic, topics.subscriptions(GROUP)))


def test_reply_refusal_names_the_topic_the_rule_and_an_example() -> None:
    """A refused reply topic is named (a long one cut, with its length) with the rule and an
    example of a good one."""
    message = Topics(P).reply_refusal("replyTo", f"{P}/sessions/open")
    assert f"'{P}/sessions/open'" in message
    assert "wildcard" in message and f"{P}/clients/<client id>/replies" in message
    long = Topics(P).reply_refusal("Response Topic", "x" * 70_000)
    assert len(long) < 400 and "(70000 characters)" in long


def test_long_made_up_topics_are_answered_but_not_remembered() -> None:
    """A flood of long distinct topics (refused ids, refused reply topics) must not fill
    memory: their answers are computed each time, only sane-length topics are cached."""
    topics = Topics(P)
    for i in range(100):
        long_id = f"{i:06d}" + "s" * 5_000
        assert topics.parse(f"{P}/sessions/{long_id}/get") is None
        assert topics.reply_allowed(f"{P}/clients/dev/{'r' * 2_000}{i}") is False
    assert topics.parse(f"{P}/sessions/abc/get") is not None
    assert topics.reply_allowed(f"{P}/clients/dev/replies")
    assert len(topics._routes) == 1 and len(topics._allowed) == 1


# mosquitto 2.0 (mosquitto_validate_utf8) disconnects a client whose PUBLISH topic holds a
# control character (U+0001-U+001F, U+007F-U+009F) or a non-character (U+FDD0-U+FDEF,
# U+xFFFE, U+xFFFF): checked against mosquitto 2.0.11, reason 0x81 "malformed packet".
REFUSED_BY_MOSQUITTO = ["\x01", "\x1f", "\x7f", "\x85", "\ufdd0", "\ufffe", "\U0001ffff", "\ud800"]


@pytest.mark.parametrize("bad", REFUSED_BY_MOSQUITTO, ids=repr)
def test_no_reply_goes_to_a_topic_the_broker_disconnects_for(bad: str) -> None:
    """A device's replyTo (read before its token is checked) that mosquitto refuses would cost
    the gateway its connection, and, the request redelivered, again at every reconnect."""
    assert not Topics(P).reply_allowed(f"{P}/clients/dev-1/{bad}")


@pytest.mark.parametrize("fine", ["é", "日本", "\U0001f600", "a b", "~", "\u00a0"], ids=repr)
def test_replies_may_go_to_any_other_unicode_topic(fine: str) -> None:
    assert Topics(P).reply_allowed(f"{P}/clients/dev-1/{fine}")


SUBSCRIBED_CASES = [
    *(f"{P}/{suffix}" for suffix, _ in REQUESTS),
    f"{P}/sessions//records",  # '+' takes an empty level: delivered, then refused as no id
    f"{P}/records/{'x' * 300}/get",
    *GATEWAY_OWNED,
    *(f"{P}/{suffix}/reply" for suffix, _ in REQUESTS),
    f"other/v2/sessions/{SID}/records",
    f"{P}/v2/sessions/{SID}/records",
    "hydrobit/sessions/open",
    f"{P}/sessions/open/x",
    f"{P}/records",
    f"{P}",
    "",
]


@pytest.mark.parametrize("prefix", [P, "acme", "acme/prod/hb/v9"])
@pytest.mark.parametrize("topic", SUBSCRIBED_CASES)
def test_subscribed_agrees_with_mqtt_filter_matching(prefix: str, topic: str) -> None:
    """subscribed(topic) is True exactly when one of subscriptions()' filters matches it
    (judged by aiomqtt's own matcher): what a retiring replica uses to tell its own requests
    from those of a replica configured otherwise."""
    topic = topic.replace(P, prefix, 1) if topic.startswith(P) else topic
    topics = Topics(prefix)
    expected = bool(_matching(topic, topics.subscriptions(GROUP))) if topic else False
    assert topics.subscribed(topic) is expected
