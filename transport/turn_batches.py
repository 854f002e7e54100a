"""Messages for a peer gathered during one turn of the event loop and sent together at its end.

Both ends of the control plane send job messages this way (an agent its tokens and outcomes, the
scheduler its jobs and cancels): under load one turn makes several for the same peer, and one
message in their place saves, for each, a send, a receive and the wake-ups of both ends' ZeroMQ
I/O threads. Nothing waits past the end of the turn in which it was made.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
M = TypeVar("M")


class TurnBatches(Generic[K, M]):
    def __init__(self, send: Callable[[K, list[M]], None], max_batch: int) -> None:
        """``send(peer, batch)`` gets each peer's messages in the order added, at most ``max_batch``
        at a time (a peer drops a longer batch as malformed)."""
        self._send = send
        self._max = max_batch
        self._pending: dict[K, list[M]] = {}

    def add(self, peer: K, msg: M) -> None:
        batch = self._pending.get(peer)
        if batch is not None:
            batch.append(msg)
            return
        if not self._pending:
            asyncio.get_running_loop().call_soon(self.flush_all)
        self._pending[peer] = [msg]

    def flush(self, peer: K) -> None:
        """Send what waits for ``peer`` now: before a message that must follow it."""
        batch = self._pending.pop(peer, None)
        if batch is None:
            return
        for start in range(0, len(batch), self._max):
            self._send(peer, batch[start : start + self._max])

    def flush_all(self) -> None:
        for peer in list(self._pending):
            self.flush(peer)

    def discard(self) -> None:
        """Forget what waits (its peers are gone)."""
        self._pending.clear()
