"""Keeps a local cluster whole: a child process that dies is started again, with back-off.

The scheduler moves the dead worker's requests to the others meanwhile; the restarted worker
registers again and takes new work. A child that keeps dying right after it starts is restarted
less and less often (``initial_s`` doubling up to ``max_s``); one that stayed up for ``stable_s``
starts from ``initial_s`` again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger("pdorch.up")


class Process(Protocol):
    returncode: int | None

    def poll(self) -> int | None: ...


@dataclass
class _Child:
    started_at: float
    delay_s: float
    restart_at: float | None = None  # set while it is dead and waiting for its restart
    restarts: int = 0


class Supervisor:
    def __init__(
        self,
        restart: Callable[[str], None],
        *,
        initial_s: float = 0.5,
        max_s: float = 30.0,
        stable_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        say: Callable[[str], None] = log.warning,
    ) -> None:
        self._restart = restart
        self._initial_s = initial_s
        self._max_s = max_s
        self._stable_s = stable_s
        self._clock = clock
        self._say = say
        self._children: dict[str, _Child] = {}

    def restarts(self, name: str) -> int:
        child = self._children.get(name)
        return child.restarts if child else 0

    def check(self, procs: Mapping[str, Process]) -> None:
        """Notice children that died; restart those whose back-off is over. Call it often."""
        now = self._clock()
        for name, proc in list(procs.items()):
            child = self._children.get(name)
            if child is None:
                child = self._children[name] = _Child(now, self._initial_s)
            if proc.poll() is None:
                if child.restart_at is None and now - child.started_at >= self._stable_s:
                    child.delay_s = self._initial_s
                continue
            if child.restart_at is None:
                child.restart_at = now + child.delay_s
                self._say(f"{name} exited with {proc.returncode}; restarting it in {child.delay_s:.1f}s")
                continue
            if now >= child.restart_at:
                self._restart(name)
                child.restarts += 1
                child.started_at = now
                child.restart_at = None
                child.delay_s = min(child.delay_s * 2, self._max_s)
