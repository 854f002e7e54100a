"""A pool's load as the autoscaler reads it, computed from the worker registry."""

from __future__ import annotations

from scheduler.admission.gate import AdmissionGate
from scheduler.cluster import Cluster, WorkerState
from scheduler.kubernetes.signals import PoolSignals
from scheduler.slo_window import POOL_PHASE, SloWindow
from transport.messages import Role


def pool_signals(cluster: Cluster, admission: AdmissionGate, slo: SloWindow, pool: str) -> PoolSignals:
    role = Role(pool)
    workers = [w for w in cluster.workers() if w.hello.role == role]
    serving = [w for w in workers if w.state is WorkerState.READY]
    occupancy = [
        min(1.0, (w.load.blocks_used + w.reserved_blocks) / total)
        for w in serving
        if (total := w.load.blocks_total or w.hello.capacity_blocks)
    ]
    if role is Role.DECODE:
        # Reservations are the predicted footprint (prompt + predicted output) of requests in flight.
        demand = sum(w.reserved_blocks * w.hello.block_size for w in workers)
    else:
        demand = sum(w.pending_prefill_tokens + w.load.queued_prefill_tokens for w in workers)
    return PoolSignals(
        pool=pool,
        replicas=len(serving),
        queued_requests=admission.queued,
        kv_occupancy=sum(occupancy) / len(occupancy) if occupancy else 0.0,
        inflight_requests=sum(len(w.requests) for w in workers),
        predicted_tokens=demand,
        slo_attainment=slo.attainment(POOL_PHASE[pool]),
    )
