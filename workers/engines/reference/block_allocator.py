"""Exact, thread-safe accounting of fixed-size KV blocks, with a prefix cache of full blocks.

Every block is in exactly one of three states:

- **used**: referenced by at least one sequence or reservation (a reference count; a block holding
  a cached prefix can be shared by many sequences);
- **cached**: unreferenced, but it holds the KV of a full prompt block registered under that
  block's chained hash (see ``prefix_hash``), kept so a later prompt with the same prefix can reuse
  it. Cached blocks are reusable free space: allocation evicts them, least recently released first;
- **free**: holds nothing worth keeping.

``num_used + num_free + num_cached == num_total`` always holds. A referenced block is never
evicted, and a cached block is never written (sequences only write blocks they hold alone).

The engine thread allocates as sequences grow while the agent's event loop reserves blocks for
incoming KV transfers, so every operation holds one lock. Allocation is all-or-nothing: a caller
either gets every block it asked for or none, so a failed request never leaks a partial table.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import msgspec

from transport.errors import ErrorCode, PdorchError


class BlockCounts(msgspec.Struct, frozen=True):
    """One consistent snapshot of the three block states."""

    used: int
    free: int
    cached: int
    total: int


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise PdorchError(ErrorCode.CONFIG, f"num_blocks must be positive, got {num_blocks}")
        self._num_total = num_blocks
        self._lock = threading.Lock()
        # A stack popped from the end; reversed so low ids go out first (easier to read in logs).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._refs: dict[int, int] = {}  # used blocks -> reference count (>= 1)
        self._hash_of: dict[int, int] = {}  # block -> the prefix hash it caches (used or cached)
        self._block_of: dict[int, int] = {}  # the inverse: prefix hash -> block
        # Cached unreferenced blocks, least recently released first (the eviction order).
        self._evictable: OrderedDict[int, None] = OrderedDict()

    # ------------------------------------------------------------------ counts

    @property
    def num_total(self) -> int:
        return self._num_total

    @property
    def num_free(self) -> int:
        """Blocks that hold nothing worth keeping (cached blocks not included)."""
        with self._lock:
            return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks referenced by a sequence or a reservation."""
        with self._lock:
            return len(self._refs)

    @property
    def num_cached(self) -> int:
        """Unreferenced blocks kept for their cached prefix (evictable)."""
        with self._lock:
            return len(self._evictable)

    @property
    def num_available(self) -> int:
        """Blocks an allocation can get: free plus evictable cached ones."""
        with self._lock:
            return len(self._free) + len(self._evictable)

    def counts(self) -> BlockCounts:
        with self._lock:
            return BlockCounts(len(self._refs), len(self._free), len(self._evictable), self._num_total)

    # ------------------------------------------------------------------ plain allocation

    def allocate(self, n: int) -> list[int]:
        """``n`` blocks nobody else holds, evicting cached blocks when the free list is short."""
        if n < 0:
            raise PdorchError(ErrorCode.INTERNAL, f"cannot allocate a negative number of blocks ({n})")
        with self._lock:
            available = len(self._free) + len(self._evictable)
            if n > available:
                raise PdorchError(
                    ErrorCode.OUT_OF_BLOCKS,
                    f"need {n} KV blocks, {available} of {self._num_total} free or evictable",
                )
            return self._take(n)

    def try_allocate(self, n: int) -> list[int] | None:
        """Like :meth:`allocate` but returns None instead of raising when blocks are short."""
        try:
            return self.allocate(n)
        except PdorchError as err:
            if err.code is ErrorCode.OUT_OF_BLOCKS:
                return None
            raise

    def free(self, ids: Iterable[int]) -> None:
        """Drop one reference to each block (a sequence's table, in table order).

        A block nobody references any more becomes cached if it holds a registered prefix, free
        otherwise. Cached blocks join the eviction order tail-first, so a released prompt loses its
        last blocks before its first ones (a prefix is only reusable from its start).
        """
        ids = list(ids)
        with self._lock:
            # Validate everything before changing anything, so a bad call leaves exact accounting.
            if len(set(ids)) != len(ids):
                raise PdorchError(ErrorCode.INTERNAL, f"block freed twice in one call: {sorted(ids)}")
            not_used = [i for i in ids if i not in self._refs]
            if not_used:
                raise PdorchError(
                    ErrorCode.INTERNAL, f"freeing KV blocks that are not allocated (double free?): {not_used}"
                )
            released: list[int] = []
            for block in ids:
                self._refs[block] -= 1
                if self._refs[block] == 0:
                    del self._refs[block]
                    released.append(block)
            for block in reversed(released):
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    # ------------------------------------------------------------------ prefix cache

    def register(self, block_id: int, block_hash: int) -> bool:
        """Record that a held block now holds the full prompt block ``block_hash`` names.

        Returns False (and changes nothing) when another block already caches that hash or this
        block already caches one: the first copy stays the cached one.
        """
        with self._lock:
            if block_id not in self._refs:
                raise PdorchError(ErrorCode.INTERNAL, f"cannot cache KV block {block_id}: it is not held")
            if block_hash in self._block_of or block_id in self._hash_of:
                return False
            self._block_of[block_hash] = block_id
            self._hash_of[block_id] = block_hash
            return True

    def cached_prefix_length(self, block_hashes: Sequence[int]) -> int:
        """How many leading blocks of ``block_hashes`` are cached (held or not); changes nothing."""
        with self._lock:
            return len(self._match(block_hashes))

    def allocate_with_prefix(
        self, block_hashes: Sequence[int], num_blocks: int, keep_available: int = 0
    ) -> tuple[list[int], int] | None:
        """A table of ``num_blocks`` blocks that starts with the longest cached run of ``block_hashes``.

        Returns ``(table, hits)``: the first ``hits`` blocks are the cached ones (now referenced
        once more), the rest are fresh. Returns None and changes nothing if, after taking them,
        fewer than ``keep_available`` blocks would remain available. Atomic: another thread can
        neither evict a matched block nor take the fresh ones meanwhile.
        """
        with self._lock:
            hit = self._match(block_hashes)[:num_blocks]
            fresh = num_blocks - len(hit)
            reclaimed = sum(1 for block in hit if block in self._evictable)
            available = len(self._free) + len(self._evictable) - reclaimed
            if available - fresh < keep_available or fresh < 0:
                return None
            for block in hit:
                self._evictable.pop(block, None)
                self._refs[block] = self._refs.get(block, 0) + 1
            return hit + self._take(fresh), len(hit)

    def cached_block_hashes(self) -> frozenset[int]:
        """Every prefix hash this allocator holds a block for (referenced or evictable)."""
        with self._lock:
            return frozenset(self._block_of)

    def reference_counts(self) -> dict[int, int]:
        """A snapshot of every used block's reference count."""
        with self._lock:
            return dict(self._refs)

    def check_consistency(self) -> None:
        """Raise INTERNAL if the bookkeeping contradicts itself (for tests and debugging)."""
        with self._lock:
            free, used, evictable = set(self._free), set(self._refs), set(self._evictable)
            problems: list[str] = []
            if len(free) != len(self._free):
                problems.append("a block is on the free list twice")
            if free & used or free & evictable or used & evictable:
                problems.append("a block is in two states at once")
            if len(free) + len(used) + len(evictable) != self._num_total:
                problems.append("used + free + cached != total")
            if any(count < 1 for count in self._refs.values()):
                problems.append("a used block has no reference")
            if not evictable <= set(self._hash_of) or free & set(self._hash_of):
                problems.append("a cached block has no hash, or a free block has one")
            if {h: b for b, h in self._hash_of.items()} != self._block_of:
                problems.append("hash -> block and block -> hash maps disagree")
        if problems:
            raise PdorchError(ErrorCode.INTERNAL, "KV block accounting broken: " + "; ".join(problems))

    # ------------------------------------------------------------------ internals (lock held)

    def _match(self, block_hashes: Sequence[int]) -> list[int]:
        hit: list[int] = []
        for block_hash in block_hashes:
            block = self._block_of.get(block_hash)
            if block is None:
                break  # the chain stops at the first miss: later blocks depend on this one
            hit.append(block)
        return hit

    def _take(self, n: int) -> list[int]:
        """``n`` fresh blocks, free ones first, then evicting the least recently released cached ones."""
        ids: list[int] = []
        while len(ids) < n and self._free:
            ids.append(self._free.pop())
        while len(ids) < n:
            block, _ = self._evictable.popitem(last=False)
            del self._block_of[self._hash_of.pop(block)]
            ids.append(block)
        for block in ids:
            self._refs[block] = 1
        return ids
