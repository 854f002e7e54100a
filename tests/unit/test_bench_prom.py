"""bench/prom.py: pdorch's figures for a window, from two scrapes of a real Prometheus exposition."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from bench import prom

BUCKETS = (0.1, 0.5, 1.0, 2.5)


def _registry() -> tuple[CollectorRegistry, Counter, Histogram]:
    r = CollectorRegistry()
    requests = Counter("pdorch_requests", "by outcome", ["outcome"], registry=r)
    ttft = Histogram("pdorch_time_to_first_token_seconds", "ttft", buckets=BUCKETS, registry=r)
    return r, requests, ttft


def _scrape(r: CollectorRegistry) -> dict[str, float]:
    return prom.parse(generate_latest(r).decode())


def test_counters_sum_their_series_or_the_chosen_labels() -> None:
    r, requests, _ = _registry()
    requests.labels("ok").inc(5)
    requests.labels("client_gone").inc(2)
    s = _scrape(r)
    assert prom.total(s, "pdorch_requests_total") == 7
    assert prom.total(s, "pdorch_requests_total", outcome="ok") == 5
    assert prom.total(s, "pdorch_requests") == 0  # a name's prefix is not the name
    assert prom.total(s, "pdorch_missing_total") == 0


def test_histogram_delta_keeps_only_what_the_window_observed() -> None:
    r, _, ttft = _registry()
    for x in (0.05, 3.0, 3.0):  # before the window: must not show in its figures
        ttft.observe(x)
    before = _scrape(r)
    for x in (0.2, 0.3, 0.4, 0.7):
        ttft.observe(x)
    h = prom.histogram_delta(before, _scrape(r), "pdorch_time_to_first_token_seconds")
    assert h.count == 4
    assert h.mean == pytest.approx(0.4)  # exact: from _sum and _count
    # 3 of 4 in (0.1, 0.5], 1 in (0.5, 1]: the median's rank 2 is 2/3 of the way through (0.1, 0.5].
    assert h.quantile(0.5) == pytest.approx(0.1 + 0.4 * 2 / 3)
    assert h.quantile(0.99) == pytest.approx(0.5 + 0.5 * (3.96 - 3))
    assert h.bucket(0.5) == (0.1, 0.5) and h.bucket(0.99) == (0.5, 1.0)


def test_an_empty_window_has_no_figures_and_past_the_last_bucket_reads_as_its_bound() -> None:
    r, _, ttft = _registry()
    before = _scrape(r)
    empty = prom.histogram_delta(before, before, "pdorch_time_to_first_token_seconds")
    assert empty.count == 0 and math.isnan(empty.mean) and math.isnan(empty.quantile(0.5))
    ttft.observe(10.0)
    h = prom.histogram_delta(before, _scrape(r), "pdorch_time_to_first_token_seconds")
    assert h.quantile(0.5) == 2.5 and h.bucket(0.5) == (2.5, math.inf)


def test_active_span_runs_from_the_first_change_to_the_last_to_within_a_poll() -> None:
    # Polled every second: idle, busy from between t=2 and t=3 to between t=6 and t=7, idle after.
    points = [(0.0, 10), (1.0, 10), (2.0, 10), (3.0, 12), (4.0, 15), (5.0, 15), (6.0, 18), (7.0, 20)]
    points += [(8.0, 20), (9.0, 20)]
    assert prom.active_span(points) == pytest.approx(6.5 - 2.5)
    assert math.isnan(prom.active_span([(0.0, 1), (1.0, 1)]))


def test_the_bench_reads_pdorchs_own_metrics_by_their_real_names() -> None:
    """A rename in scheduler/metrics.py would leave the client bench reading zeros: caught here."""
    from bench.clients import agreement, server_figures
    from bench.load_clients import Figures, Workload
    from scheduler.metrics import Metrics
    from scheduler.slo_window import SloConfig

    m = Metrics(SloConfig())
    m.requests.labels("ok").inc()  # before the window
    before = _scrape(m.registry)
    for ttft in (0.2, 0.4):
        m.prompt_tokens.inc(128)
        m.tokens_generated.inc(32)
        m.ttft.observe(ttft)
        m.tpot.observe(0.05)
        m.e2e.observe(ttft + 31 * 0.05)
        m.requests.labels("ok").inc()
    m.migrations.labels("handoff", "stalled", "resume").inc()
    srv = server_figures(before, _scrape(m.registry), [(0.0, 0), (1.0, 1), (8.0, 1), (9.0, 2), (10.0, 2)])
    assert (srv.requests, srv.ok, srv.prompt_tokens, srv.generated_tokens) == (2, 2, 256, 64)
    assert srv.ttft.mean == pytest.approx(0.3) and srv.tpot.mean == pytest.approx(0.05)
    assert srv.latency.count == 2 and srv.span_s == pytest.approx(8.0) and srv.migrations == 1
    client = Figures(2, 0, 8.0, (0.31, 0.31, 0.4), (0.05, 0.05, 0.05), 0.25, 8.0, 256, 64)
    shape = Workload(input_tokens=128, output_tokens=32, prompts=2, concurrency=2)
    assert agreement("c", client, srv, shape).startswith("c: client, pdorch and the asked-for shape agree")
    short = Figures(2, 0, 8.0, (0.31, 0.31, 0.4), (0.05, 0.05, 0.05), 0.25, 8.0, 250, 64)
    assert "input tokens: (250, 256.0, 256)" in agreement("c", short, srv, shape)
