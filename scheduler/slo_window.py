"""The scheduler's measured SLO attainment: the share of recently finished requests that met targets.

Each finished request is judged once, where the HTTP layer finishes it: its time to first token
(arrival to first token, admission wait included) against ``slo.ttft_s``, its time per output token
(mean gap after the first) against ``slo.tpot_s``. A request refused or timed out for lack of
capacity before its first token counts as a TTFT miss: an overloaded scheduler must not look healthy
because it turned its slowest requests away.

Counts are kept in one-second buckets over the last ``window_s`` seconds (bounded memory at any
rate). Below ``min_requests`` judged requests the attainment is unknown (None), so a quiet minute
with one slow request does not steer the autoscaler.
"""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from collections.abc import Callable

import msgspec


class SloConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Time to first token a request should get, in seconds (0 = not measured).
    ttft_s: float = 0.0
    # Mean time per output token after the first, in seconds (0 = not measured).
    tpot_s: float = 0.0
    # Attainment covers the requests finished in the last this many seconds...
    window_s: float = 60.0
    # ... and is known only once at least this many of them were judged.
    min_requests: int = 20


class SloPhase(enum.StrEnum):
    TTFT = "ttft"  # queueing for and computing the first token
    TPOT = "tpot"  # the KV handoff and every later token


# Each pool answers for the latency it produces: prefill for the first token, decode for the rest.
POOL_PHASE = {"prefill": SloPhase.TTFT, "decode": SloPhase.TPOT}


def target_key(phase: SloPhase) -> str:
    """The config key of a phase's target (``ttft_s``, ``tpot_s``)."""
    return f"{phase}_s"


class _Bucket:
    __slots__ = ("judged", "met", "second")

    def __init__(self, second: int) -> None:
        self.second = second
        self.judged = {SloPhase.TTFT: 0, SloPhase.TPOT: 0}
        self.met = {SloPhase.TTFT: 0, SloPhase.TPOT: 0}


class SloWindow:
    def __init__(self, config: SloConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._targets = {phase: float(getattr(config, target_key(phase))) for phase in SloPhase}
        self._buckets: deque[_Bucket] = deque()

    def record(self, ttft_s: float | None, tpot_s: float | None) -> None:
        """One finished request: what was measured of it (None = not measured; inf = never came)."""
        if not any(self._targets.values()):
            return
        second = math.floor(self._clock())
        self._expire(second)
        if not self._buckets or self._buckets[-1].second != second:
            self._buckets.append(_Bucket(second))
        bucket = self._buckets[-1]
        for phase, value in ((SloPhase.TTFT, ttft_s), (SloPhase.TPOT, tpot_s)):
            target = self._targets[phase]
            if target > 0 and value is not None:
                bucket.judged[phase] += 1
                bucket.met[phase] += value <= target

    def attainment(self, phase: SloPhase) -> float | None:
        """Share of the window's judged requests that met the ``phase`` target; None if too few."""
        self._expire(math.floor(self._clock()))
        judged = sum(b.judged[phase] for b in self._buckets)
        if judged == 0 or judged < self._config.min_requests:
            return None
        return sum(b.met[phase] for b in self._buckets) / judged

    def _expire(self, second: int) -> None:
        oldest = second - self._config.window_s
        while self._buckets and self._buckets[0].second <= oldest:
            self._buckets.popleft()
