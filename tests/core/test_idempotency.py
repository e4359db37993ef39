"""Idempotency keys and the replay-or-conflict decision of SPEC §5."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone

import pytest

from gateway.core.idempotency import (
    RecordContent,
    check_idempotency_key,
    client_key,
    resolve_existing,
    split_client_key,
)
from gateway.errors import IdempotencyConflict, InvalidRequest

SID = "6507f1e3c9d8e2a4b1f9c3d5"
AT = datetime(2025, 10, 19, 14, 30, tzinfo=UTC)
STORED = RecordContent(
    session_id=SID,
    worker_id="JS0315",
    worker_name="John Smith",
    units=5,
    recorded_at=AT,
    client_event_id="evt_1234567890abcdef",
    idempotency_key=None,
    record_id="rec_1",
)
INCOMING = replace(STORED, record_id=None)
CKEY = f"client:{SID}:JS0315:evt_1234567890abcdef"


@pytest.mark.parametrize(
    ("parts", "key"),
    [
        ((SID, "JS0315", "evt_1234567890abcdef"), CKEY),
        (("s", "w", "e"), "client:s:w:e"),
        (("s", "w:1", "e:2"), "client:s:w:1:e:2"),
    ],
)
def test_client_key_format(parts: tuple[str, str, str], key: str) -> None:
    """The key is client:{sessionId}:{workerId}:{clientEventId} (the seeds' HEAD example)."""
    assert client_key(*parts) == key


@pytest.mark.parametrize(
    ("key", "split"),
    [
        (CKEY, (SID, "JS0315:evt_1234567890abcdef")),
        ("client:s:w:e", ("s", "w:e")),
        ("client:s:w:1:e:2", ("s", "w:1:e:2")),
        ("client:s:w::", ("s", "w::")),
        ("client:s:urn:worker:7:evt:9", ("s", "urn:worker:7:evt:9")),
    ],
)
def test_split_client_key(key: str, split: tuple[str, str]) -> None:
    """A client key splits into its session id and the worker/event rest (which may hold ':')."""
    assert split_client_key(key) == split


@pytest.mark.parametrize(
    ("session_id", "worker_id", "event_id"),
    [(SID, "JS0315", "evt_1"), (SID, "a:b", "c"), (SID, "a", "b:c:d"), ("s", "w" * 128, "e" * 128)],
)
def test_split_client_key_round_trip(session_id: str, worker_id: str, event_id: str) -> None:
    """split_client_key(client_key(s, w, e)) gives s and 'w:e' back."""
    key = client_key(session_id, worker_id, event_id)
    assert split_client_key(key) == (session_id, f"{worker_id}:{event_id}")


@pytest.mark.parametrize(
    "key",
    [
        "",
        "mobile-app-key-timestamp-123456",
        "client",
        "client:",
        "client:s",
        "client:s:",
        "client:s:w",
        "client::w:e",
        "Client:s:w:e",
        " client:s:w:e",
        "clientx:s:w:e",
        "idem:s:w:e",
    ],
)
def test_non_client_keys(key: str) -> None:
    """Anything that is not client:{s}:{w}:{e} is None (taken as an idempotencyKey instead)."""
    assert split_client_key(key) is None


def test_resolve_new_record() -> None:
    """No stored record under either key: the record is new."""
    assert resolve_existing(INCOMING, None, None) is None


@pytest.mark.parametrize(
    "incoming",
    [
        pytest.param(INCOMING, id="identical"),
        pytest.param(replace(INCOMING, units=5.0), id="units-5.0"),
        pytest.param(
            replace(
                INCOMING,
                recorded_at=datetime(2025, 10, 19, 8, 30, tzinfo=timezone(-6 * timedelta(hours=1))),
            ),
            id="recorded-at-other-offset",
        ),
        pytest.param(
            replace(
                INCOMING,
                recorded_at=datetime(
                    2025, 10, 19, 20, 0, tzinfo=timezone(timedelta(hours=5, minutes=30))
                ),
            ),
            id="recorded-at-half-hour-offset",
        ),
    ],
)
def test_resolve_replay_by_client_key(incoming: RecordContent) -> None:
    """Same content under the same client key is a replay of the stored record."""
    assert resolve_existing(incoming, STORED, None) is STORED


@pytest.mark.parametrize(
    ("change", "fields"),
    [
        ({"units": 6}, ["units"]),
        ({"units": 5.0001}, ["units"]),
        ({"worker_name": "Jon Smith"}, ["worker_name"]),
        ({"recorded_at": AT + timedelta(milliseconds=1)}, ["recordedAtUtc"]),
        ({"idempotency_key": "mobile-app-key-1"}, ["idempotencyKey"]),
        (
            {"units": 1, "worker_name": "X", "recorded_at": AT - timedelta(hours=1)},
            ["worker_name", "units", "recordedAtUtc"],
        ),
    ],
)
def test_resolve_conflict_by_client_key(change: dict[str, object], fields: list[str]) -> None:
    """Different content under the same client key is IDEMPOTENCY_CONFLICT naming what differs."""
    incoming = replace(INCOMING, **change)  # type: ignore[arg-type]
    with pytest.raises(IdempotencyConflict) as info:
        resolve_existing(incoming, STORED, None)
    assert info.value.code == "IDEMPOTENCY_CONFLICT"
    assert info.value.details["key"] == CKEY
    assert sorted(info.value.details["fields"]) == sorted(fields)
    assert CKEY in info.value.message
    assert "new clientEventId" in info.value.message


def test_resolve_conflict_when_stored_key_differs() -> None:
    """A stored idempotencyKey that the replay omits is a difference too."""
    stored = replace(STORED, idempotency_key="mobile-app-key-1")
    with pytest.raises(IdempotencyConflict) as info:
        resolve_existing(INCOMING, stored, None)
    assert info.value.details["fields"] == ["idempotencyKey"]


def test_resolve_both_keys_name_the_same_record() -> None:
    """Client key and idempotencyKey finding the same stored record, same content: a replay."""
    stored = replace(STORED, idempotency_key="k1")
    incoming = replace(INCOMING, idempotency_key="k1")
    assert resolve_existing(incoming, stored, stored) is stored


def test_resolve_keys_naming_two_records_conflict() -> None:
    """Client key and idempotencyKey naming two different stored records is a conflict."""
    by_client = replace(STORED, idempotency_key=None, record_id="rec_1")
    by_idem = replace(STORED, client_event_id="evt_other", idempotency_key="k1", record_id="rec_2")
    incoming = replace(INCOMING, idempotency_key="k1")
    with pytest.raises(IdempotencyConflict) as info:
        resolve_existing(incoming, by_client, by_idem)
    assert info.value.details["key"] == CKEY


def test_resolve_idempotency_key_replay_in_the_same_session() -> None:
    """An idempotencyKey names its record: same content in the same session is a replay."""
    stored = replace(STORED, client_event_id="evt_first", idempotency_key="k1")
    incoming = replace(INCOMING, client_event_id="evt_retry", idempotency_key="k1")
    assert resolve_existing(incoming, None, stored) is stored


def test_resolve_idempotency_key_replay_from_another_session_of_the_owner() -> None:
    """Same content (SPEC §5 lists no sessionId in it) from the owner's next session replays
    the stored record: a backlog re-sent into a new session is stored once."""
    stored = replace(STORED, session_id="other_session", idempotency_key="k1", owner="u1")
    incoming = replace(INCOMING, client_event_id="evt_again", idempotency_key="k1", owner="u1")
    assert resolve_existing(incoming, None, stored) is stored
    with pytest.raises(IdempotencyConflict) as info:
        resolve_existing(replace(incoming, units=6), None, stored)
    assert info.value.details["fields"] == ["units"]


def test_resolve_idempotency_key_used_in_another_users_session() -> None:
    """An idempotencyKey already stored in a colleague's session is a conflict, whatever the
    content: their record is never answered to someone else."""
    stored = replace(STORED, session_id="other_session", idempotency_key="k1", owner="u2")
    incoming = replace(INCOMING, idempotency_key="k1", owner="u1")
    with pytest.raises(IdempotencyConflict) as info:
        resolve_existing(incoming, None, stored)
    assert info.value.details["key"] == "k1"
    assert "sessionId" in info.value.details["fields"]
    assert "new idempotencyKey" in info.value.message  # the clash is on that key


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"worker_id": "OTHER"}, "workerId"),
        ({"units": 7}, "units"),
        ({"worker_name": "Other"}, "worker_name"),
    ],
)
def test_resolve_idempotency_key_with_other_content(change: dict[str, object], field: str) -> None:
    """An idempotencyKey replayed with different content is a conflict naming the field."""
    stored = replace(STORED, idempotency_key="k1")
    incoming = replace(INCOMING, idempotency_key="k1", client_event_id="evt_new", **change)  # type: ignore[arg-type]
    with pytest.raises(IdempotencyConflict) as info:
        resolve_existing(incoming, None, stored)
    assert info.value.details == {"key": "k1", "fields": [field]}


@pytest.mark.parametrize(
    "key",
    [
        None,
        "mobile-app-key-1",
        "Client:s:w:e",
        "client:app7-000123",  # starts like one, but names no record
        "client:",
        f"client:{SID}:JS0315:evt_1",
    ],
)
def test_an_idempotency_key_may_be_free_or_the_records_own_client_key(key: str | None) -> None:
    check_idempotency_key(key, SID, "JS0315", "evt_1")


@pytest.mark.parametrize(
    "key", [f"client:{SID}:JS0315:evt_2", f"client:{SID}:W7:never1", "client:s:w:e"]
)
def test_an_idempotency_key_shaped_like_another_records_key_is_refused(key: str) -> None:
    """The check reads client:... as a client key: it would answer for a record never sent."""
    with pytest.raises(InvalidRequest) as info:
        check_idempotency_key(key, SID, "JS0315", "evt_1")
    assert info.value.details["fields"][0]["field"] == "idempotencyKey"
    assert f"client:{SID}:JS0315:evt_1" in info.value.message
