"""What one simulation run reports: latency percentiles, SLO attainment, KV traffic, preemptions."""

from __future__ import annotations

import math

import msgspec
import numpy as np


class SimResult(msgspec.Struct, frozen=True):
    policy: str
    trace: str
    cluster: str
    rate_scale: float
    request_rate: float  # arrivals per second at this scale
    requests: int
    finished: int
    failed: int  # dropped (larger than any node's KV) or never placed
    aborted: bool  # stopped early: too many SLO misses to reach the target
    ttft_p50_s: float
    ttft_p90_s: float
    ttft_p99_s: float
    tpot_p50_s: float
    tpot_p90_s: float
    tpot_p99_s: float
    attainment: float  # share of all requests meeting both SLOs
    ttft_attainment: float
    tpot_attainment: float
    kv_transfer_gb: float
    preemptions: int
    prefix_hit_rate: float  # share of prompt tokens served from prefix caches
    local_prefills: int  # requests a disaggregating policy ran colocated (decider or fallback)
    shed: int  # requests placement refused because their TTFT objective could no longer be met
    # Median |actual / predicted - 1| of the placements' predicted TTFT and TPOT (nan: none predicted).
    ttft_prediction_error: float
    tpot_prediction_error: float
    makespan_s: float  # virtual time from first arrival to last finish
    adapter_loads: int = 0  # LoRA adapter loads, every engine together


def percentile(values: np.ndarray, q: float) -> float:
    if values.size == 0:
        return math.nan
    return float(np.percentile(values, q))
