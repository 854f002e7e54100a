"""Telling, while a transfer is received, that its KV is arriving (for whoever judges it stalled).

A transfer's deadline bounds it whole; the scheduler also takes a handoff for stalled when nothing
about it is heard for a while. Over a slow link a large transfer can take longer than that and
still be moving: a receiver given ``on_arriving`` calls it at most every :data:`ARRIVING_EVERY_S`
while chunks keep coming, so a moving transfer is never taken for a stalled one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

ARRIVING_EVERY_S = 1.0


class ArrivalWatch:
    def __init__(self, chunks: Callable[[], int], on_arriving: Callable[[], None]) -> None:
        """``chunks``: how many chunks have arrived so far (read on the event loop; it may be
        counted on another thread)."""
        self._chunks = chunks
        self._on_arriving = on_arriving
        self._seen = 0
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(ARRIVING_EVERY_S, self._look)

    def _look(self) -> None:
        seen = self._chunks()
        if seen > self._seen:
            self._seen = seen
            self._on_arriving()
        self._timer = self._loop.call_later(ARRIVING_EVERY_S, self._look)

    def cancel(self) -> None:
        self._timer.cancel()
