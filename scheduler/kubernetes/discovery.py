"""Pod discovery: keep the scheduler's worker registry in step with the pools' pods.

One :class:`~scheduler.kubernetes.pod_watcher.PodWatcher` thread per pool lists and watches the
pool's pods by label; its updates are handed to the event loop, applied to a
:class:`~scheduler.kubernetes.pool_membership.PoolMembership`, and the changes become calls on
the :class:`~scheduler.kubernetes.directory.WorkerDirectory`:

- pod deleted (or missing on a re-list) -> ``drop_worker`` at once;
- pod marked for deletion -> ``set_draining`` at once, then ``drop_worker`` as soon as it has no
  request in flight, or when its grace period ends (with ``drain_terminating: false``: at once);
- group incomplete (a member pod missing or terminating) -> its leader drains until it is whole;
- the set of live leaders changes -> ``set_expected(pool, leaders)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable

from kubernetes import client

from scheduler.kubernetes.config import KubernetesConfig
from scheduler.kubernetes.directory import WorkerDirectory
from scheduler.kubernetes.drain_reasons import GROUP_INCOMPLETE, POD_TERMINATING, DrainReasons
from scheduler.kubernetes.pod_watcher import PodEvent, PodWatcher, Relisted, WatchUpdate
from scheduler.kubernetes.pool_membership import PoolMembership
from transport.liveness import Backoff

log = logging.getLogger(__name__)


class PodDiscovery:
    def __init__(
        self,
        config: KubernetesConfig,
        core: client.CoreV1Api,
        directory: WorkerDirectory,
        *,
        namespace: str,
        drains: DrainReasons | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._core = core
        self._directory = directory
        self._namespace = namespace
        self._drains = drains if drains is not None else DrainReasons(directory)
        # Wall clock: deletion deadlines come from the API server as timestamps.
        self._clock = clock
        self._members = {pool: PoolMembership() for pool in config.pools()}
        self._expected: dict[str, set[str] | None] = {pool: None for pool in config.pools()}
        self._incomplete: dict[str, set[str]] = {pool: set() for pool in config.pools()}
        # Terminating leaders not dropped yet -> the time their pod will be killed.
        self._terminating: dict[str, float] = {}
        self._watchers: dict[str, PodWatcher] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick_task: asyncio.Task[None] | None = None

    @property
    def watchers(self) -> dict[str, PodWatcher]:
        return dict(self._watchers)

    def expected(self, pool: str) -> set[str]:
        return set(self._expected.get(pool) or ())

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        d = self._config.discovery
        for pool, cfg in self._config.pools().items():
            watcher = PodWatcher(
                self._core,
                self._namespace,
                cfg.label_selector(),
                functools.partial(self._from_thread, pool),
                watch_timeout_s=d.watch_timeout_s,
                request_timeout_s=d.request_timeout_s,
                backoff=Backoff(d.backoff_initial_s, d.backoff_max_s),
                name=pool,
            )
            self._watchers[pool] = watcher
            watcher.start()
        self._tick_task = asyncio.create_task(self._tick_loop(), name="pdorch-discovery-tick")

    async def stop(self) -> None:
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
            self._tick_task = None
        for watcher in self._watchers.values():
            watcher.stop()
        # A list call in progress cannot be interrupted, but it is bounded by its request timeout.
        bound = self._config.discovery.request_timeout_s + 1.0
        for pool, watcher in self._watchers.items():
            if not await asyncio.to_thread(watcher.join, bound):
                log.warning("pod watcher for %s did not stop within %.0fs (daemon thread)", pool, bound)
        self._watchers.clear()

    async def run(self) -> None:
        """Run until cancelled (for a background task)."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self.stop())

    # ------------------------------------------------------------------ updates (event loop)

    def _from_thread(self, pool: str, update: WatchUpdate) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closing: nothing left to update
            loop.call_soon_threadsafe(self._apply_logged, pool, update)

    def _apply_logged(self, pool: str, update: WatchUpdate) -> None:
        try:
            self.apply(pool, update)
        except Exception:  # the directory is the scheduler's code: never let it stop discovery
            log.exception("applying a %s pod update failed", pool)

    def apply(self, pool: str, update: WatchUpdate) -> None:
        """Apply one watcher update (on the event loop)."""
        members = self._members[pool]
        if isinstance(update, Relisted):
            change = members.relist(update.pods)
        elif isinstance(update, PodEvent):
            change = members.apply(update.event, update.pod)
        else:  # pragma: no cover - the union has two members
            return
        for worker_id in change.replaced:
            # The id now names a new pod: whatever was held for the old one must not stick to it.
            self._drains.clear(worker_id)
            self._forget(worker_id)
            log.info("%s worker %s: its pod was replaced by a new one", pool, worker_id)
        for worker_id, reason in change.dropped:
            self._drop_gone(worker_id, reason)
        for worker_id, deadline in change.terminating:
            if self._config.discovery.drain_terminating:
                self._drains.hold(worker_id, POD_TERMINATING)
                self._terminating[worker_id] = deadline
                log.info("%s worker %s is terminating: draining", pool, worker_id)
            else:
                self._directory.drop_worker(worker_id, "pod terminating")
        self._sync_incomplete(pool, members.incomplete_group_leaders())
        expected = members.expected()
        if expected != self._expected[pool]:
            self._expected[pool] = expected
            self._directory.set_expected(pool, set(expected))

    def _drop_gone(self, worker_id: str, reason: str) -> None:
        self._forget(worker_id)
        log.info("worker %s dropped: %s", worker_id, reason)
        self._directory.drop_worker(worker_id, reason)

    def _forget(self, worker_id: str) -> None:
        """Clear what discovery held about a pod that no longer exists."""
        self._terminating.pop(worker_id, None)
        self._drains.forget(worker_id)
        for held in self._incomplete.values():
            held.discard(worker_id)

    def _sync_incomplete(self, pool: str, incomplete: set[str]) -> None:
        held = self._incomplete[pool]
        for worker_id in incomplete - held:
            self._drains.hold(worker_id, GROUP_INCOMPLETE)
        for worker_id in held - incomplete:
            self._drains.release(worker_id, GROUP_INCOMPLETE)
        self._incomplete[pool] = set(incomplete)

    # ------------------------------------------------------------------ periodic

    def tick(self) -> None:
        """Drop terminating workers that are idle or out of time; re-assert drain marks."""
        now = self._clock()
        for worker_id, deadline in list(self._terminating.items()):
            idle = self._directory.inflight(worker_id) == 0
            if idle or now >= deadline:
                del self._terminating[worker_id]
                # The drain mark stays until the pod is gone: if the agent says Hello again
                # before its container stops, it must still get no work.
                why = "idle" if idle else "grace period over"
                self._directory.drop_worker(worker_id, f"pod terminating ({why})")
        self._drains.reassert()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self._config.discovery.tick_s)
            try:
                self.tick()
            except Exception:  # the directory is the scheduler's; never let it kill discovery
                log.exception("discovery tick failed")
