"""GET /metrics: counters, labelled counters, gauges and histograms in Prometheus text; and
what the gateway counts in them (requests by operation and outcome, the time requests wait,
the publisher's gauges)."""

from __future__ import annotations

import asyncio
import http.server
import inspect
import os
import re
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta, tzinfo
from pathlib import Path
from typing import Any, cast

import orjson
import pytest

from bench.__main__ import _batch_stats
from gateway.app import Gateway
from gateway.config import Settings, load_settings
from gateway.core.auth import Claims, KeyRing, TokenVerifier, mint_token
from gateway.core.rules import Principal
from gateway.core.topics import Op, Topics
from gateway.errors import ERROR_CODES
from gateway.metrics import BATCH_BUCKETS, COUNTERS, HELP, LABELLED, SECONDS_BUCKETS, Metrics
from gateway.publisher import Publisher
from gateway.service import Service
from gateway.store.postgres import PostgresStore
from gateway.transport import pipeline as pipeline_module
from gateway.transport.dispatch import Dispatcher, Reply
from gateway.transport.mqtt import Inbound, MqttLink
from gateway.transport.pipeline import Pipeline

GATEWAY = Path(__file__).resolve().parents[2] / "gateway"


def lines(metrics: Metrics) -> list[str]:
    return metrics.render().splitlines()


def samples(metrics: Metrics) -> dict[str, float]:
    """Every sample, keyed by its name and labels as printed."""
    out: dict[str, float] = {}
    for line in lines(metrics):
        if not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            assert key not in out, f"{key} rendered twice"
            out[key] = float(value)
    return out


def test_empty_render_has_the_histograms() -> None:
    """With nothing counted the histograms are still there, all zero."""
    out = lines(Metrics())
    for name, bounds in (
        ("gateway_batch_size", BATCH_BUCKETS),
        ("gateway_batch_apply_seconds", SECONDS_BUCKETS),
        ("gateway_request_wait_seconds", SECONDS_BUCKETS),
    ):
        at = out.index(f"# HELP {name} {HELP[name]}")
        assert out[at + 1] == f"# TYPE {name} histogram"
        assert out[at + 2] == f'{name}_bucket{{le="{bounds[0]}"}} 0'
        assert f'{name}_bucket{{le="+Inf"}} 0' in out
        assert f"{name}_sum 0" in out
        assert f"{name}_count 0" in out
    assert Metrics().render().endswith("\n")


def test_unlabelled_counters_start_at_zero() -> None:
    """Every unlabelled counter is there at 0 before its first increment (absence and rate
    alerts work from the start), and counts on from there, printed once."""
    assert "gateway_store_retries_total" in COUNTERS
    assert "gateway_refused_total" not in COUNTERS  # labelled: no unlabelled sample
    m = Metrics()
    before = samples(m)
    for name in COUNTERS:
        assert before[name] == 0, name
        assert f"# TYPE {name} counter" in lines(m)
    m.inc("gateway_store_retries_total")
    m.inc("gateway_store_retries_total", 2)
    after = samples(m)
    assert after["gateway_store_retries_total"] == 3
    assert lines(m).count("# TYPE gateway_store_retries_total counter") == 1
    assert [k for k in after if k.startswith("gateway_store_retries_total")] == [
        "gateway_store_retries_total"
    ]
    assert not [k for k in after if k in LABELLED]  # no bare sample of a labelled family


_COUNTED = re.compile(r'\.inc\(\s*"(gateway_[a-z0-9_]+)"')
_COUNTED_WITH_LABELS = re.compile(
    r'\.(?:inc_labelled|inc_labels|pair_counter)\(\s*"(gateway_[a-z0-9_]+)"'
)


def used_names(pattern: re.Pattern[str]) -> set[str]:
    return {
        name
        for path in GATEWAY.rglob("*.py")
        for name in pattern.findall(path.read_text(encoding="utf-8"))
    }


def test_every_counter_the_gateway_counts_starts_at_zero() -> None:
    """The counters pre-initialised are exactly those the gateway counts with ``inc``; those
    it counts with labels are never given a bare sample."""
    counted, labelled = used_names(_COUNTED), used_names(_COUNTED_WITH_LABELS)
    assert "gateway_replies_lost_total" in counted
    assert set(COUNTERS) == counted, sorted(set(COUNTERS) ^ counted)
    assert labelled <= LABELLED, sorted(labelled - LABELLED)
    assert not counted & LABELLED


def test_refused_codes_start_at_zero_in_the_form_they_are_counted() -> None:
    """gateway_refused_total{code} is there at 0 for every code the gateway answers; counting
    one (as the dead-letter writer does) moves that sample, never adds a second one."""
    assert set(ERROR_CODES) == {
        "VALIDATION_ERROR", "UNAUTHORIZED", "FORBIDDEN", "NOT_FOUND", "SESSION_CLOSED",
        "SESSION_EXPIRED", "SESSION_ALREADY_OPEN", "IDEMPOTENCY_CONFLICT", "PAYLOAD_TOO_LARGE",
        "RATE_LIMITED", "UNAVAILABLE", "INTERNAL",
    }  # fmt: skip
    m = Metrics()
    refused = {k: v for k, v in samples(m).items() if k.startswith("gateway_refused_total")}
    assert refused == {f'gateway_refused_total{{code="{c}"}}': 0 for c in ERROR_CODES}
    m.inc_labelled("gateway_refused_total", "code", "NOT_FOUND")
    m.inc_labelled("gateway_refused_total", "code", "NOT_FOUND")
    out = lines(m)
    assert [line for line in out if 'code="NOT_FOUND"' in line] == [
        'gateway_refused_total{code="NOT_FOUND"} 2'
    ]
    assert sum(line.startswith("gateway_refused_total{") for line in out) == len(ERROR_CODES)
    assert m.value("gateway_refused_total", (("code", "NOT_FOUND"),)) == 2


def test_counters() -> None:
    """Counters are summed, sorted by name, each with its HELP and TYPE lines."""
    m = Metrics()
    m.inc("aa_total")
    m.inc("aa_total", 2)
    m.inc("ab_total", 0.5)
    m.inc("gateway_dead_letters_total", 4)
    out = lines(m)
    assert out[:6] == [
        "# HELP aa_total aa_total",  # undescribed: its name as help
        "# TYPE aa_total counter",
        "aa_total 3",
        "# HELP ab_total ab_total",
        "# TYPE ab_total counter",
        "ab_total 0.5",
    ]
    at = out.index("# TYPE gateway_dead_letters_total counter")
    assert out[at - 1] == f"# HELP gateway_dead_letters_total {HELP['gateway_dead_letters_total']}"
    assert out[at + 1] == "gateway_dead_letters_total 4"
    assert m.value("aa_total") == 3
    assert m.value("never_counted") == 0


@pytest.mark.parametrize("count", [999_999, 1_234_567, 10_000_001, 2**40 + 1])
def test_large_counters_keep_every_digit(count: int) -> None:
    """Counters and gauges past a million are printed exactly, not rounded to 6 digits."""
    m = Metrics()
    m.inc("gateway_records_total", count)
    m.gauge("gateway_backlog", lambda: count)
    samples = dict(line.rsplit(" ", 1) for line in lines(m) if not line.startswith("#"))
    assert float(samples["gateway_records_total"]) == count
    assert float(samples["gateway_backlog"]) == count


def test_labelled_counters() -> None:
    """Labelled counters print one TYPE line per name and one sample per label value."""
    m = Metrics()
    m.inc_labelled("gateway_refused_total", "code", "VALIDATION_ERROR")
    m.inc_labelled("gateway_refused_total", "code", "UNAUTHORIZED", 3)
    m.inc_labelled("gateway_refused_total", "code", "VALIDATION_ERROR")
    out = lines(m)
    assert out.count("# TYPE gateway_refused_total counter") == 1
    assert 'gateway_refused_total{code="UNAUTHORIZED"} 3' in out
    assert 'gateway_refused_total{code="VALIDATION_ERROR"} 2' in out
    type_at = out.index("# TYPE gateway_refused_total counter")
    assert out[type_at + 1].startswith("gateway_refused_total{")


def test_gauges_are_read_at_render() -> None:
    """A gauge's value is read when rendering, not when registered."""
    m = Metrics()
    inflight = [3.0]
    m.gauge("gateway_inflight", lambda: inflight[0])
    assert "gateway_inflight 3" in lines(m)
    inflight[0] = 7.5
    out = lines(m)
    assert "# TYPE gateway_inflight gauge" in out
    assert "gateway_inflight 7.5" in out


def test_batch_histogram_is_cumulative() -> None:
    """Each batch counts in every bucket at or above its size; sum and count add up."""
    m = Metrics()
    for size in (1, 3, 3, 50, 5000):
        m.observe_batch(size)
    out = lines(m)
    expected = {1: 1, 2: 1, 5: 3, 10: 3, 20: 3, 50: 4, 100: 4, 200: 4, 500: 4, 1000: 4}
    assert set(expected) == set(BATCH_BUCKETS)
    for bound, count in expected.items():
        assert f'gateway_batch_size_bucket{{le="{bound}"}} {count}' in out
    assert 'gateway_batch_size_bucket{le="+Inf"} 5' in out
    assert f"gateway_batch_size_sum {1 + 3 + 3 + 50 + 5000}" in out
    assert "gateway_batch_size_count 5" in out


def test_batch_apply_time_is_a_histogram() -> None:
    """The time spent applying each batch: cumulative buckets (a bound counts what equals it),
    sum and count; the bench still reads its mean from the sum and count."""
    m = Metrics()
    for seconds in (0.0004, 0.001, 0.003, 0.2, 0.25, 7.0, 12.0):
        m.observe_batch(10, seconds)
    out = lines(m)
    assert "# TYPE gateway_batch_apply_seconds histogram" in out
    expected = {
        "0.001": 2, "0.0025": 2, "0.005": 3, "0.01": 3, "0.025": 3, "0.05": 3, "0.1": 3,
        "0.25": 5, "0.5": 5, "1": 5, "2.5": 5, "5": 5, "10": 6, "+Inf": 7,
    }  # fmt: skip
    got = {
        line.split('"')[1]: int(line.rsplit(" ", 1)[1])
        for line in out
        if line.startswith("gateway_batch_apply_seconds_bucket{")
    }
    assert got == expected
    assert [float(b) for b in list(got)[:-1]] == list(SECONDS_BUCKETS)
    sums = samples(m)
    assert sums["gateway_batch_apply_seconds_sum"] == pytest.approx(19.4544)
    assert sums["gateway_batch_apply_seconds_count"] == 7
    assert "# TYPE gateway_batch_apply_seconds summary" not in out


@pytest.fixture
def served() -> Iterator[tuple[Metrics, int]]:
    """A Metrics rendered on GET /metrics of a local port, as the sidecar does."""
    metrics = Metrics()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = metrics.render().encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None: ...

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield metrics, server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_the_bench_still_reads_the_batch_apply_time(served: tuple[Metrics, int]) -> None:
    """bench/__main__.py prints the mean batch size and apply time from /metrics."""
    metrics, port = served
    metrics.observe_batch(10, 0.01)
    metrics.observe_batch(30, 0.03)
    assert _batch_stats(port) == (
        "2 batches, 20 requests each on average, "
        "20.0 ms each to apply (validate, commit, build replies)"
    )


def test_every_sample_line_parses() -> None:
    """Every line is a comment or `name[{labels}] number`, as Prometheus expects."""
    m = Metrics()
    m.inc("a_total", 2)
    m.inc_labelled("b_total", "code", "NOT_FOUND")
    m.gauge("c", lambda: 1.25)
    m.observe_batch(7)
    for line in lines(m):
        if line.startswith("#"):
            assert line.split()[1] in ("HELP", "TYPE")
            continue
        name, _, value = line.rpartition(" ")
        assert name
        float(value)


def test_every_family_has_help_then_type_once() -> None:
    """Each family: one HELP line, then its TYPE line, then its samples (none elsewhere)."""
    m = Metrics()
    m.inc("gateway_records_total")
    m.inc_labelled("gateway_refused_total", "code", "NOT_FOUND")
    m.inc_labels("gateway_http_requests_total", (("method", "GET"), ("status", "200")))
    m.gauge("gateway_backlog", lambda: 2)
    out = lines(m)
    helps = [line.split()[2] for line in out if line.startswith("# HELP ")]
    types = [line.split()[2] for line in out if line.startswith("# TYPE ")]
    assert helps == types
    assert len(set(types)) == len(types)
    for name in types:
        at = out.index(next(line for line in out if line.startswith(f"# HELP {name} ")))
        assert out[at + 1].startswith(f"# TYPE {name} ")
        assert out[at + 2].startswith(name)


def test_several_labels_and_escaping() -> None:
    """Counters with several labels print them in the given order, values escaped."""
    m = Metrics()
    get = (("method", "GET"), ("route", "/a/{id}"), ("status", "200"))
    m.inc_labels("gateway_http_requests_total", get)
    m.inc_labels("gateway_http_requests_total", get)
    m.inc_labels("x_total", (("v", 'a"b\\c\nd'),))
    out = lines(m)
    assert 'gateway_http_requests_total{method="GET",route="/a/{id}",status="200"} 2' in out
    assert 'x_total{v="a\\"b\\\\c\\nd"} 1' in out
    assert out.count("# TYPE gateway_http_requests_total counter") == 1


_METRIC_NAME = re.compile(
    r'\.(?:inc|inc_labelled|inc_labels|pair_counter|gauge)\(\s*"(gateway_[a-z0-9_]+)"'
)
_HISTOGRAMS = {"gateway_batch_apply_seconds", "gateway_batch_size", "gateway_request_wait_seconds"}


def test_every_metric_in_use_is_described() -> None:
    """Each metric name the gateway counts has its HELP text in gateway/metrics.py, and each
    HELP text describes a metric the gateway has (the gauges of app.py among them)."""
    used = used_names(_METRIC_NAME)
    assert "gateway_http_requests_total" in used
    assert "gateway_refused_total" in used
    assert used <= set(HELP), sorted(used - set(HELP))
    assert {
        "gateway_requests_total",
        "gateway_database_up",
        "gateway_broker_connected",
        "gateway_publisher_leading",
        "gateway_outbox_pending",
    } <= used
    rendered = {line.split()[2] for line in lines(Metrics()) if line.startswith("# TYPE ")}
    assert rendered >= _HISTOGRAMS
    assert set(HELP) <= used | _HISTOGRAMS, sorted(set(HELP) - used - _HISTOGRAMS)


# --- gateway_requests_total -------------------------------------------------------------------

P = "hydrobit/v2"
SECRET = "s" * 40


class _Service:
    """Knows every user (one company) and says every idempotency key exists."""

    async def principals(self, asks: Sequence[tuple[Claims, str | None]]) -> list[Principal]:
        return [Principal(claims.sub, "c1") for claims, _ in asks]

    async def check_key(self, who: Principal, key: str) -> bool:
        return True


def dispatcher(metrics: Metrics | None) -> Dispatcher:
    return Dispatcher(
        cast(Service, _Service()),
        TokenVerifier(KeyRing(secret=SECRET)),
        Topics(P),
        max_payload_bytes=65_536,
        max_json_depth=16,
        metrics=metrics,
    )


def request(suffix: str, payload: bytes, token: str | None = None, mid: int = 1) -> Inbound:
    auth = f"Bearer {token}" if token is not None else None
    return Inbound(f"{P}/{suffix}", payload, 1, mid, None, None, auth, datetime.now(UTC), 0)


def answered(metrics: Metrics) -> dict[str, float]:
    return {k: v for k, v in samples(metrics).items() if k.startswith("gateway_requests_total")}


def test_requests_are_counted_by_operation_and_outcome() -> None:
    """Each MQTT request answered counts once under its operation (unknown: not a request
    topic) and its outcome (ok or the error code); an emptied retained copy is no request."""
    metrics = Metrics()
    token = mint_token(SECRET, "auth0|u1", ttl_s=3600)
    check = b'{"key": "k1"}'
    emptied = request("records/check-idempotency", b"")
    emptied.retained = True
    batch = [
        request("records/check-idempotency", check, token, 1),
        request("records/check-idempotency", check, token, 2),
        request("records/check-idempotency", check, None, 3),  # no token
        request("sessions/s1/records", b"{not json", token, 4),
        request("nowhere/at/all", check, token, 5),
        emptied,
    ]
    replies = asyncio.run(dispatcher(metrics).handle(batch))
    assert len(replies) == len(batch)
    name = "gateway_requests_total"
    assert answered(metrics) == {
        f'{name}{{op="records.check",outcome="ok"}}': 2,
        f'{name}{{op="records.check",outcome="UNAUTHORIZED"}}': 1,
        f'{name}{{op="records.create",outcome="VALIDATION_ERROR"}}': 1,
        f'{name}{{op="unknown",outcome="VALIDATION_ERROR"}}': 1,
    }
    assert lines(metrics).count(f"# TYPE {name} counter") == 1
    assert Op.CHECK_IDEMPOTENCY.value == "records.check"


def test_a_failed_batch_is_counted_internal_under_each_operation() -> None:
    """fail_all (a bug) answers INTERNAL: counted under each request's own operation."""
    metrics = Metrics()
    batch = [request("sessions/open", b"{}"), request("records/r1/void", b"{}", mid=2)]
    dispatcher(metrics).fail_all(batch, RuntimeError("a bug"))
    assert answered(metrics) == {
        'gateway_requests_total{op="sessions.open",outcome="INTERNAL"}': 1,
        'gateway_requests_total{op="records.void",outcome="INTERNAL"}': 1,
    }


def test_a_failed_batch_keeps_what_an_earlier_wave_decided() -> None:
    """A request a batch's earlier wave applied (Inbound.settled) is answered as decided when a
    later wave fails with a bug: a committed record told INTERNAL would be sent again."""
    metrics = Metrics()
    done = request("sessions/s1/records", b"{}")
    done.settled = ({"status": "success", "data": {"recordId": "rec_1"}}, None)
    batch = [done, request("records/r1/void", b"{}", mid=2)]
    replies = dispatcher(metrics).fail_all(batch, RuntimeError("a bug"))
    assert [orjson.loads(r.payload)["status"] for r in replies] == ["success", "error"]
    assert answered(metrics) == {
        'gateway_requests_total{op="records.create",outcome="ok"}': 1,
        'gateway_requests_total{op="records.void",outcome="INTERNAL"}': 1,
    }


def test_a_dispatcher_without_metrics_counts_nothing() -> None:
    """metrics is optional: a dispatcher built without it answers the same."""
    replies = asyncio.run(dispatcher(None).handle([request("sessions/s1/records", b"{")]))
    assert len(replies) == 1


def test_the_request_counter_counts_in_place() -> None:
    """On the hot path a pair of label values already seen adds nothing: the same cell is
    found again and incremented; it renders as one sample, summed with any count of the same
    labels made another way."""
    m = Metrics()
    counter = m.pair_counter("gateway_requests_total", "op", "outcome")
    counter.inc(Op.CREATE_RECORD, "ok")
    [(key, _)] = counter.samples()
    cell = counter._cells[Op.CREATE_RECORD]["ok"]
    for _ in range(1000):
        counter.inc(Op.CREATE_RECORD, "ok")
    assert counter._cells == {"records.create": {"ok": cell}} and cell == [1001]
    assert key == ("gateway_requests_total", (("op", "records.create"), ("outcome", "ok")))
    assert type(key[1][0][1]) is str  # the enum's plain value, not the member
    labels = (("op", "records.create"), ("outcome", "ok"))
    assert m.value("gateway_requests_total", labels) == 1001
    m.inc_labels("gateway_requests_total", labels)  # the same sample, however it is counted
    assert samples(m)['gateway_requests_total{op="records.create",outcome="ok"}'] == 1002


# --- gateway_request_wait_seconds -------------------------------------------------------------


class _Link:
    unconfirmed_publishes = 0

    def __init__(self) -> None:
        self.acked: list[int] = []

    def reply(self, topic: str, payload: bytes, correlation: bytes | None) -> None: ...

    def ack(self, msg: Inbound) -> None:
        self.acked.append(msg.mid)

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class _Dispatcher:
    async def handle(self, batch: Sequence[Inbound]) -> list[Reply]:
        return [Reply(f"{m.topic}/reply", b"ok", None) for m in batch]


class _Wall:
    """The pipeline's ``datetime``, its clock set by hand."""

    at = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)

    @classmethod
    def now(cls, tz: tzinfo | None = None) -> datetime:
        return cls.at


def wait_histogram(metrics: Metrics) -> dict[str, float]:
    return {
        k: v for k, v in samples(metrics).items() if k.startswith("gateway_request_wait_seconds")
    }


async def test_request_wait_is_observed_once_per_batch_from_its_oldest_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """From the arrival of a batch's oldest request to its replies handed to the link: once
    per batch, not per request; a wall clock stepped back counts 0, never a negative wait."""
    monkeypatch.setattr(pipeline_module, "datetime", _Wall)
    t0 = _Wall.at
    link, metrics = _Link(), Metrics()
    pipeline = Pipeline(
        cast(MqttLink, link),
        cast(Dispatcher, _Dispatcher()),
        metrics,
        Topics(P),
        batch_max=10,
        batch_wait_s=0,
        depth=1,
    )
    running = asyncio.create_task(pipeline.run())

    async def answered(*mids: int) -> None:
        for _ in range(200):
            if link.acked[-len(mids) :] == list(mids):
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"not answered: {mids}")

    _Wall.at = t0 + timedelta(seconds=3)  # answered 3 s after the oldest arrived
    for mid in (1, 2, 3):  # one batch: the worker has not run yet
        msg = request("sessions/s1/records", b"{}", mid=mid)
        msg.received_at = t0 + timedelta(seconds=mid - 1)
        pipeline.submit(msg)
    await answered(1, 2, 3)
    late = request("sessions/s1/records", b"{}", mid=4)
    late.received_at = t0 + timedelta(seconds=60)  # the clock was stepped back since
    pipeline.submit(late)
    await answered(4)
    pipeline.stop()
    await asyncio.wait_for(running, 5)
    wait = wait_histogram(metrics)
    assert wait["gateway_request_wait_seconds_count"] == 2
    assert wait["gateway_request_wait_seconds_sum"] == 3.0
    assert wait['gateway_request_wait_seconds_bucket{le="0.001"}'] == 1  # the stepped-back one
    assert wait['gateway_request_wait_seconds_bucket{le="2.5"}'] == 1
    assert wait['gateway_request_wait_seconds_bucket{le="5"}'] == 2
    assert "once per batch, not per request" in HELP["gateway_request_wait_seconds"]


# --- gauges -----------------------------------------------------------------------------------


class _Event:
    session_id = "s1"

    def as_json(self) -> dict[str, str]:
        return {"type": "session.opened"}


class _Store:
    """An outbox that holds three events, then two, then stops the publisher."""

    def __init__(self, stopping: asyncio.Event) -> None:
        self.polls = [[(1, _Event()), (2, _Event()), (3, _Event())], [(4, _Event()), (5, _Event())]]
        self.stopping = stopping
        self.marked: list[int] = []

    async def pending_events(self, limit: int = 500) -> list[tuple[int, _Event]]:
        events = self.polls.pop(0)
        if not self.polls:
            self.stopping.set()
        return events

    async def mark_published(self, seqs: Sequence[int]) -> None:
        self.marked += seqs


class _PublishLink:
    async def wait_connected(self) -> None: ...

    def publish(self, topic: str, payload: bytes) -> asyncio.Future[None]:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def test_outbox_pending_is_the_last_poll_while_leading() -> None:
    """gateway_outbox_pending: what the leader's last poll of the outbox found (at most the
    poll's limit, which its HELP states); 0 when not leading."""
    stopping = asyncio.Event()
    store = _Store(stopping)
    publisher = Publisher(
        cast(PostgresStore, store),
        cast(MqttLink, _PublishLink()),
        Topics(P),
        cast(Settings, None),
        Metrics(),
    )
    assert publisher.outbox_pending == 0
    publisher.leading = True
    await asyncio.wait_for(publisher._outbox_loop(asyncio.Event(), stopping), 5)
    assert store.marked == [1, 2, 3, 4, 5]
    assert publisher.outbox_pending == 2  # the last poll's count
    publisher.leading = False
    assert publisher.outbox_pending == 0
    limit = inspect.signature(PostgresStore.pending_events).parameters["limit"].default
    assert f"limit, {limit})" in HELP["gateway_outbox_pending"]


class _Running:
    """What the gauges read of the pipeline, the broker link and the publisher."""

    backlog, unacked, unconfirmed_publishes, outbox_pending = 4, 5, 6, 7
    store_ok = connected = leading = True


def test_the_gateway_gauges_read_what_they_stand_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's gauges are there from its construction, at 0 while it starts (nothing
    built yet: PostgreSQL not reached, no broker link, not leading); then each reads its
    part: the pipeline's view of PostgreSQL, the link, the publisher's lock and outbox."""
    for name in [n for n in os.environ if n.startswith("GATEWAY_")]:
        monkeypatch.delenv(name)
    settings = load_settings(
        database_url="postgresql://localhost/none", mqtt_url="mqtt://localhost", jwt_secret=SECRET
    )
    gw = Gateway(settings)
    names = (
        "gateway_backlog",
        "gateway_unacked",
        "gateway_unconfirmed_publishes",
        "gateway_database_up",
        "gateway_broker_connected",
        "gateway_publisher_leading",
        "gateway_outbox_pending",
    )
    assert {name: samples(gw.metrics)[name] for name in names} == dict.fromkeys(names, 0)
    running = _Running()
    gw.pipeline, gw.link, gw.publisher = (
        cast(Pipeline, running),
        cast(MqttLink, running),
        cast(Publisher, running),
    )
    assert {name: samples(gw.metrics)[name] for name in names} == {
        "gateway_backlog": 4,
        "gateway_unacked": 5,
        "gateway_unconfirmed_publishes": 6,
        "gateway_database_up": 1,
        "gateway_broker_connected": 1,
        "gateway_publisher_leading": 1,
        "gateway_outbox_pending": 7,
    }
    running.store_ok = running.connected = running.leading = False
    now = samples(gw.metrics)
    assert now["gateway_database_up"] == 0
    assert now["gateway_broker_connected"] == 0
    assert now["gateway_publisher_leading"] == 0


def test_the_readme_lists_every_metric() -> None:
    """README's Metrics table names every metric the gateway describes."""
    readme = (GATEWAY.parent / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("#### Metrics") :].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(gateway_[a-z0-9_]+)", section))
    assert listed == set(HELP), sorted(set(HELP) ^ listed)
