"""Credit-based flow control (zguide chapter 7, "credit-based flow control").

The receiver grants credit in bytes of row payload: a first grant in ``KvAccept`` (its window),
then a ``KvCredit`` each time it has consumed (verified and written to its sink) a quarter of the
window. A sender puts a chunk on the wire only when it holds credit for all of its bytes, so the
bytes in flight to (or queued unread at) the receiver never exceed the window, however slow the
receiver is. Chunks are at most half the window, so a withheld partial re-grant (below a quarter)
can never starve a sender waiting for one chunk.
"""

from __future__ import annotations

import asyncio

from transport.errors import PdorchError

REGRANT_FRACTION = 4  # re-grant once a quarter of the window was consumed


class SendCredit:
    """Sender side: how many bytes may still be put in flight; waits for more."""

    def __init__(self, cap_bytes: int) -> None:
        self._cap = cap_bytes  # the sender's own bound, on top of the receiver's credit
        self._available = 0
        self._first_grant = 0
        self._granted_total = 0
        self._taken_total = 0
        self._changed = asyncio.Event()
        self._error: PdorchError | None = None
        self.peak_in_flight = 0

    @property
    def in_flight(self) -> int:
        """Bytes sent that the receiver has not yet given back as credit."""
        return self._taken_total - (self._granted_total - self._first_grant)

    @property
    def window(self) -> int:
        return self._first_grant

    def grant(self, nbytes: int) -> None:
        if self._granted_total == 0:
            self._first_grant = nbytes
        self._granted_total += nbytes
        self._available += nbytes
        self._changed.set()

    def fail(self, error: PdorchError) -> None:
        """Wake every waiter with ``error``: the transfer is over."""
        self._error = error
        self._changed.set()

    def _fits(self, nbytes: int) -> bool:
        in_flight = self.in_flight
        return self._available >= nbytes and (in_flight == 0 or in_flight + nbytes <= self._cap)

    async def take(self, nbytes: int) -> None:
        """Wait until ``nbytes`` may be put in flight; a waiter is released by a grant or by
        :meth:`fail` (the transfer's deadline fails it too)."""
        while True:
            if self._error is not None:
                raise self._error
            if self._fits(nbytes):
                self._available -= nbytes
                self._taken_total += nbytes
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                return
            self._changed.clear()
            await self._changed.wait()


class ReceiveWindow:
    """Receiver side: the credit outstanding at the sender, and what to give back when."""

    def __init__(self, window_bytes: int) -> None:
        self.window = window_bytes
        self._outstanding = 0  # granted, not yet arrived
        self._consumed_not_regranted = 0
        self._threshold = max(1, window_bytes // REGRANT_FRACTION)

    def first_grant(self) -> int:
        self._outstanding = self.window
        return self.window

    def on_arrival(self, nbytes: int) -> bool:
        """Account an arriving chunk; False if the sender overran its credit (a protocol violation)."""
        if nbytes > self._outstanding:
            return False
        self._outstanding -= nbytes
        return True

    def on_consumed(self, nbytes: int) -> int:
        """Account consumed bytes; returns the credit to grant now (0: not yet worth a message)."""
        self._consumed_not_regranted += nbytes
        if self._consumed_not_regranted < self._threshold:
            return 0
        grant, self._consumed_not_regranted = self._consumed_not_regranted, 0
        self._outstanding += grant
        return grant
