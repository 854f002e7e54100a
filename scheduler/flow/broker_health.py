"""Whether handoffs should go through the KV broker right now (centralized mode).

Two signals: ``reachable``, the broker monitor's (it answers pings), and a circuit breaker: a
handoff through the broker that fails on the KV plane opens it for ``backoff_s``, doubling while
failures repeat (up to ``max_backoff_s``); meanwhile handoffs go peer to peer. Once the time is up
the next request tries the broker again, and a handoff through it that succeeds resets the
back-off. A failure of a handoff that began before the breaker last opened is not counted again
(the handoffs caught in one outage fail together).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger("pdorch.flow")


class BrokerHealth:
    def __init__(
        self, backoff_s: float, max_backoff_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._backoff_s = backoff_s
        self._max_backoff_s = max(backoff_s, max_backoff_s)
        self._clock = clock
        self._next_s = backoff_s
        self._opened_at = -float("inf")
        self._until = 0.0
        self.failures = 0
        self.reachable: Callable[[], bool] = lambda: True

    def usable(self) -> bool:
        return self.reachable() and self._clock() >= self._until

    def failed(self, why: str, began_at: float) -> None:
        """A handoff through the broker that began at ``began_at`` failed on the KV plane."""
        if began_at <= self._opened_at:
            return
        self.failures += 1
        self._opened_at = self._clock()
        self._until = self._opened_at + self._next_s
        log.warning("KV broker handoff failed (%s): peer-to-peer handoffs for %.1fs", why, self._next_s)
        self._next_s = min(self._next_s * 2, self._max_backoff_s)

    def succeeded(self) -> None:
        self._next_s = self._backoff_s
