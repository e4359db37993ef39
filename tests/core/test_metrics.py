"""GET /metrics: counters, labelled counters, gauges and the batch histogram in Prometheus text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from gateway.metrics import BATCH_BUCKETS, HELP, Metrics


def lines(metrics: Metrics) -> list[str]:
    return metrics.render().splitlines()


def test_empty_render_has_the_histogram() -> None:
    """With nothing counted the batch histogram is still there, all zero."""
    out = lines(Metrics())
    assert out[0] == f"# HELP gateway_batch_size {HELP['gateway_batch_size']}"
    assert out[1] == "# TYPE gateway_batch_size histogram"
    assert f'gateway_batch_size_bucket{{le="{BATCH_BUCKETS[0]}"}} 0' in out
    assert 'gateway_batch_size_bucket{le="+Inf"} 0' in out
    assert "gateway_batch_size_sum 0" in out
    assert "gateway_batch_size_count 0" in out
    assert Metrics().render().endswith("\n")


def test_counters() -> None:
    """Counters are summed, sorted by name, each with its HELP and TYPE lines."""
    m = Metrics()
    m.inc("gateway_requests_total")
    m.inc("gateway_requests_total", 2)
    m.inc("gateway_acks_total", 0.5)
    m.inc("gateway_dead_letters_total", 4)
    out = lines(m)
    assert out[:9] == [
        "# HELP gateway_acks_total gateway_acks_total",  # undescribed: its name as help
        "# TYPE gateway_acks_total counter",
        "gateway_acks_total 0.5",
        f"# HELP gateway_dead_letters_total {HELP['gateway_dead_letters_total']}",
        "# TYPE gateway_dead_letters_total counter",
        "gateway_dead_letters_total 4",
        "# HELP gateway_requests_total gateway_requests_total",
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


_METRIC_NAME = re.compile(r'\.(?:inc|inc_labelled|inc_labels|gauge)\(\s*"(gateway_[a-z0-9_]+)"')


def test_every_metric_in_use_is_described() -> None:
    """Each metric name the gateway counts has its HELP text in gateway/metrics.py."""
    root = Path(__file__).resolve().parents[2] / "gateway"
    used = {
        name
        for path in root.rglob("*.py")
        for name in _METRIC_NAME.findall(path.read_text(encoding="utf-8"))
    }
    assert "gateway_http_requests_total" in used
    assert "gateway_refused_total" in used
    assert used <= set(HELP), sorted(used - set(HELP))
