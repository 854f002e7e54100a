"""The load of one pool as the autoscaler reads it each interval."""

from __future__ import annotations

from collections.abc import Callable

import msgspec


class PoolSignals(msgspec.Struct, frozen=True, kw_only=True):
    pool: str  # "prefill" or "decode"
    # Workers of the pool registered and serving (not draining) right now.
    replicas: int
    # Requests waiting at the scheduler for a worker of this pool.
    queued_requests: int = 0
    # Mean KV-cache occupancy of the pool's workers, 0..1 (used + reserved blocks / total).
    kv_occupancy: float = 0.0
    # Requests running on the pool's workers.
    inflight_requests: int = 0
    # Predicted demand in tokens: tokens in flight plus predicted output tokens still to come.
    predicted_tokens: int = 0
    # Share of recently finished requests that met this pool's latency target (prefill: time to first
    # token, decode: time per output token), 0..1; None = unknown (too few requests, or no target).
    slo_attainment: float | None = None


# Wired by the scheduler: pool name -> its current signals. Called on the event loop; must not block.
SignalSource = Callable[[str], PoolSignals]
