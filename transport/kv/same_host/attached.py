"""The sender's mappings of receivers' rings, kept between transfers.

Mapping a ring costs a page-table entry per page (about as much as copying the ring once), so a
sender keeps a ring mapped after a successful transfer: the receiver lends it again to this
connection, sealed (no process can open it any more, the two mappings are all that reach it). A
ring whose transfer failed is unmapped at once (the receiver closes it too, and a dead
receiver's pages are freed with the last mapping); rings unused for ``idle_s``, or beyond
``max_idle``, are unmapped when the sender next opens or closes a transfer. Event-loop owned.
"""

from __future__ import annotations

import time

from transport.kv.messages import KvShmRing
from transport.kv.same_host.ring import Closing, Ring

_Key = tuple[int, int]


def _key(offer: KvShmRing) -> _Key:
    # Not the fd: a ring offered again after it was sealed names none.
    return offer.pid, offer.inode


class AttachedRings:
    def __init__(self, *, idle_s: float = 60.0, max_idle: int = 64) -> None:
        """Kept longer than a receiver keeps an idle ring (30 s): a ring it lends again (sealed, so
        reachable through this mapping only) is still mapped here."""
        self._idle_s = idle_s
        self._max_idle = max_idle
        self._idle: dict[_Key, tuple[Ring, float]] = {}  # oldest first
        # Ring -> how many of this sender's transfers hold it (more than one only briefly: see take).
        self._in_use: dict[_Key, tuple[Ring, int]] = {}
        self._closing = Closing()
        self.fell_back = False  # a ring could not be mapped once (logged then)

    @property
    def mapped(self) -> int:
        return len(self._idle) + len(self._in_use) + len(self._closing)

    def take(self, offer: KvShmRing) -> Ring:
        """The ring ``offer`` names, mapped; raises PdorchError if it cannot be."""
        self._evict(time.monotonic())
        key = _key(offer)
        shape = (offer.slots, offer.slot_bytes)
        busy = self._in_use.get(key)
        if busy is not None and (busy[0].slots, busy[0].slot_bytes) == shape:
            # The receiver lends a ring again only once the transfer that had it is over, but that
            # transfer's stream may not have let go of it yet (the ack is on its way): the new
            # transfer writes into the same mapping.
            self._in_use[key] = (busy[0], busy[1] + 1)
            return busy[0]
        held = self._idle.pop(key, None)
        if held is not None and (held[0].slots, held[0].slot_bytes) == shape:
            ring = held[0]
        else:
            if held is not None:
                self._closing.close(held[0])
            if busy is not None:  # another ring under the same name: the old one is stale
                del self._in_use[key]
                self._closing.close(busy[0])
            ring = Ring.attach(offer)
        self._in_use[key] = (ring, 1)
        return ring

    def release(self, ring: Ring, *, ok: bool) -> None:
        key = _key(ring.offer)
        busy = self._in_use.get(key)
        if busy is not None and busy[0] is ring:
            if busy[1] > 1:  # a later transfer writes into it now: it decides what becomes of it
                self._in_use[key] = (ring, busy[1] - 1)
                return
            del self._in_use[key]
        if ok and not ring.closed:
            self._idle[key] = (ring, time.monotonic())
        else:
            self._closing.close(ring)
        self._evict(time.monotonic())

    def _evict(self, now: float) -> None:
        self._closing.retry()
        for key, (ring, since) in list(self._idle.items()):
            if len(self._idle) > self._max_idle or now - since > self._idle_s:
                del self._idle[key]
                self._closing.close(ring)

    def close(self) -> None:
        for ring, _ in self._idle.values():
            self._closing.close(ring)
        for ring, _ in self._in_use.values():
            self._closing.close(ring)
        self._idle.clear()
        self._in_use.clear()
        self._closing.retry()
