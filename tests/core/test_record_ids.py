"""Record ids: the seeds' shape (``rec_`` and 16 hex digits), their minute first."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from gateway.core.events import (
    RECORD_ID_EPOCH_S,
    new_record_id,
    new_record_ids,
    record_id_minute,
)

SHAPE = re.compile(r"rec_[0-9a-f]{16}")


def _at(year: int, month: int, day: int, hour: int = 0, minute: int = 0, sec: int = 0) -> float:
    return datetime(year, month, day, hour, minute, sec, tzinfo=UTC).timestamp()


def test_ids_have_the_seeds_shape_and_are_distinct() -> None:
    ids = new_record_ids(20_000)
    assert all(SHAPE.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert SHAPE.fullmatch(new_record_id())


def test_ids_of_one_minute_share_their_first_six_digits() -> None:
    now = _at(2026, 12, 2, 12, 30, 5)
    ids = new_record_ids(50, now) + new_record_ids(50, now + 54)
    assert {i[4:10] for i in ids} == {f"{record_id_minute(now):06x}"}
    assert len({i[10:] for i in ids}) == 100


def test_a_later_minute_sorts_after_an_earlier_one() -> None:
    earlier = new_record_ids(200, _at(2026, 12, 2, 12, 30, 59))
    later = new_record_ids(200, _at(2026, 12, 2, 12, 31, 0))
    assert max(earlier) < min(later)


def test_the_minute_counts_from_2024_and_wraps_after_24_bits() -> None:
    assert record_id_minute(RECORD_ID_EPOCH_S) == 0
    assert record_id_minute(_at(2024, 1, 1, 0, 1)) == 1
    assert record_id_minute(_at(2026, 12, 2)) == (_at(2026, 12, 2) - RECORD_ID_EPOCH_S) // 60
    assert record_id_minute(RECORD_ID_EPOCH_S + 60 * 2**24) == 0
    assert new_record_id(RECORD_ID_EPOCH_S + 60 * (2**24 - 1))[4:10] == "ffffff"
