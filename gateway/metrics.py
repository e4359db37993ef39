"""Counters and gauges for ``GET /metrics`` (Prometheus text format), kept in process."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class Metrics:
    """A handful of counters; cheap enough for the hot path (a dict increment)."""

    def __init__(self) -> None:
        self._counters: dict[str, float] = defaultdict(float)
        self._labelled: dict[tuple[str, str, str], float] = defaultdict(float)
        self._gauges: dict[str, Callable[[], float]] = {}
        self._batch_buckets = [0] * len(BATCH_BUCKETS)
        self._batch_count = 0
        self._batch_sum = 0
        self._batch_seconds = 0.0

    def inc(self, name: str, value: float = 1) -> None:
        self._counters[name] += value

    def inc_labelled(self, name: str, label: str, value: str, amount: float = 1) -> None:
        self._labelled[(name, label, value)] += amount

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self._gauges[name] = read

    def observe_batch(self, size: int, seconds: float = 0.0) -> None:
        self._batch_count += 1
        self._batch_seconds += seconds
        self._batch_sum += size
        for i, bound in enumerate(BATCH_BUCKETS):
            if size <= bound:
                self._batch_buckets[i] += 1

    def value(self, name: str) -> float:
        return self._counters.get(name, 0.0)

    def render(self) -> str:
        lines: list[str] = []
        for name in sorted(self._counters):
            lines += [f"# TYPE {name} counter", f"{name} {_num(self._counters[name])}"]
        seen: set[str] = set()
        for (name, label, value), amount in sorted(self._labelled.items()):
            if name not in seen:
                lines.append(f"# TYPE {name} counter")
                seen.add(name)
            lines.append(f'{name}{{{label}="{value}"}} {_num(amount)}')
        for name in sorted(self._gauges):
            lines += [f"# TYPE {name} gauge", f"{name} {_num(self._gauges[name]())}"]
        lines.append("# TYPE gateway_batch_size histogram")
        for bound, count in zip(BATCH_BUCKETS, self._batch_buckets, strict=True):
            lines.append(f'gateway_batch_size_bucket{{le="{bound}"}} {count}')
        lines.append(f'gateway_batch_size_bucket{{le="+Inf"}} {self._batch_count}')
        lines.append(f"gateway_batch_size_sum {self._batch_sum}")
        lines.append(f"gateway_batch_size_count {self._batch_count}")
        lines.append("# TYPE gateway_batch_apply_seconds summary")
        lines.append(f"gateway_batch_apply_seconds_sum {self._batch_seconds!r}")
        lines.append(f"gateway_batch_apply_seconds_count {self._batch_count}")
        return "\n".join(lines) + "\n"


def _num(value: float) -> str:
    """Exact: 1234567, not 1.23457e+06."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))
