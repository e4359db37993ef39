"""Counters and gauges for ``GET /metrics`` (Prometheus text format 0.0.4), kept in process."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The one place a metric is described: its HELP line. A name missing here still renders
# (with its own name as help), but tests/core/test_metrics.py asks for every name in use.
HELP: dict[str, str] = {
    "gateway_backlog": "MQTT requests received and not yet taken into a batch.",
    "gateway_batch_apply_seconds": "Seconds spent applying MQTT request batches.",
    "gateway_batch_failures_total": "MQTT batches that failed unexpectedly (answered INTERNAL).",
    "gateway_batch_size": "MQTT requests per applied batch.",
    "gateway_dead_letters_dropped_total": "Refusals that could not be kept as dead letters.",
    "gateway_dead_letters_total": "Refusals written to the dead-letter table.",
    "gateway_events_published_total": "Session events published and confirmed by the broker.",
    "gateway_http_requests_total": "HTTP sidecar requests answered, by method, route and status.",
    "gateway_read_pauses_total": "Times reading from the broker paused: too much in flight.",
    "gateway_refused_total": "Requests refused with an error answer (MQTT and REST), by code.",
    "gateway_replies_lost_total": "Replies not published (broker link down; redelivered).",
    "gateway_sessions_expired_total": "Sessions closed because their deadline passed.",
    "gateway_states_published_total": "Retained session states published and confirmed.",
    "gateway_store_retries_total": "Batches held and retried while PostgreSQL was unavailable.",
    "gateway_unacked": "MQTT requests received and not yet acknowledged (PUBACK).",
    "gateway_unconfirmed_publishes": "QoS 1 publishes awaiting the broker's PUBACK.",
}

Labels = tuple[tuple[str, str], ...]


class Metrics:
    """A handful of counters; cheap enough for the hot path (a dict increment)."""

    def __init__(self) -> None:
        self._counters: dict[str, float] = defaultdict(float)
        self._labelled: dict[tuple[str, Labels], float] = defaultdict(float)
        self._gauges: dict[str, Callable[[], float]] = {}
        self._batch_buckets = [0] * len(BATCH_BUCKETS)
        self._batch_count = 0
        self._batch_sum = 0
        self._batch_seconds = 0.0

    def inc(self, name: str, value: float = 1) -> None:
        self._counters[name] += value

    def inc_labelled(self, name: str, label: str, value: str, amount: float = 1) -> None:
        self._labelled[(name, ((label, value),))] += amount

    def inc_labels(self, name: str, labels: Labels, amount: float = 1) -> None:
        """A counter with several labels; keep their values bounded (no raw paths or ids)."""
        self._labelled[(name, labels)] += amount

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
        """Each family once: HELP, TYPE, then its samples."""
        counters: dict[str, list[str]] = defaultdict(list)
        for name, amount in self._counters.items():
            counters[name].append(f"{name} {_num(amount)}")
        for (name, labels), amount in sorted(self._labelled.items()):
            counters[name].append(f"{name}{_labels(labels)} {_num(amount)}")
        lines: list[str] = []
        for name in sorted(counters):
            lines += _head(name, "counter") + counters[name]
        for name in sorted(self._gauges):
            lines += [*_head(name, "gauge"), f"{name} {_num(self._gauges[name]())}"]
        lines += _head("gateway_batch_size", "histogram")
        for bound, count in zip(BATCH_BUCKETS, self._batch_buckets, strict=True):
            lines.append(f'gateway_batch_size_bucket{{le="{bound}"}} {count}')
        lines.append(f'gateway_batch_size_bucket{{le="+Inf"}} {self._batch_count}')
        lines.append(f"gateway_batch_size_sum {self._batch_sum}")
        lines.append(f"gateway_batch_size_count {self._batch_count}")
        lines += _head("gateway_batch_apply_seconds", "summary")
        lines.append(f"gateway_batch_apply_seconds_sum {self._batch_seconds!r}")
        lines.append(f"gateway_batch_apply_seconds_count {self._batch_count}")
        return "\n".join(lines) + "\n"


def _head(name: str, kind: str) -> list[str]:
    text = HELP.get(name, name).replace("\\", "\\\\").replace("\n", "\\n")
    return [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]


def _labels(labels: Labels) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return f"{{{inner}}}"


def _escape(value: str) -> str:
    """A label value as the text format quotes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    """Exact: 1234567, not 1.23457e+06."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))
