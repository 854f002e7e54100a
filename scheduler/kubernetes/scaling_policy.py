"""The autoscaler's decision for one pool: pure, no I/O, no clock (``now`` is an argument).

signals + current replica count + state + config -> :class:`ScalingDecision`.

The rules, in order:
1. Bounds first: below ``min_replicas`` go to the minimum, above ``max_replicas`` to the maximum,
   at once (no cooldown, no step limit: the bounds are the operator's word).
2. Pressure = max over the enabled signals of observed / target, per *serving* replica.
3. Above ``scale_up_at`` (or SLO attainment below its floor): grow to ceil(serving x pressure),
   at least serving + 1 on an SLO breach, but only past what already exists or is starting,
   by at most ``max_step``, and not within ``scale_up_cooldown_s`` of the last change.
4. Below ``scale_down_at`` on every signal, SLO fine: shrink to ceil(serving x pressure) (never
   below the minimum), by at most ``max_step``, not within ``scale_down_cooldown_s``.
5. Otherwise hold. Sizing to pressure 1.0 inside the dead band (down < 1 < up) keeps a pool that
   was just resized from crossing a threshold again (no flapping).
"""

from __future__ import annotations

import enum
import math

import msgspec

from scheduler.kubernetes.config import PoolAutoscalingConfig
from scheduler.kubernetes.signals import PoolSignals


class Direction(enum.StrEnum):
    UP = "up"
    DOWN = "down"
    HOLD = "hold"


class PoolScalingState(msgspec.Struct, frozen=True):
    """What the policy remembers between decisions for one pool."""

    last_change_at: float | None = None


class ScalingDecision(msgspec.Struct, frozen=True, kw_only=True):
    pool: str
    current: int
    desired: int
    reason: str
    pressure: float = 0.0
    dominant: str = ""  # the signal with the highest pressure

    @property
    def direction(self) -> Direction:
        if self.desired > self.current:
            return Direction.UP
        if self.desired < self.current:
            return Direction.DOWN
        return Direction.HOLD


def pressures(signals: PoolSignals, config: PoolAutoscalingConfig) -> dict[str, float]:
    """Observed / target for every enabled signal, per serving replica (needs replicas >= 1)."""
    serving = signals.replicas
    out: dict[str, float] = {}
    if config.target_queued_per_replica > 0:
        out["queue"] = signals.queued_requests / (serving * config.target_queued_per_replica)
    if config.target_kv_occupancy > 0:
        out["kv_occupancy"] = min(max(signals.kv_occupancy, 0.0), 1.0) / config.target_kv_occupancy
    if config.target_inflight_per_replica > 0:
        out["inflight"] = signals.inflight_requests / (serving * config.target_inflight_per_replica)
    if config.target_tokens_per_replica > 0:
        out["predicted_tokens"] = signals.predicted_tokens / (serving * config.target_tokens_per_replica)
    return out


def decide(
    signals: PoolSignals,
    current: int,
    state: PoolScalingState,
    config: PoolAutoscalingConfig,
    now: float,
) -> ScalingDecision:
    pool = signals.pool
    if current < config.min_replicas:
        return ScalingDecision(
            pool=pool, current=current, desired=config.min_replicas, reason="below min_replicas"
        )
    if current > config.max_replicas:
        return ScalingDecision(
            pool=pool, current=current, desired=config.max_replicas, reason="above max_replicas"
        )
    if signals.replicas <= 0:
        return ScalingDecision(
            pool=pool, current=current, desired=current, reason="no serving replica yet: nothing to measure"
        )

    by_signal = pressures(signals, config)
    dominant = max(by_signal, key=lambda name: by_signal[name])
    pressure = by_signal[dominant]
    slo_breach = (
        config.min_slo_attainment > 0
        and signals.slo_attainment is not None
        and signals.slo_attainment < config.min_slo_attainment
    )
    since_change = math.inf if state.last_change_at is None else now - state.last_change_at

    def result(desired: int, reason: str) -> ScalingDecision:
        return ScalingDecision(
            pool=pool, current=current, desired=desired, reason=reason, pressure=pressure, dominant=dominant
        )

    if pressure > config.scale_up_at or slo_breach:
        if pressure > config.scale_up_at:
            want = math.ceil(signals.replicas * pressure)
            why = f"{dominant} pressure {pressure:.2f} > {config.scale_up_at}"
        else:
            want = 0
            why = f"SLO attainment {signals.slo_attainment:.2f} < {config.min_slo_attainment}"
        if slo_breach:
            want = max(want, signals.replicas + 1)
        if current >= config.max_replicas:
            return result(current, f"{why}, but at max_replicas")
        if want <= current:
            return result(current, f"{why}; waiting for {current - signals.replicas} starting replica(s)")
        if since_change < config.scale_up_cooldown_s:
            return result(current, f"{why}; in scale-up cooldown")
        return result(min(want, current + config.max_step, config.max_replicas), why)

    if pressure < config.scale_down_at:
        why = f"{dominant} pressure {pressure:.2f} < {config.scale_down_at}"
        want = max(math.ceil(signals.replicas * pressure), config.min_replicas)
        if want >= current:
            return result(current, f"{why}, but already sized for it (or at min_replicas)")
        if since_change < config.scale_down_cooldown_s:
            return result(current, f"{why}; in scale-down cooldown")
        return result(max(want, current - config.max_step), why)

    band = f"[{config.scale_down_at}, {config.scale_up_at}]"
    return result(current, f"{dominant} pressure {pressure:.2f} within {band}")
