"""Counters, histograms and gauges that the request path updates on every call, kept as
plain numbers and handed to prometheus-client when /metrics is scraped.

Why not prometheus-client's own `Counter` and `Histogram`: each of their updates takes a
lock and goes through three Python calls, ~4,600 instructions an `inc` and ~8,400 an
`observe` here, and a metered call makes about fifteen (4.5% of all the proxy spends on
it, counted by `bench.proxy_cost`). The values here are only ever updated on the event
loop's thread, so an update is one addition (or a bisect and an addition), and the
library still does all the rest: the registry, the exposition format, the parsing of
what it serves. Each metric here is a collector of its own on the registry, presenting
itself as prometheus-client's metric family, with the samples its own classes would give
(`_total` and `_created` for a counter; `_bucket`, `_count`, `_sum` and `_created` for
a histogram).

Only for metrics whose every update happens on the event loop: one updated from another
thread would lose increments. The rare ones (Stripe, webhooks, audits) stay
prometheus-client's own.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import REGISTRY, CollectorRegistry
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

__all__ = ["LoopCounter", "LoopGauge", "LoopHistogram"]


class _CounterChild:
    __slots__ = ("value", "created")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1) -> None:
        if amount < 0:
            raise ValueError("Counters can only be incremented by non-negative amounts.")
        self.value += amount


class _HistogramChild:
    __slots__ = ("_bounds", "counts", "sum", "created")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self.counts = [0] * len(bounds)  # not cumulative: each observation lands in one bucket
        self.sum = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        # The first bucket whose upper bound is >= amount (Prometheus buckets are "le").
        self.counts[bisect.bisect_left(self._bounds, amount)] += 1
        self.sum += amount


class _Metric:
    """A collector of one metric: the registry scrapes it, and refuses its name if already taken."""

    name: str
    documentation: str
    labelnames: tuple[str, ...]

    def family(self) -> Metric:
        raise NotImplementedError

    def _register(self, registry: CollectorRegistry | None) -> None:
        if registry is not None:
            registry.register(self)

    def collect(self) -> Iterator[Metric]:
        yield self.family()

    def describe(self) -> Iterator[Metric]:
        # A family's name and type are what the registry checks for clashes.
        yield self.family()


_Child = TypeVar("_Child", _CounterChild, _HistogramChild)


class _Labelled(_Metric, Generic[_Child]):
    """A metric with labels: one child per label values, made on first use and kept."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str],
                 registry: CollectorRegistry | None) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, tuple(labelnames)
        self._children: dict[tuple[str, ...], _Child] = {}
        self._register(registry)

    def _new_child(self) -> _Child:
        raise NotImplementedError

    def labels(self, *values: str) -> _Child:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected {len(self.labelnames)} label values, got {len(values)}")
            child = self._children[values] = self._new_child()
        return child


class LoopCounter(_Labelled[_CounterChild]):
    """A counter with labels; `labels(*values)` is its child for those values, kept."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (),
                 *, registry: CollectorRegistry | None = REGISTRY) -> None:
        super().__init__(name.removesuffix("_total"), documentation, labelnames, registry)

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in self._children.items():
            family.add_metric(values, child.value, created=child.created)
        return family


class LoopHistogram(_Labelled[_HistogramChild]):
    """A histogram with labels and fixed buckets (+Inf is added)."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float],
                 *, registry: CollectorRegistry | None = REGISTRY) -> None:
        bounds = tuple(float(b) for b in buckets)
        if list(bounds) != sorted(set(bounds)):
            raise ValueError(f"{name}: buckets must be in increasing order")
        self._bounds = bounds if bounds and bounds[-1] == math.inf else (*bounds, math.inf)
        super().__init__(name, documentation, labelnames, registry)  # registers: the bounds first

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self._bounds)

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        les = [floatToGoString(b) for b in self._bounds]
        for values, child in self._children.items():
            cumulative, buckets = 0, []
            for le, count in zip(les, child.counts, strict=True):
                cumulative += count
                buckets.append((le, cumulative))
            family.add_metric(values, buckets, child.sum)
            family.samples.append(Sample(self.name + "_created", dict(zip(self.labelnames, values, strict=True)),
                                         child.created))
        return family


class LoopGauge(_Metric):
    """A gauge without labels."""

    def __init__(self, name: str, documentation: str, *, registry: CollectorRegistry | None = REGISTRY) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, ()
        self.value = 0.0
        self._register(registry)

    def inc(self, amount: float = 1) -> None:
        self.value += amount

    def dec(self, amount: float = 1) -> None:
        self.value -= amount

    def family(self) -> Metric:
        return GaugeMetricFamily(self.name, self.documentation, value=self.value)
