"""A back-off window: after a path fails, leave it alone for a while, longer while failures repeat.

One mechanism for every path the scheduler backs off from: the KV broker (while its window is open,
centralized handoffs go peer to peer), each pair of workers whose p2p handoffs did not land, and
each worker whose own KV network is taken as down (``Ledger.kv_handoff_failed``). The window opens
for ``base_s`` and doubles with each further failure, up to ``max_s``. One outage is counted once: a
failure while the window is open, or of an attempt that began before it last opened (the attempts
caught in one outage fail together, some only after the window has closed), does not lengthen it. A
success resets the doubling but leaves an open window open: a path that fails and succeeds by turns
stays out until it has had its time.
"""

from __future__ import annotations


class Backoff:
    def __init__(self) -> None:
        self.failures = 0  # outages in a row, each counted once (0 after a success)
        self._opened_at = -float("inf")
        self._until = -float("inf")

    def open(self, now: float) -> bool:
        """Whether the path is being left alone now."""
        return now < self._until

    def failed(self, now: float, began_at: float, base_s: float, max_s: float) -> float | None:
        """An attempt begun at ``began_at`` failed on this path: the seconds the window now opens
        for, or None if the failure is part of the outage already counted."""
        if now < self._until or began_at <= self._opened_at:
            return None
        self.failures += 1
        seconds = min(max(base_s, max_s), base_s * 2 ** (self.failures - 1))
        self._opened_at, self._until = now, now + seconds
        return seconds

    def succeeded(self) -> None:
        """An attempt on this path succeeded: the next failure starts from ``base_s`` again."""
        self.failures = 0
