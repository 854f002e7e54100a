"""KV block accounting of the simulated engine: counts, not tensors, with a prefix cache.

A sequence holds *shared* blocks (full prompt blocks, reference-counted, keyed by the chained prefix
hash) and *private* blocks (the rest). A prompt's full blocks become shared as soon as their KV is
complete (:meth:`SimBlockPool.publish`), so a later prompt with the same prefix reuses them even
while the first request still runs, as vLLM's prefix caching does. Shared blocks nobody references
stay cached: least recently released first, evicted whenever an allocation needs the room. So
``used + cached + free == total`` at all times, as in the reference engine's ``Load``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from transport.errors import ErrorCode, PdorchError


class SimBlockPool:
    def __init__(self, total: int, *, enable_prefix_caching: bool = True) -> None:
        if total <= 0:
            raise PdorchError(ErrorCode.CONFIG, f"the KV pool needs at least one block, got {total}")
        self.total = total
        self._caching = enable_prefix_caching
        self._private = 0
        self._shared: dict[int, int] = {}  # hash -> references
        self._cached: OrderedDict[int, None] = OrderedDict()  # unreferenced, least recently used first

    @property
    def used(self) -> int:
        return self._private + len(self._shared)

    @property
    def cached(self) -> int:
        return len(self._cached)

    @property
    def free(self) -> int:
        return self.total - self.used - self.cached

    def cached_hashes(self) -> frozenset[int]:
        """Hashes of every block holding a prompt prefix (referenced or not)."""
        return frozenset(self._shared) | frozenset(self._cached)

    def acquire_prefix(self, hashes: Sequence[int]) -> list[int]:
        """Take a reference on the longest leading run of ``hashes`` that is cached; return it."""
        taken: list[int] = []
        if not self._caching:
            return taken
        for h in hashes:
            if h in self._shared:
                self._shared[h] += 1
            elif h in self._cached:
                del self._cached[h]
                self._shared[h] = 1
            else:
                break
            taken.append(h)
        return taken

    def allocate(self, count: int) -> bool:
        """Take ``count`` private blocks (evicting cached ones if needed), or nothing and False."""
        if count <= 0:
            return True
        if count > self.free + self.cached:
            return False
        while self.free < count:
            self._cached.popitem(last=False)
        self._private += count
        return True

    def publish(self, hashes: Sequence[int]) -> int:
        """A sequence computed (or received) the KV of the full prompt blocks ``hashes``, held in as
        many of its private blocks: make them shared prefix-cache entries it references. Where a
        block with the same hash exists already, the sequence references that one and its own copy
        is freed. Returns how many private blocks it no longer holds (``len(hashes)``, or 0 with
        caching off)."""
        if not self._caching:
            return 0
        for h in hashes:
            if h in self._shared:
                self._shared[h] += 1
            else:
                self._cached.pop(h, None)
                self._shared[h] = 1
        self._private -= len(hashes)
        return len(hashes)

    def retire(self, private: int, shared: Sequence[int]) -> None:
        """Give back a sequence's blocks: private ones are freed, shared ones it was the last to
        reference stay cached."""
        if private > self._private:
            raise PdorchError(ErrorCode.INTERNAL, f"retiring {private} private blocks, {self._private} held")
        self._private -= private
        for h in shared:
            refs = self._shared[h] - 1
            if refs:
                self._shared[h] = refs
            else:
                del self._shared[h]
                self._cached[h] = None
