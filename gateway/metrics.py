"""Counters, gauges and histograms for ``GET /metrics`` (Prometheus text format 0.0.4), kept in
process. Hand-written on purpose: no client library, and counting is a dict increment."""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Sequence

from gateway.errors import ERROR_CODES

BATCH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The one place a metric is described: its HELP line. A name missing here still renders
# (with its own name as help), but tests/core/test_metrics.py asks for every name in use.
HELP: dict[str, str] = {
    "gateway_backlog": "MQTT requests received and not yet taken into a batch.",
    "gateway_batch_apply_seconds": "Seconds spent applying each MQTT request batch "
    "(validate, commit, build replies).",
    "gateway_batch_failures_total": "MQTT batches that failed unexpectedly (answered INTERNAL).",
    "gateway_batch_size": "MQTT requests per applied batch.",
    "gateway_broker_connected": "1 while the link to the MQTT broker is up, else 0.",
    "gateway_database_up": "1 unless the last MQTT batch found PostgreSQL unavailable "
    "(batches are then held and retried), else 0.",
    "gateway_dead_letters_dropped_total": "Refusals that could not be kept as dead letters.",
    "gateway_dead_letters_total": "Refusals written to the dead-letter table.",
    "gateway_events_published_total": "Session events published and confirmed by the broker.",
    "gateway_http_requests_total": "HTTP sidecar requests answered, by method, route and status.",
    "gateway_outbox_pending": "Session events waiting to be published, as of the leader's last "
    "poll of the outbox (capped at one poll's limit, 500); 0 when not leading.",
    "gateway_publishes_too_large_total": "Session events or states the broker refused as over "
    "its message_size_limit (0x95): given up, not sent again every round.",
    "gateway_publisher_leading": "1 while this process holds the leader lock and publishes "
    "session events and retained state, else 0.",
    "gateway_read_pauses_total": "Times reading from the broker paused: too much in flight.",
    "gateway_refused_total": "Requests refused with an error answer (MQTT and REST), by code.",
    "gateway_replies_lost_total": "Replies not published (broker link down; redelivered).",
    "gateway_replies_unpublishable_total": "Replies no MQTT packet can carry (a topic over "
    "65,535 bytes): the request is acknowledged unanswered, its refusal dead-lettered.",
    "gateway_request_wait_seconds": "Seconds from the arrival of an MQTT batch's oldest request "
    "to its replies handed to the broker link: observed once per batch, not per request.",
    "gateway_requests_total": "MQTT requests answered, by operation (unknown: not a request "
    "topic) and outcome (ok or the error code).",
    "gateway_sessions_expired_total": "Sessions closed because their deadline passed.",
    "gateway_states_published_total": "Retained session states published and confirmed.",
    "gateway_store_retries_total": "Batches held and retried while PostgreSQL was unavailable.",
    "gateway_unacked": "MQTT requests received and not yet acknowledged (PUBACK).",
    "gateway_unconfirmed_publishes": "QoS 1 publishes awaiting the broker's PUBACK.",
}

# Counters carrying labels: never given an unlabelled sample (a family is one or the other).
LABELLED = frozenset(
    {"gateway_http_requests_total", "gateway_refused_total", "gateway_requests_total"}
)
# Every other counter is present from the start at 0, so absence and rate() alerts work before
# the first increment.
COUNTERS = tuple(name for name in HELP if name.endswith("_total") and name not in LABELLED)

Labels = tuple[tuple[str, str], ...]
_Key = tuple[str, Labels]


class Histogram:
    """Cumulative buckets (``le``), sum and count; observing is a bisect and two additions."""

    __slots__ = ("_counts", "_sum", "bounds")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)  # the last one: above every bound
        self._sum: float = 0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self.bounds, value)] += 1
        self._sum += value

    def samples(self, name: str) -> list[str]:
        out, seen = [], 0
        for bound, count in zip(self.bounds, self._counts, strict=False):
            seen += count
            out.append(f'{name}_bucket{{le="{_num(bound)}"}} {seen}')
        seen += self._counts[-1]
        out.append(f'{name}_bucket{{le="+Inf"}} {seen}')
        out.append(f"{name}_sum {_num(self._sum)}")
        out.append(f"{name}_count {seen}")
        return out


class PairCounter:
    """A counter family with two bounded labels, for the hot path: each pair of values gets a
    cell once; counting is then two lookups by string and an increment in place (no tuple is
    built or hashed: label tuples are made when rendering)."""

    __slots__ = ("_cells", "first", "name", "second")

    def __init__(self, name: str, first: str, second: str) -> None:
        self.name, self.first, self.second = name, first, second
        self._cells: dict[str, dict[str, list[int]]] = {}

    def inc(self, first: str, second: str) -> None:
        by_second = self._cells.get(first)
        if by_second is None:
            by_second = self._cells[first] = {}
        cell = by_second.get(second)
        if cell is None:
            cell = by_second[second] = [0]
        cell[0] += 1

    def samples(self) -> list[tuple[_Key, int]]:
        """Each pair counted, as ``(name, labels)``; an enum member (Op) as its plain value."""
        return [
            ((self.name, ((self.first, str(first)), (self.second, str(second)))), cell[0])
            for first, by_second in self._cells.items()
            for second, cell in by_second.items()
        ]


class Metrics:
    """A handful of counters; cheap enough for the hot path (a dict increment)."""

    def __init__(self) -> None:
        self._counters: dict[str, float] = defaultdict(float, dict.fromkeys(COUNTERS, 0.0))
        self._labelled: defaultdict[_Key, float] = defaultdict(float)
        for code in ERROR_CODES:  # the very key inc_labelled("gateway_refused_total", ...) uses
            self._labelled[("gateway_refused_total", (("code", code),))] = 0.0
        self._pairs: list[PairCounter] = []
        self._gauges: dict[str, Callable[[], float]] = {}
        self._batch_size = Histogram(BATCH_BUCKETS)
        self._batch_seconds = Histogram(SECONDS_BUCKETS)
        self._request_wait = Histogram(SECONDS_BUCKETS)
        self._histograms = {
            "gateway_batch_apply_seconds": self._batch_seconds,
            "gateway_batch_size": self._batch_size,
            "gateway_request_wait_seconds": self._request_wait,
        }

    def inc(self, name: str, value: float = 1) -> None:
        self._counters[name] += value

    def inc_labelled(self, name: str, label: str, value: str, amount: float = 1) -> None:
        self._labelled[(name, ((label, value),))] += amount

    def inc_labels(self, name: str, labels: Labels, amount: float = 1) -> None:
        """A counter with several labels; keep their values bounded (no raw paths or ids)."""
        self._labelled[(name, labels)] += amount

    def pair_counter(self, name: str, first: str, second: str) -> PairCounter:
        """A two-label counter for the hot path (see ``PairCounter``)."""
        pair = PairCounter(name, first, second)
        self._pairs.append(pair)
        return pair

    def gauge(self, name: str, read: Callable[[], float]) -> None:
        self._gauges[name] = read

    def observe_batch(self, size: int, seconds: float = 0.0) -> None:
        self._batch_size.observe(size)
        self._batch_seconds.observe(seconds)

    def observe_wait(self, seconds: float) -> None:
        """Once per batch: how long its oldest request waited for its reply to be sent."""
        self._request_wait.observe(seconds)

    def value(self, name: str, labels: Labels | None = None) -> float:
        if labels is not None:
            return self._labelled_totals().get((name, labels), 0.0)
        return self._counters.get(name, 0.0)

    def _labelled_totals(self) -> dict[_Key, float]:
        """Every labelled sample once, however it was counted."""
        totals = dict(self._labelled)
        for pair in self._pairs:
            for key, amount in pair.samples():
                totals[key] = totals.get(key, 0.0) + amount
        return totals

    def render(self) -> str:
        """Each family once: HELP, TYPE, then its samples."""
        counters: dict[str, list[str]] = defaultdict(list)
        for name, amount in self._counters.items():
            counters[name].append(f"{name} {_num(amount)}")
        for (name, labels), amount in sorted(self._labelled_totals().items()):
            counters[name].append(f"{name}{_labels(labels)} {_num(amount)}")
        lines: list[str] = []
        for name in sorted(counters):
            lines += _head(name, "counter") + counters[name]
        for name in sorted(self._gauges):
            lines += [*_head(name, "gauge"), f"{name} {_num(self._gauges[name]())}"]
        for name in sorted(self._histograms):
            lines += _head(name, "histogram") + self._histograms[name].samples(name)
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
