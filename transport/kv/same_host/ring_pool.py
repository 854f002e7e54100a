"""The receiver's rings: lent to one same-host transfer at a time, kept for its sender's next ones.

A ring whose transfer succeeded goes back to the pool under the sender connection's routing id
and is lent again only to that connection (so a sender never sees bytes another sender wrote);
one whose transfer failed is closed at once (its sender may still be writing into it). Rings idle
for ``idle_s``, or beyond ``max_idle``, are closed. Owned by one thread (the p2p endpoint's).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from transport.kv.same_host.ring import Closing, Ring, slot_bytes_for

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Idle:
    peer: bytes
    ring: Ring
    since: float


class RingPool:
    def __init__(
        self, *, slots: int, slot_bytes: int, window_bytes: int, idle_s: float, max_idle: int
    ) -> None:
        """Rings of ``slots`` slots of ``slot_bytes``, shrunk to fit in ``window_bytes`` (the bound on
        what one transfer may hold at the receiver, as on the socket path)."""
        self._slots = slots
        self._slot_bytes = max(1, min(slot_bytes, window_bytes // slots))
        self._idle_s = idle_s
        self._max_idle = max_idle
        self._idle: list[_Idle] = []  # oldest first
        self._lent: set[Ring] = set()
        self._closing = Closing()
        self._warned = False

    @property
    def open_rings(self) -> int:
        return len(self._idle) + len(self._lent) + len(self._closing)

    def lend(self, peer: bytes, row_bytes: int) -> Ring | None:
        """A ring for a transfer from ``peer`` with rows of ``row_bytes``; None if none can be made
        (the transfer then goes through the socket)."""
        for i, idle in enumerate(self._idle):
            if idle.peer == peer and idle.ring.slot_bytes >= row_bytes:
                del self._idle[i]
                self._lent.add(idle.ring)
                return idle.ring
        try:
            ring = Ring.create(self._slots, slot_bytes_for(self._slot_bytes, row_bytes))
        except OSError as e:
            if not self._warned:
                log.warning("cannot create a shared KV ring (%s); same-host transfers use TCP", e)
                self._warned = True
            return None
        self._lent.add(ring)
        return ring

    def give_back(self, peer: bytes, ring: Ring, *, reuse: bool) -> None:
        self._lent.discard(ring)
        if not reuse:
            self._closing.close(ring)
            return
        self._idle.append(_Idle(peer, ring, time.monotonic()))
        while len(self._idle) > self._max_idle:
            self._closing.close(self._idle.pop(0).ring)

    def retry_closing(self) -> None:
        """Unmap the rings whose last view is gone (a failing chunk's frame held one)."""
        if len(self._closing):
            self._closing.retry()

    def housekeeping(self, now: float) -> None:
        self._closing.retry()
        while self._idle and now - self._idle[0].since > self._idle_s:
            self._closing.close(self._idle.pop(0).ring)

    def close(self) -> None:
        for idle in self._idle:
            self._closing.close(idle.ring)
        for ring in self._lent:
            self._closing.close(ring)
        self._idle.clear()
        self._lent.clear()
        self._closing.retry()
