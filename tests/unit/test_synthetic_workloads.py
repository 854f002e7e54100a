"""The synthetic workloads: seeded, at 1 request/s on average, bursts where asked for."""

from __future__ import annotations

import numpy as np
import pytest

from simulate.synthetic import WORKLOADS, Workload, generate, workload_trace


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_a_named_workload_is_seeded_and_averages_one_request_per_second(name: str) -> None:
    trace = workload_trace(name, requests=4000, seed=3)
    assert trace == workload_trace(name, requests=4000, seed=3)
    assert trace != workload_trace(name, requests=4000, seed=4)
    assert trace.name == name and len(trace.requests) == 4000
    assert 0.9 < len(trace.requests) / trace.duration_s < 1.1
    arrivals = [r.arrival_s for r in trace.requests]
    assert arrivals == sorted(arrivals)
    assert all(16 <= r.prompt_len <= 8000 and 2 <= r.output_len <= 3000 for r in trace.requests)


def test_lengths_follow_the_log_normal_asked_for() -> None:
    trace = generate(Workload(prompt=(6.0, 0.5), output=(4.0, 0.5)), 20_000, seed=0)
    prompts = np.log([r.prompt_len for r in trace.requests])
    outputs = np.log([r.output_len for r in trace.requests])
    assert abs(np.median(prompts) - 6.0) < 0.05 and abs(np.median(outputs) - 4.0) < 0.05


def test_bursts_arrive_at_three_times_the_rate_then_pause() -> None:
    w = Workload(prompt=(6.0, 0.5), output=(4.0, 0.5), burst_s=10.0, pause_s=20.0)
    arrivals = np.array([r.arrival_s for r in generate(w, 6000, seed=1).requests])
    phase = arrivals % 30.0
    assert (phase < 10.0).all()  # nothing arrives in a pause
    per_burst = np.bincount((arrivals // 30.0).astype(int))[:-1]  # whole cycles only
    assert 25 < per_burst.mean() < 35  # 3 requests/s for 10 s
