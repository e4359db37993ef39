"""A per-user token bucket (GATEWAY_RATE_LIMIT_PER_S), pure: the clock is an argument.

A request is admitted while the user's bucket holds a whole token, and costs what it carries
(one, or a bulk's records), possibly driving the bucket below zero: a large offline sync is
never refused forever, it just makes the next requests wait. A refused request is answered
``RATE_LIMITED`` with the seconds to wait; nothing is dropped silently.

The wait is this request's turn, not the next token's: of forty refused at once, the first is
told one token's time, the fortieth forty, so that a device re-sending each after its own wait
is admitted rather than refused again in a storm. Those promised turns lapse as their time
passes.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_BUCKETS = 50_000
EPSILON = 1e-9


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float
    promised: float = 0.0  # turns told to refused requests, not yet come


class RateLimiter:
    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate = rate_per_s
        self.burst = max(1.0, burst or 2 * rate_per_s)
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def admit(self, user: str, cost: float, now: float) -> float:
        """0 if admitted (and charged), else the seconds until the user may try again."""
        bucket = self._buckets.get(user)
        if bucket is None:
            if len(self._buckets) >= MAX_BUCKETS:
                self._forget_full(now)
            bucket = self._buckets[user] = _Bucket(self.burst, now)
        else:
            refill = (now - bucket.at) * self.rate
            bucket.tokens = min(self.burst, bucket.tokens + refill)
            bucket.promised = max(0.0, bucket.promised - refill)
            bucket.at = now
        if bucket.tokens < 1 - EPSILON:  # a token refilled by a sum of float steps is whole
            wait = (1 - bucket.tokens + bucket.promised) / self.rate
            bucket.promised += 1
            return wait
        bucket.tokens -= cost
        return 0.0

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: they hold no state worth keeping."""
        for user in [
            u for u, b in self._buckets.items() if b.tokens + (now - b.at) * self.rate >= self.burst
        ]:
            del self._buckets[user]
        if len(self._buckets) >= MAX_BUCKETS:  # all busy: start over rather than grow
            self._buckets.clear()
