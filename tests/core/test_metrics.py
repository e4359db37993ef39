"""GET /metrics: counters, labelled counters, gauges and the batch histogram in Prometheus text."""

from __future__ import annotations

import pytest

from gateway.metrics import BATCH_BUCKETS, Metrics


def lines(metrics: Metrics) -> list[str]:
    return metrics.render().splitlines()


def test_empty_render_has_the_histogram() -> None:
    """With nothing counted the batch histogram is still there, all zero."""
    out = lines(Metrics())
    assert out[0] == "# TYPE gateway_batch_size histogram"
    assert f'gateway_batch_size_bucket{{le="{BATCH_BUCKETS[0]}"}} 0' in out
    assert 'gateway_batch_size_bucket{le="+Inf"} 0' in out
    assert "gateway_batch_size_sum 0" in out
    assert "gateway_batch_size_count 0" in out
    assert Metrics().render().endswith("\n")


def test_counters() -> None:
    """Counters are summed, sorted by name, each with its TYPE line."""
    m = Metrics()
    m.inc("gateway_requests_total")
    m.inc("gateway_requests_total", 2)
    m.inc("gateway_acks_total", 0.5)
    out = lines(m)
    assert out[:4] == [
        "# TYPE gateway_acks_total counter",
        "gateway_acks_total 0.5",
        "# TYPE gateway_requests_total counter",
        "gateway_requests_total 3",
    ]
    assert m.value("gateway_requests_total") == 3
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


def test_batch_apply_time_is_a_summary() -> None:
    """The time spent applying batches is summed with their count (mean = sum / count)."""
    m = Metrics()
    assert "gateway_batch_apply_seconds_sum 0.0" in lines(m)
    m.observe_batch(10, 0.25)
    m.observe_batch(30, 0.5)
    out = lines(m)
    assert "# TYPE gateway_batch_apply_seconds summary" in out
    assert "gateway_batch_apply_seconds_sum 0.75" in out
    assert "gateway_batch_apply_seconds_count 2" in out


def test_every_sample_line_parses() -> None:
    """Every line is a comment or `name[{labels}] number`, as Prometheus expects."""
    m = Metrics()
    m.inc("a_total", 2)
    m.inc_labelled("b_total", "code", "NOT_FOUND")
    m.gauge("c", lambda: 1.25)
    m.observe_batch(7)
    for line in lines(m):
        if line.startswith("#"):
            assert line.split()[1] == "TYPE"
            continue
        name, _, value = line.rpartition(" ")
        assert name
        float(value)
