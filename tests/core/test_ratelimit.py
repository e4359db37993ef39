"""The per-user token bucket: admits a burst, refills at the rate, never starves a big bulk."""

from __future__ import annotations

import pytest

from gateway.core.ratelimit import MAX_BUCKETS, RateLimiter


def test_burst_then_refusal_with_the_wait() -> None:
    """A full bucket admits `burst` requests; the next is told how long to wait."""
    limiter = RateLimiter(rate_per_s=2, burst=3)
    assert [limiter.admit("u", 1, 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.admit("u", 1, 0.0) == pytest.approx(0.5)


def test_refills_at_the_rate() -> None:
    """After 1/rate seconds one more request is admitted."""
    limiter = RateLimiter(rate_per_s=4, burst=1)
    assert limiter.admit("u", 1, 0.0) == 0.0
    assert limiter.admit("u", 1, 0.1) > 0
    assert limiter.admit("u", 1, 0.26) == 0.0


def test_users_do_not_share_buckets() -> None:
    """One user's burst does not limit another."""
    limiter = RateLimiter(rate_per_s=1, burst=1)
    assert limiter.admit("a", 1, 0.0) == 0.0
    assert limiter.admit("a", 1, 0.0) > 0
    assert limiter.admit("b", 1, 0.0) == 0.0


def test_a_bulk_bigger_than_the_burst_passes_then_costs_time() -> None:
    """A 1000-record bulk is admitted from a full bucket and pays by waiting afterwards."""
    limiter = RateLimiter(rate_per_s=100, burst=200)
    assert limiter.admit("u", 1000, 0.0) == 0.0
    wait = limiter.admit("u", 1, 0.0)
    assert wait == pytest.approx(8.01)
    assert limiter.admit("u", 1, 8.02) == 0.0


def test_disabled_and_default_burst() -> None:
    """Rate 0 means off; burst 0 means twice the rate."""
    assert not RateLimiter(0, 0).enabled
    assert RateLimiter(5, 0).burst == 10


def test_memory_is_bounded() -> None:
    """Idle (refilled) buckets are forgotten rather than kept forever."""
    limiter = RateLimiter(rate_per_s=1000, burst=1)
    for i in range(MAX_BUCKETS + 10):
        limiter.admit(f"u{i}", 1, float(i))
    assert len(limiter._buckets) <= MAX_BUCKETS


def test_refused_at_once_are_told_their_own_turns() -> None:
    """Forty refused in one burst are told 1, 2, ... 40 tokens' time; each re-sent after its
    own wait is admitted (no retry storm), and the turns lapse once their time is past."""
    limiter = RateLimiter(rate_per_s=5, burst=10)
    assert all(limiter.admit("u", 1, 0.0) == 0.0 for _ in range(10))
    waits = [limiter.admit("u", 1, 0.0) for _ in range(40)]
    assert waits == pytest.approx([(i + 1) / 5 for i in range(40)])
    assert [limiter.admit("u", 1, w) for w in waits] == [0.0] * 40
    later = 1000.0  # long after: a full bucket, no turns owed
    assert all(limiter.admit("u", 1, later) == 0.0 for _ in range(10))
    assert limiter.admit("u", 1, later) == pytest.approx(0.2)
