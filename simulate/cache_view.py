"""A simulated engine's prefix cache as placement may see it: read-only, and only at one instant.

Placement's ``NodeView`` is a snapshot; the live scheduler gives it a frozenset. Copying a simulated
engine's cache (hundreds of hashes) for every view would make a replay well over half again as slow,
so the simulator hands out this view instead: it has no mutators, and it answers only while the
engine is unchanged since the view was taken (every engine call bumps ``SimEngine.changes``). A read
after that raises instead of showing newer contents, so a view can never change under its reader.
"""

from __future__ import annotations

from collections.abc import Iterator, Set

from simulate.fluid import SimEngine


class StaleCacheView(RuntimeError):
    """A cache view was read after its engine moved on."""


class CacheView(Set[int]):
    __slots__ = ("_cache", "_engine", "_taken_at")

    def __init__(self, engine: SimEngine) -> None:
        self._engine = engine
        self._cache = engine.cache
        self._taken_at = engine.changes

    def _check(self) -> None:
        if self._engine.changes != self._taken_at:
            raise StaleCacheView("a prefix-cache view was read after its engine changed")

    def __contains__(self, block_hash: object) -> bool:
        self._check()
        return block_hash in self._cache

    def __iter__(self) -> Iterator[int]:
        self._check()
        return iter(tuple(self._cache))

    def __len__(self) -> int:
        self._check()
        return len(self._cache)
