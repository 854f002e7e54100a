"""Whether handoffs should go through the KV broker right now (centralized mode).

Two signals: ``reachable``, the broker monitor's (it answers pings), and a back-off window
(``scheduler.backoff``): a handoff through the broker that fails on the KV plane opens it for
``backoff_s``, doubling while failures repeat (up to ``max_backoff_s``); meanwhile handoffs go peer to
peer. Once the time is up the next request tries the broker again, and a handoff through it that
succeeds resets the doubling.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from scheduler.backoff import Backoff

log = logging.getLogger("pdorch.flow")


class BrokerHealth:
    def __init__(
        self, backoff_s: float, max_backoff_s: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._backoff_s = backoff_s
        self._max_backoff_s = max_backoff_s
        self._clock = clock
        self.window = Backoff()
        self.reachable: Callable[[], bool] = lambda: True

    def usable(self) -> bool:
        return self.reachable() and not self.window.open(self._clock())

    def failed(self, why: str, began_at: float) -> None:
        """A handoff through the broker that began at ``began_at`` failed on the KV plane."""
        seconds = self.window.failed(self._clock(), began_at, self._backoff_s, self._max_backoff_s)
        if seconds is not None:
            log.warning("KV broker handoff failed (%s): peer-to-peer handoffs for %.1fs", why, seconds)

    def succeeded(self) -> None:
        self.window.succeeded()
