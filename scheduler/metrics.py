"""Prometheus metrics of one scheduler instance (its own registry: no process globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from scheduler.placement.framework import Placer
from scheduler.slo_window import SloConfig, SloPhase, SloWindow


class _LabelledCounter(Counter):
    """A counter whose ``labels(...)`` children are kept in a plain dict: the library's look-up
    (keyword handling, a lock) costs two increments, and the scheduler takes a few per request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._children: dict[tuple[str, ...], Counter] = {}

    def labels(self, *values: str) -> Counter:  # type: ignore[override]
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = super().labels(*values)
        return child


_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self, slo: SloConfig) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # Finished requests judged against the SLO targets; the autoscaler reads it too.
        self.slo = SloWindow(slo)
        r.register(_SloAttainment(self.slo))
        self.requests = _LabelledCounter(
            "pdorch_requests", "Finished requests by outcome", ["outcome"], registry=r
        )
        self.tokens_generated = Counter("pdorch_generated_tokens", "Generated tokens", registry=r)
        self.prompt_tokens = Counter("pdorch_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.ttft = Histogram(
            "pdorch_time_to_first_token_seconds",
            "Arrival to first token",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "pdorch_time_per_output_token_seconds",
            "Mean time between output tokens",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pdorch_request_latency_seconds", "Arrival to last token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.http_errors = _LabelledCounter(
            "pdorch_http_errors",
            "HTTP error responses by code (malformed or refused input among them: it is counted here, "
            "not logged line by line)",
            ["code"],
            registry=r,
        )
        self.handoffs = _LabelledCounter(
            "pdorch_kv_handoffs", "KV handoffs by mode and outcome", ["mode", "outcome"], registry=r
        )
        self.migrations = _LabelledCounter(
            "pdorch_migrations",
            "Requests moved on after a worker failed them, by the phase they were in, the kind of "
            "failure (lost, stalled, error) and the recovery (resume from the tokens so far, "
            "new_decode: another decode worker takes the broker's KV, give_up)",
            ["phase", "cause", "recovery"],
            registry=r,
        )
        self.kv_path_backoffs = _LabelledCounter(
            "pdorch_kv_path_backoffs",
            "KV paths backed off after p2p handoffs over them did not land: a pair of workers (pair), "
            "or a worker whose handoffs with two or more peers did not (worker)",
            ["scope"],
            registry=r,
        )
        self.placements = _LabelledCounter(
            "pdorch_placements",
            "Where each attempt of a request was placed: split (prefill on one worker, decode on "
            "another), or whole on one worker of a role (prefill, decode, both)",
            ["kind"],
            registry=r,
        )
        self.attempts = Histogram(
            "pdorch_request_attempts",
            "Attempts per request (1 = no migration)",
            buckets=(1, 2, 3, 4, 6, 8),
            registry=r,
        )
        self.output_length_error = Histogram(
            "pdorch_output_length_error_tokens",
            "Per finished request, how far its output length was from the length predicted when it "
            "was placed (the predictor learns from each of them)",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
            registry=r,
        )
        self.migration_seconds = Histogram(
            "pdorch_migration_seconds",
            "Time a migration cost a request: its last progress before the failure to the next",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def bind_gauge(self, name: str, doc: str, fn: Callable[[], float]) -> None:
        """A gauge read at scrape time (worker counts, bad-message counters...)."""
        Gauge(name, doc, registry=self.registry).set_function(fn)

    def bind_counts(self, name: str, doc: str, label: str, fn: Callable[[], Mapping[str, int]]) -> None:
        """A counter per label value, read at scrape time from ``fn`` (e.g. refusals by reason)."""
        self.registry.register(_PerLabel(name, doc, label, fn, CounterMetricFamily))

    def bind_levels(self, name: str, doc: str, label: str, fn: Callable[[], Mapping[str, float]]) -> None:
        """A gauge per label value, read at scrape time from ``fn`` (e.g. a margin per node class)."""
        self.registry.register(_PerLabel(name, doc, label, fn, GaugeMetricFamily))

    def watch_placement(self, placer: Placer) -> None:
        """Export the placement framework's per-plugin decision latency at scrape time."""
        self.registry.register(_PlacementLatency(placer))


class _PerLabel(Collector):
    def __init__(
        self,
        name: str,
        doc: str,
        label: str,
        fn: Callable[[], Mapping[str, float]],
        family: type[CounterMetricFamily] | type[GaugeMetricFamily],
    ) -> None:
        self._name, self._doc, self._label, self._fn, self._family = name, doc, label, fn, family

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        family = self._family(self._name, self._doc, labels=[self._label])
        for value, amount in sorted(self._fn().items()):
            family.add_metric([value], amount)
        yield family


class _PlacementLatency(Collector):
    def __init__(self, placer: Placer) -> None:
        self._placer = placer

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        calls = CounterMetricFamily("pdorch_placement_plugin_calls", "Plugin invocations", labels=["plugin"])
        total = CounterMetricFamily(
            "pdorch_placement_plugin_seconds", "Time spent in each placement plugin", labels=["plugin"]
        )
        worst = GaugeMetricFamily(
            "pdorch_placement_plugin_max_seconds", "Slowest single call of each plugin", labels=["plugin"]
        )
        for label, lat in sorted(self._placer.latency().items()):
            calls.add_metric([label], lat.calls)
            total.add_metric([label], lat.total_s)
            worst.add_metric([label], lat.max_s)
        yield from (calls, total, worst)


class _SloAttainment(Collector):
    def __init__(self, window: SloWindow) -> None:
        self._window = window

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "pdorch_slo_attainment",
            "Share of recently finished requests that met the SLO target of each phase (when known)",
            labels=["phase"],
        )
        for phase in SloPhase:
            value = self._window.attainment(phase)
            if value is not None:
                gauge.add_metric([phase.value], value)
        yield gauge
