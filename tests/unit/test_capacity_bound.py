"""The capacity bound: no policy's simulated goodput exceeds it, and it is not vacuous."""

from __future__ import annotations

import numpy as np
import pytest

from scheduler.placement.policies import policy
from simulate.capacity_bound import capacity_bound
from simulate.cluster import parse_cluster
from simulate.goodput import find_goodput
from simulate.runner import SimConfig
from simulate.slo import SloSpec
from simulate.trace import Trace, TraceRequest

SLO = SloSpec()


def _trace(n: int, seed: int, *, shared_prefix: bool = False) -> Trace:
    """Poisson arrivals at 1/s, ShareGPT-like lengths (long-tailed prompts and answers)."""
    rng = np.random.default_rng(seed)
    t = np.cumsum(rng.exponential(1.0, n))
    prompts = np.clip(rng.lognormal(6.5, 1.0, n), 16, 6000).astype(int)
    outputs = np.clip(rng.lognormal(5.0, 1.0, n), 2, 2000).astype(int)
    requests = tuple(
        TraceRequest(
            float(a),
            int(p),
            int(o),
            # Every prompt begins with the same 512-token block when shared.
            hash_ids=(1, *range(1000 * i + 2, 1000 * i + 2 + p // 512)) if shared_prefix else (),
        )
        for i, (a, p, o) in enumerate(zip(t, prompts, outputs, strict=True))
    )
    return Trace("synthetic", requests, prefix_block_tokens=512 if shared_prefix else 16)


@pytest.mark.parametrize("name", ["pdorch", "colocated", "least-request"])
def test_no_policy_beats_the_bound(name: str) -> None:
    trace = _trace(300, seed=1)
    cluster = parse_cluster(["1:h100x4"], ["1:a100x4"])
    config = SimConfig()
    bound = capacity_bound(trace, cluster, SLO)
    placement = policy(name, tpot_target_s=SLO.tpot_s, kv_link_gbytes_per_s=config.link_gbytes_per_s)
    target = cluster.colocated() if name == "colocated" else cluster
    g = find_goodput(trace, target, placement, SLO, config, policy_name=name, precision=0.05)
    assert 0 < g.goodput_scale <= bound.rate_scale
    # Informative, not vacuous: the best of these policies gets within a small factor of it.
    assert bound.rate_scale < 6 * g.goodput_scale


def test_the_bound_grows_with_the_cluster_and_the_allowance() -> None:
    trace = _trace(400, seed=2)
    small = capacity_bound(trace, parse_cluster(["2:h100x4"], ["2:a100x4"]), SLO)
    large = capacity_bound(trace, parse_cluster(["4:h100x4"], ["4:a100x4"]), SLO)
    assert large.served_per_s == pytest.approx(2 * small.served_per_s)
    strict = capacity_bound(trace, parse_cluster(["2:h100x4"], ["2:a100x4"]), SloSpec(target=1.0))
    assert strict.served_per_s < small.served_per_s
    assert strict.arrivals_per_s == pytest.approx(strict.served_per_s)
    assert small.arrivals_per_s == pytest.approx(small.served_per_s / SLO.target)


def test_the_split_balances_prefill_and_decode() -> None:
    trace = _trace(400, seed=3)
    bound = capacity_bound(trace, parse_cluster(["2:h100x4"], ["2:a100x4"]), SloSpec(target=1.0))
    prompts = np.array([r.prompt_len for r in trace.requests])
    steps = np.array([r.output_len - 1 for r in trace.requests])
    prefill_rate = sum(s.instances * s.prefill_share / s.prefill_s_per_request for s in bound.shares)
    decode_rate = sum(s.instances * (1 - s.prefill_share) * s.decode_tokens_per_s for s in bound.shares)
    assert prefill_rate == pytest.approx(bound.served_per_s)
    assert decode_rate / steps.mean() == pytest.approx(bound.served_per_s)
    assert all(0.0 <= s.prefill_share <= 1.0 for s in bound.shares)
    assert prompts.min() > 0


def test_cached_prefixes_lower_the_prefill_demand() -> None:
    plain, shared = _trace(200, seed=4), _trace(200, seed=4, shared_prefix=True)
    cluster = parse_cluster(["1:h100x4"], ["1:a100x4"])
    a = {s.accelerator: s.prefill_s_per_request for s in capacity_bound(plain, cluster, SLO).shares}
    b = {s.accelerator: s.prefill_s_per_request for s in capacity_bound(shared, cluster, SLO).shares}
    assert all(b[k] < a[k] for k in a)
