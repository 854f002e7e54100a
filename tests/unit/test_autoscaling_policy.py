"""The autoscaler's pure decision, table-driven: signals + current + state + config -> decision."""

from __future__ import annotations

import pytest

from scheduler.kubernetes.config import PoolAutoscalingConfig
from scheduler.kubernetes.scaling_policy import Direction, PoolScalingState, decide, pressures
from scheduler.kubernetes.signals import PoolSignals

CONFIG = PoolAutoscalingConfig(
    min_replicas=1,
    max_replicas=8,
    max_step=2,
    scale_up_cooldown_s=60,
    scale_down_cooldown_s=300,
    scale_up_at=1.2,
    scale_down_at=0.5,
    target_queued_per_replica=4,
    target_kv_occupancy=0.8,
    target_inflight_per_replica=10,
    target_tokens_per_replica=10_000,
    min_slo_attainment=0.9,
)
NOW = 10_000.0
FRESH = PoolScalingState()
RECENT = PoolScalingState(last_change_at=NOW - 30)  # inside both cooldowns
OLDER = PoolScalingState(last_change_at=NOW - 120)  # past scale-up's, inside scale-down's
OLD = PoolScalingState(last_change_at=NOW - 1000)  # past both


def sig(replicas: int, **kw: object) -> PoolSignals:
    return PoolSignals(pool="decode", replicas=replicas, **kw)  # type: ignore[arg-type]


CASES = [
    # (id, signals, current, state, desired, reason fragment, dominant)
    ("idle at min holds", sig(1), 1, OLD, 1, "min_replicas", "queue"),
    (
        "queue pressure 2.0 grows by max_step",
        sig(2, queued_requests=16),
        2,
        FRESH,
        4,
        "queue pressure 2.00",
        "queue",
    ),
    (
        "growth to ceil(serving x pressure)",
        sig(4, queued_requests=20),
        4,
        FRESH,
        5,
        "queue pressure 1.25",
        "queue",
    ),
    (
        "kv occupancy drives growth",
        sig(2, kv_occupancy=1.0),
        2,
        FRESH,
        3,
        "kv_occupancy pressure 1.25",
        "kv_occupancy",
    ),
    (
        "inflight drives growth",
        sig(2, inflight_requests=30),
        2,
        FRESH,
        3,
        "inflight pressure 1.50",
        "inflight",
    ),
    (
        "predicted tokens drive growth",
        sig(2, predicted_tokens=50_000),
        2,
        FRESH,
        4,
        "predicted_tokens pressure 2.50",
        "predicted_tokens",
    ),
    (
        "the largest pressure wins",
        sig(2, queued_requests=10, kv_occupancy=0.96),
        2,
        FRESH,
        3,
        "queue",
        "queue",
    ),
    ("growth capped at max_replicas", sig(7, queued_requests=100), 7, FRESH, 8, "queue pressure", "queue"),
    ("at max_replicas holds", sig(8, queued_requests=100), 8, FRESH, 8, "at max_replicas", "queue"),
    ("scale-up cooldown holds", sig(2, queued_requests=16), 2, RECENT, 2, "scale-up cooldown", "queue"),
    (
        "scale-up allowed after its cooldown",
        sig(2, queued_requests=16),
        2,
        OLDER,
        4,
        "queue pressure",
        "queue",
    ),
    (
        "replicas still starting: no pile-on",
        sig(2, queued_requests=12),
        4,
        FRESH,
        4,
        "waiting for 2 starting",
        "queue",
    ),
    (
        "SLO breach grows by one",
        sig(2, kv_occupancy=0.4, slo_attainment=0.7),
        2,
        FRESH,
        3,
        "SLO attainment 0.70",
        "kv_occupancy",
    ),
    ("SLO breach blocks scale-down", sig(4, slo_attainment=0.5), 4, OLD, 5, "SLO attainment", "queue"),
    (
        "SLO met: no effect",
        sig(2, kv_occupancy=0.6, slo_attainment=0.95),
        2,
        FRESH,
        2,
        "within",
        "kv_occupancy",
    ),
    (
        "unknown SLO is ignored",
        sig(2, kv_occupancy=0.6, slo_attainment=None),
        2,
        FRESH,
        2,
        "within",
        "kv_occupancy",
    ),
    (
        "hysteresis: just under scale_up_at holds",
        sig(2, kv_occupancy=0.95),
        2,
        FRESH,
        2,
        "within",
        "kv_occupancy",
    ),
    (
        "hysteresis: just over scale_down_at holds",
        sig(4, queued_requests=9, kv_occupancy=0.1),
        4,
        OLD,
        4,
        "within",
        "queue",
    ),
    (
        "low load shrinks by max_step",
        sig(6, queued_requests=2, kv_occupancy=0.1),
        6,
        OLD,
        4,
        "pressure 0.12 < 0.5",
        "kv_occupancy",
    ),
    (
        "shrink to ceil(serving x pressure)",
        sig(4, kv_occupancy=0.32),
        4,
        OLD,
        2,
        "kv_occupancy pressure 0.40",
        "kv_occupancy",
    ),
    ("shrink never below min_replicas", sig(3), 3, OLD, 1, "pressure 0.00", "queue"),
    (
        "scale-down cooldown holds",
        sig(4, kv_occupancy=0.1),
        4,
        OLDER,
        4,
        "scale-down cooldown",
        "kv_occupancy",
    ),
    # More workers serving than the LWS wants (old pods still leaving): 5 x 0.45 needs 3 = current.
    ("low but already sized for it", sig(5, kv_occupancy=0.36), 3, OLD, 3, "already sized", "kv_occupancy"),
    ("below min_replicas: to min at once", sig(0), 0, RECENT, 1, "below min_replicas", ""),
    (
        "above max_replicas: to max at once",
        sig(10, queued_requests=500),
        10,
        RECENT,
        8,
        "above max_replicas",
        "",
    ),
    ("nothing serving yet: hold", sig(0, queued_requests=50), 2, FRESH, 2, "no serving replica", ""),
]


@pytest.mark.parametrize(
    ("signals", "current", "state", "desired", "reason", "dominant"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_decide(
    signals: PoolSignals, current: int, state: PoolScalingState, desired: int, reason: str, dominant: str
) -> None:
    decision = decide(signals, current, state, CONFIG, NOW)
    assert (decision.current, decision.desired) == (current, desired)
    assert reason in decision.reason
    assert decision.dominant == dominant
    expected_direction = (
        Direction.UP if desired > current else Direction.DOWN if desired < current else Direction.HOLD
    )
    assert decision.direction is expected_direction


def test_disabled_signals_are_not_measured() -> None:
    only_kv = PoolAutoscalingConfig(target_queued_per_replica=0, target_kv_occupancy=0.5)
    assert pressures(sig(2, queued_requests=1000, kv_occupancy=0.25), only_kv) == {"kv_occupancy": 0.5}


def test_kv_occupancy_is_clamped() -> None:
    assert pressures(sig(1, kv_occupancy=7.0), CONFIG)["kv_occupancy"] == pytest.approx(1.25)


@pytest.mark.parametrize("replicas", range(1, 9))
@pytest.mark.parametrize("pressure_pct", range(0, 400, 7))
def test_no_flapping(replicas: int, pressure_pct: int) -> None:
    """After any change, the same total load measured on the new size never triggers the opposite change."""
    config = PoolAutoscalingConfig(
        min_replicas=1, max_replicas=8, max_step=8, scale_up_cooldown_s=0, scale_down_cooldown_s=0,
        target_queued_per_replica=10, target_kv_occupancy=0,
    )  # fmt: skip
    queued = replicas * 10 * pressure_pct // 100
    first = decide(sig(replicas, queued_requests=queued), replicas, FRESH, config, NOW)
    if first.direction is Direction.HOLD:
        return
    size = first.desired
    second = decide(sig(size, queued_requests=queued), size, FRESH, config, NOW)
    opposite = Direction.DOWN if first.direction is Direction.UP else Direction.UP
    assert second.direction is not opposite, (first, second)
