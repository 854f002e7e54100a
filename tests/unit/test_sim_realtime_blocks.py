"""Block accounting of the simulated engine: private and shared blocks, prefix cache, eviction."""

from __future__ import annotations

import pytest

from transport.errors import PdorchError
from workers.engines.sim.blocks import SimBlockPool


def counts(pool: SimBlockPool) -> tuple[int, int, int]:
    assert pool.used + pool.cached + pool.free == pool.total
    return pool.used, pool.cached, pool.free


def test_allocate_and_retire_private_blocks() -> None:
    pool = SimBlockPool(10)
    assert pool.allocate(4)
    assert counts(pool) == (4, 0, 6)
    assert not pool.allocate(7)  # all or nothing
    assert counts(pool) == (4, 0, 6)
    pool.retire(4, [])
    assert counts(pool) == (0, 0, 10)


def test_published_blocks_are_shared_then_cached_then_evicted() -> None:
    pool = SimBlockPool(10)
    assert pool.allocate(3)
    assert pool.publish([11, 12]) == 2  # two full prompt blocks; the third is partial
    assert counts(pool) == (3, 0, 7)
    # A second prompt with the same first block references it instead of computing it.
    assert pool.acquire_prefix([11, 99]) == [11]
    assert counts(pool) == (3, 0, 7)
    pool.retire(1, [11, 12])
    assert counts(pool) == (1, 1, 8)  # block 12 is unreferenced now: cached
    pool.retire(0, [11])
    assert counts(pool) == (0, 2, 8)
    assert pool.cached_hashes() == {11, 12}
    # Allocation evicts cached blocks, least recently released first.
    assert pool.allocate(9)
    assert pool.cached_hashes() == {11}
    assert pool.acquire_prefix([12]) == []


def test_publishing_a_block_that_exists_frees_the_duplicate() -> None:
    pool = SimBlockPool(10)
    assert pool.allocate(2)
    pool.publish([5])
    assert pool.allocate(2)  # another sequence computed the same block concurrently
    pool.publish([5])
    assert counts(pool) == (3, 0, 7)
    pool.retire(1, [5])
    pool.retire(1, [5])
    assert counts(pool) == (0, 1, 9)


def test_caching_off_shares_nothing() -> None:
    pool = SimBlockPool(4, enable_prefix_caching=False)
    assert pool.allocate(2)
    assert pool.publish([1, 2]) == 0
    pool.retire(2, [])
    assert counts(pool) == (0, 0, 4)
    assert pool.acquire_prefix([1, 2]) == []


def test_retiring_more_than_held_is_a_bug() -> None:
    pool = SimBlockPool(4)
    with pytest.raises(PdorchError):
        pool.retire(1, [])
