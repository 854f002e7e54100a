"""The scheduler's measured SLO attainment: a rolling window of finished requests judged per phase."""

from __future__ import annotations

import math

import pytest

from scheduler.slo_window import SloConfig, SloPhase, SloWindow

TTFT, TPOT = SloPhase.TTFT, SloPhase.TPOT


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def window(clock: Clock, **config: float) -> SloWindow:
    settings = {"ttft_s": 1.0, "tpot_s": 0.1, "window_s": 60.0, "min_requests": 4, **config}
    return SloWindow(SloConfig(**settings), clock)  # type: ignore[arg-type]


def test_each_phase_is_judged_against_its_own_target() -> None:
    clock = Clock()
    w = window(clock)
    for ttft, tpot in ((0.5, 0.05), (0.9, 0.2), (2.0, 0.05), (0.1, 0.1)):
        w.record(ttft, tpot)
        clock.now += 1
    assert w.attainment(TTFT) == pytest.approx(3 / 4)
    assert w.attainment(TPOT) == pytest.approx(3 / 4)  # 0.1 meets a 0.1 target


def test_unknown_until_enough_requests_were_judged() -> None:
    w = window(Clock())
    for _ in range(3):
        w.record(5.0, None)  # one-token answers: no TPOT measured
    assert w.attainment(TTFT) is None
    w.record(5.0, None)
    assert w.attainment(TTFT) == 0.0
    assert w.attainment(TPOT) is None


def test_old_requests_age_out_of_the_window() -> None:
    clock = Clock()
    w = window(clock)
    for _ in range(4):
        w.record(5.0, 1.0)  # all missed
    clock.now += 30
    for _ in range(4):
        w.record(0.2, 0.01)  # all met
    assert w.attainment(TTFT) == 0.5
    clock.now += 31  # the misses are now more than 60 s old
    assert w.attainment(TTFT) == 1.0 and w.attainment(TPOT) == 1.0
    clock.now += 60
    assert w.attainment(TTFT) is None


def test_a_request_that_never_got_a_first_token_is_a_ttft_miss() -> None:
    w = window(Clock(), min_requests=1)
    w.record(math.inf, None)
    assert w.attainment(TTFT) == 0.0 and w.attainment(TPOT) is None


def test_a_phase_without_a_target_is_not_measured() -> None:
    w = window(Clock(), tpot_s=0.0, min_requests=1)
    w.record(0.5, 9.0)
    assert w.attainment(TTFT) == 1.0 and w.attainment(TPOT) is None
    silent = window(Clock(), ttft_s=0.0, tpot_s=0.0, min_requests=1)
    silent.record(0.5, 0.01)
    assert silent.attainment(TTFT) is None and silent.attainment(TPOT) is None


def test_memory_is_bounded_by_the_window_not_the_rate() -> None:
    clock = Clock()
    w = window(clock, window_s=10.0)
    for i in range(10_000):
        clock.now = 1000.0 + i / 100  # 100 requests a second for 100 s
        w.record(0.5, 0.05)
    assert len(w._buckets) <= 11
    assert w.attainment(TTFT) == 1.0
