"""The autoscaler: every interval, per pool, read the load, decide, and patch the LWS scale.

The decision is :func:`~scheduler.kubernetes.scaling_policy.decide` (pure); this class does the
I/O around it: read the LWS ``spec.replicas`` through the scale subresource, read the pool's
signals from the scheduler, and apply the decision. A scale-down first drains the groups that
LWS will remove (the highest group indices): their leaders get no new placements, and the patch
waits until they have no request in flight (bounded by ``drain_timeout_s``; past it, the pods'
own graceful termination still lets the agents finish). If the patch fails, the drain is undone.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from scheduler.kubernetes.config import KubernetesConfig, PoolConfig
from scheduler.kubernetes.directory import WorkerDirectory
from scheduler.kubernetes.drain_reasons import SCALE_DOWN, DrainReasons
from scheduler.kubernetes.lws_api import LwsScaleApi
from scheduler.kubernetes.scaling_policy import Direction, PoolScalingState, ScalingDecision, decide
from scheduler.kubernetes.signals import SignalSource

log = logging.getLogger(__name__)


def leader_id(lws_name: str, group_index: int) -> str:
    """LWS names a group's leader pod ``<lws>-<group index>``; the agent uses it as worker id."""
    return f"{lws_name}-{group_index}"


class Autoscaler:
    def __init__(
        self,
        config: KubernetesConfig,
        scale_api: LwsScaleApi,
        directory: WorkerDirectory,
        signals: SignalSource,
        *,
        drains: DrainReasons | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._config = config
        self._scale = scale_api
        self._directory = directory
        self._signals = signals
        self._drains = drains if drains is not None else DrainReasons(directory)
        self._clock = clock
        self._sleep = sleep
        self._states = {pool: PoolScalingState() for pool in config.pools()}
        # Leaders this autoscaler drained for a scale-down, per pool.
        self._scale_down_holds: dict[str, set[str]] = {pool: set() for pool in config.pools()}
        self._last: dict[str, ScalingDecision] = {}

    def last_decisions(self) -> dict[str, ScalingDecision]:
        """The latest decision per pool (for the cluster status endpoint and logs)."""
        return dict(self._last)

    async def run(self) -> None:
        """Evaluate every ``interval_s`` until cancelled. Returns at once when not enabled."""
        if not self._config.autoscaler.enabled:
            return
        while True:
            await self.step()
            await self._sleep(self._config.autoscaler.interval_s)

    async def step(self) -> dict[str, ScalingDecision]:
        """One evaluation of every pool. A failing pool is logged and retried next interval."""
        out: dict[str, ScalingDecision] = {}
        for pool, cfg in self._config.pools().items():
            try:
                out[pool] = await self._step_pool(pool, cfg)
            except Exception as e:
                log.warning("autoscaling %s failed: %s", pool, e)
        return out

    async def _step_pool(self, pool: str, cfg: PoolConfig) -> ScalingDecision:
        current = await asyncio.to_thread(self._scale.get_replicas, cfg.lws_name)
        self._release_stale_holds(pool, cfg, current)
        signals = self._signals(pool)
        decision = decide(signals, current, self._states[pool], cfg.autoscaling, self._clock())
        self._last[pool] = decision
        if decision.direction is Direction.HOLD:
            return decision
        log.info("scaling %s %d -> %d: %s", pool, decision.current, decision.desired, decision.reason)
        removed = [leader_id(cfg.lws_name, i) for i in range(decision.desired, decision.current)]
        if removed:
            await self._drain(pool, removed)
        try:
            await asyncio.to_thread(self._scale.set_replicas, cfg.lws_name, decision.desired)
        except Exception:
            for worker_id in removed:
                self._release(pool, worker_id)
            raise
        self._states[pool] = PoolScalingState(last_change_at=self._clock())
        return decision

    async def _drain(self, pool: str, worker_ids: list[str]) -> bool:
        """Stop placements on ``worker_ids`` and wait (bounded) until none has work in flight."""
        for worker_id in worker_ids:
            self._drains.hold(worker_id, SCALE_DOWN)
            self._scale_down_holds[pool].add(worker_id)
        a = self._config.autoscaler
        deadline = self._clock() + a.drain_timeout_s
        while True:
            busy = {w: n for w in worker_ids if (n := self._directory.inflight(w)) > 0}
            if not busy:
                return True
            left = deadline - self._clock()
            if left <= 0:
                log.warning("drain of %s timed out with requests in flight: %s", pool, busy)
                return False
            await self._sleep(min(a.drain_poll_s, left))

    def _release_stale_holds(self, pool: str, cfg: PoolConfig, current: int) -> None:
        # A group index below the current size is meant to exist (a scale-up brought it back, or
        # a scale-down was undone elsewhere): it must not stay drained.
        keep = {leader_id(cfg.lws_name, i) for i in range(current)}
        for worker_id in self._scale_down_holds[pool] & keep:
            self._release(pool, worker_id)

    def _release(self, pool: str, worker_id: str) -> None:
        self._scale_down_holds[pool].discard(worker_id)
        self._drains.release(worker_id, SCALE_DOWN)
