"""Whether handoffs should go through the KV broker right now (centralized mode).

A circuit breaker: a handoff through the broker that fails on the KV plane (the broker died,
restarted empty, or cannot be reached) opens it for ``backoff_s``, doubling while failures repeat
(up to ``max_backoff_s``); meanwhile handoffs go peer to peer. Once the time is up the next
request tries the broker again, and a handoff through it that succeeds closes the breaker.
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
        self._until = 0.0
        self.failures = 0

    def usable(self) -> bool:
        return self._clock() >= self._until

    def failed(self, why: str) -> None:
        if not self.usable():
            return  # already open: handoffs that were under way when it opened fail too
        self.failures += 1
        self._until = self._clock() + self._next_s
        log.warning("KV broker handoff failed (%s): peer-to-peer handoffs for %.1fs", why, self._next_s)
        self._next_s = min(self._next_s * 2, self._max_backoff_s)

    def succeeded(self) -> None:
        self._next_s = self._backoff_s
