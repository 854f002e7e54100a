"""Goodput search: the highest arrival-rate scale at which the SLO attainment target is still met.

Scales the trace's arrival rate (timestamps divided by the scale), runs the simulator, and searches:
doubling (or halving) from a start scale until the target is bracketed, then bisection to a relative
precision. Runs that can no longer reach the target stop early (``max_misses``), which makes the
failing side of the search cheap. Attainment is not strictly monotonic in the rate for a bursty trace,
so the result is the crossing the bisection finds, reported together with the run at that scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import msgspec

from scheduler.placement.config import PlacementConfig
from simulate.cluster import ClusterSpec
from simulate.metrics import SimResult
from simulate.runner import SimConfig, simulate
from simulate.slo import SloSpec
from simulate.trace import Trace


class GoodputResult(msgspec.Struct, frozen=True):
    policy: str
    trace: str
    goodput_scale: float  # 0 when even the lowest scale tried misses the target
    goodput_rps: float  # requests per second at that scale
    at_goodput: SimResult | None
    runs: int


def find_goodput(
    trace: Trace,
    cluster: ClusterSpec,
    placement: PlacementConfig,
    slo: SloSpec | None = None,
    config: SimConfig | None = None,
    *,
    policy_name: str = "custom",
    start_scale: float = 1.0,
    precision: float = 0.03,
    min_scale: float = 1.0 / 64,
    max_scale: float = 256.0,
    on_run: Callable[[SimResult], None] | None = None,
) -> GoodputResult:
    slo, config = slo or SloSpec(), config or SimConfig()
    allowed = math.floor((1.0 - slo.target) * len(trace.requests))
    runs = 0

    def run(scale: float) -> SimResult:
        nonlocal runs
        runs += 1
        result = simulate(
            trace,
            cluster,
            placement,
            slo,
            config,
            policy_name=policy_name,
            rate_scale=scale,
            max_misses=allowed,
        )
        if on_run is not None:
            on_run(result)
        return result

    def ok(r: SimResult) -> bool:
        return not r.aborted and r.attainment >= slo.target

    scale = start_scale
    first = run(scale)
    if ok(first):
        good, good_result = scale, first
        bad = math.inf
        while bad == math.inf and scale < max_scale:
            scale *= 2.0
            r = run(scale)
            if ok(r):
                good, good_result = scale, r
            else:
                bad = scale
        if bad == math.inf:
            return GoodputResult(policy_name, trace.name, good, good * _base_rate(trace), good_result, runs)
    else:
        bad = scale
        good_result = None
        good = 0.0
        while scale > min_scale:
            scale /= 2.0
            r = run(scale)
            if ok(r):
                good, good_result = scale, r
                break
            bad = scale
        if good_result is None:
            return GoodputResult(policy_name, trace.name, 0.0, 0.0, None, runs)
    while bad / good > 1.0 + precision:
        mid = math.sqrt(good * bad)
        r = run(mid)
        if ok(r):
            good, good_result = mid, r
        else:
            bad = mid
    return GoodputResult(policy_name, trace.name, good, good * _base_rate(trace), good_result, runs)


def attainment_curve(
    trace: Trace,
    cluster: ClusterSpec,
    placement: PlacementConfig,
    scales: list[float],
    slo: SloSpec | None = None,
    config: SimConfig | None = None,
    *,
    policy_name: str = "custom",
) -> list[SimResult]:
    """Full runs (no early stop) at each scale, for plots."""
    slo, config = slo or SloSpec(), config or SimConfig()
    return [
        simulate(trace, cluster, placement, slo, config, policy_name=policy_name, rate_scale=s)
        for s in scales
    ]


def _base_rate(trace: Trace) -> float:
    return len(trace.requests) / trace.duration_s if trace.duration_s > 0 else 0.0
