"""The loop metrics (proxy/metrics.py) expose what prometheus-client's own classes would.

Each test builds its metrics on a private registry, so nothing here touches the
process's /metrics.
"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.metrics import LoopCounter, LoopGauge, LoopHistogram

BUCKETS = (0.001, 0.01, 0.1, 1.0, 10.0)
# Every bucket's edge, either side of it, below the first and above the last.
OBSERVED = (0.0, 0.0005, 0.001, 0.0011, 0.01, 0.05, 0.1, 0.1000001, 1.0, 3.0, 10.0, 10.5, 1e9)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(registry: CollectorRegistry) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }


def families(registry: CollectorRegistry) -> dict[str, tuple[str, str]]:
    return {f.name: (f.type, f.documentation) for f in text_string_to_metric_families(generate_latest(registry).decode())}


def feed(counter: Counter | LoopCounter, histogram: Histogram | LoopHistogram, gauge: Gauge | LoopGauge) -> None:
    for n, route in enumerate(("/v1/chat/completions", "/v1/embeddings", "/v1/chat/completions")):
        counter.labels(route, "200").inc()
        counter.labels(route, "402").inc(n + 2)
    for n, amount in enumerate(OBSERVED):
        histogram.labels("hold" if n % 3 else "settle").observe(amount)
    gauge.inc()
    gauge.inc()
    gauge.dec()


def test_loop_metrics_expose_the_samples_prometheus_clients_own_would():
    own, loop = CollectorRegistry(), CollectorRegistry()
    feed(Counter("m_requests", "Requests", ["route", "status"], registry=own),
         Histogram("m_seconds", "Round trips", ["script"], buckets=BUCKETS, registry=own),
         Gauge("m_open", "Open streams", registry=own))
    feed(LoopCounter("m_requests", "Requests", ["route", "status"], registry=loop),
         LoopHistogram("m_seconds", "Round trips", ["script"], buckets=BUCKETS, registry=loop),
         LoopGauge("m_open", "Open streams", registry=loop))

    expected, got = samples(own), samples(loop)
    # _created is when a child was made: the same series, not the same instant.
    created = {key for key in expected if key[0].endswith("_created")}
    assert created and set(got) == set(expected)
    assert {k: v for k, v in got.items() if k not in created} == {k: v for k, v in expected.items() if k not in created}
    assert all(abs(got[key] - expected[key]) < 5 for key in created)
    assert families(loop) == families(own)


def test_an_observation_on_a_bucket_edge_counts_in_that_bucket():
    registry = CollectorRegistry()
    histogram = LoopHistogram("m_edge", "Edges", ["script"], buckets=BUCKETS, registry=registry)
    histogram.labels("hold").observe(0.01)
    got = samples(registry)
    assert got[("m_edge_bucket", frozenset({("script", "hold"), ("le", "0.001")}))] == 0
    assert got[("m_edge_bucket", frozenset({("script", "hold"), ("le", "0.01")}))] == 1
    assert got[("m_edge_bucket", frozenset({("script", "hold"), ("le", "+Inf")}))] == 1
    assert got[("m_edge_count", frozenset({("script", "hold")}))] == 1
    assert got[("m_edge_sum", frozenset({("script", "hold")}))] == 0.01


def test_a_counter_refuses_a_negative_increment_and_keeps_its_value():
    registry = CollectorRegistry()
    child = LoopCounter("m_money", "Micros", ["model"], registry=registry).labels("gpt-4o-mini")
    child.inc(5)
    with pytest.raises(ValueError):
        child.inc(-1)
    assert samples(registry)[("m_money_total", frozenset({("model", "gpt-4o-mini")}))] == 5


def test_the_wrong_number_of_label_values_is_refused():
    registry = CollectorRegistry()
    with pytest.raises(ValueError):
        LoopCounter("m_calls", "Calls", ["model", "outcome"], registry=registry).labels("gpt-4o-mini")
    with pytest.raises(ValueError):
        LoopHistogram("m_s", "Seconds", ["route"], buckets=BUCKETS, registry=registry).labels("a", "b")


def test_a_name_already_on_the_registry_is_refused():
    registry = CollectorRegistry()
    Counter("m_taken", "Taken", registry=registry)
    with pytest.raises(ValueError):
        LoopCounter("m_taken", "Again", registry=registry)
    LoopHistogram("m_hist", "Histogram", [], buckets=BUCKETS, registry=registry)
    with pytest.raises(ValueError):
        Counter("m_hist_count", "Clashes with the histogram's _count", registry=registry)


def test_buckets_out_of_order_are_refused():
    with pytest.raises(ValueError):
        LoopHistogram("m_bad", "Bad", [], buckets=(1.0, 0.5), registry=None)
