"""The prompt-prefix block hashes the scheduler sent to a node, most recent last (bounded).

It is what the scheduler *knows* a node has seen, not a copy of the engine's cache; the
prefix-affinity scorer only needs it to be mostly right (llm-d's approximate prefix scorer). The
simulator keeps the same memory, so simulated placement knows exactly what live placement would.
Placement reads it through :meth:`PrefixMemory.view`: read-only, and only while the memory is
unchanged (a read after a change raises instead of showing newer contents).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Set

# Granularity of the prefix hashes the live scheduler computes from prompt tokens (tokens per hash).
PREFIX_BLOCK_TOKENS = 16


class StalePrefixView(RuntimeError):
    """A prefix view was read after its memory changed."""


class PrefixMemory:
    """Bounded by the node's KV capacity in tokens: it cannot hold more distinct prefixes than that."""

    def __init__(self, capacity_tokens: int) -> None:
        self._capacity = max(1, capacity_tokens)
        self._hashes: OrderedDict[int, None] = OrderedDict()
        self.version = 0

    def __len__(self) -> int:
        return len(self._hashes)

    def membership(self) -> Callable[[object], bool]:
        """The memory's membership test, current as the memory changes (for a sample of a large
        cluster's nodes, kept between decisions)."""
        return self._hashes.__contains__

    def add(self, hashes: Iterable[int], block_tokens: int = PREFIX_BLOCK_TOKENS) -> None:
        """Remember ``hashes``, each covering ``block_tokens`` tokens (most recent last)."""
        memory = self._hashes
        for h in hashes:
            memory[h] = None
            memory.move_to_end(h)
        limit = max(1, self._capacity // max(1, block_tokens))
        while len(memory) > limit:
            memory.popitem(last=False)
        self.version += 1

    def view(self) -> PrefixView:
        return PrefixView(self)


class PrefixView(Set[int]):
    __slots__ = ("_hashes", "_memory", "_version")

    def __init__(self, memory: PrefixMemory) -> None:
        self._memory = memory
        self._hashes = memory._hashes
        self._version = memory.version

    def _check(self) -> None:
        if self._memory.version != self._version:
            raise StalePrefixView("a prefix view was read after its memory changed")

    def __contains__(self, block_hash: object) -> bool:
        self._check()
        return block_hash in self._hashes

    def membership(self) -> Callable[[object], bool]:
        """The memory's own membership test, for a run of look-ups made at once (C speed: a long
        prompt matched against a node is hundreds of them)."""
        self._check()
        return self._hashes.__contains__

    def __iter__(self) -> Iterator[int]:
        self._check()
        return iter(tuple(self._hashes))

    def __len__(self) -> int:
        self._check()
        return len(self._hashes)
