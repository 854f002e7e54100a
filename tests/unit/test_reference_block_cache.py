"""The block allocator's prefix cache: sharing, LRU eviction, and exact accounting."""

from __future__ import annotations

import random
import threading

import pytest

from transport.errors import ErrorCode, PdorchError
from workers.engines.reference.block_allocator import BlockAllocator, BlockCounts


def _cache_chain(alloc: BlockAllocator, hashes: list[int]) -> list[int]:
    """Allocate one block per hash, register them as a prompt's prefix, and release them."""
    blocks = alloc.allocate(len(hashes))
    for block, block_hash in zip(blocks, hashes, strict=True):
        assert alloc.register(block, block_hash)
    alloc.free(blocks)
    return blocks


def _assert_invariant(alloc: BlockAllocator) -> None:
    counts = alloc.counts()
    assert counts.used + counts.free + counts.cached == counts.total
    alloc.check_consistency()


# --------------------------------------------------------------------------- hits and misses


@pytest.mark.parametrize(
    ("query", "expected_hits"),
    [
        ([1, 2, 3], 3),  # the whole chain
        ([1, 2], 2),  # a prefix of it
        ([1, 2, 3, 4], 3),  # longer than what is cached
        ([1, 9, 3], 1),  # the chain stops at the first miss, even if later keys exist
        ([9, 1, 2], 0),  # miss at the start
        ([], 0),
    ],
)
def test_allocate_with_prefix_reuses_the_longest_cached_run(query: list[int], expected_hits: int) -> None:
    alloc = BlockAllocator(10)
    cached = _cache_chain(alloc, [1, 2, 3])
    assert alloc.cached_prefix_length(query) == expected_hits
    got = alloc.allocate_with_prefix(query, 5)
    assert got is not None
    table, hits = got
    assert hits == expected_hits
    assert table[:hits] == cached[:hits]
    assert len(set(table)) == 5
    assert not set(table[hits:]) & set(cached[:hits])
    assert alloc.counts() == BlockCounts(used=5, free=5 - (3 - hits), cached=3 - hits, total=10)
    _assert_invariant(alloc)


def test_hits_are_capped_at_the_table_size() -> None:
    alloc = BlockAllocator(6)
    cached = _cache_chain(alloc, [1, 2, 3])
    got = alloc.allocate_with_prefix([1, 2, 3], 2)
    assert got == (cached[:2], 2)


def test_shared_blocks_are_reference_counted() -> None:
    alloc = BlockAllocator(8)
    cached = _cache_chain(alloc, [1, 2])
    first = alloc.allocate_with_prefix([1, 2], 3)
    second = alloc.allocate_with_prefix([1, 2], 3)
    assert first is not None and second is not None
    assert first[0][:2] == second[0][:2] == cached
    assert alloc.reference_counts()[cached[0]] == 2
    assert alloc.counts() == BlockCounts(used=4, free=4, cached=0, total=8)
    alloc.free(first[0])
    assert alloc.counts() == BlockCounts(used=3, free=5, cached=0, total=8)  # still held by "second"
    alloc.free(second[0])
    assert alloc.counts() == BlockCounts(used=0, free=6, cached=2, total=8)
    _assert_invariant(alloc)


def test_a_released_cached_block_is_cached_not_free() -> None:
    alloc = BlockAllocator(4)
    blocks = alloc.allocate(3)
    assert alloc.register(blocks[0], 11)
    alloc.free(blocks)
    assert (alloc.num_used, alloc.num_free, alloc.num_cached, alloc.num_available) == (0, 3, 1, 4)
    assert alloc.cached_block_hashes() == frozenset({11})


def test_keep_available_refuses_without_changing_anything() -> None:
    alloc = BlockAllocator(6)
    _cache_chain(alloc, [1, 2])
    before = (alloc.counts(), alloc.reference_counts(), alloc.cached_block_hashes())
    # 2 hits + 3 fresh leave 1 block available: enough for keep_available=1, not for 2.
    assert alloc.allocate_with_prefix([1, 2], 5, keep_available=2) is None
    assert (alloc.counts(), alloc.reference_counts(), alloc.cached_block_hashes()) == before
    assert alloc.allocate_with_prefix([1, 2], 5, keep_available=1) is not None
    assert alloc.allocate_with_prefix([], 2) is None


def test_a_reclaimed_cached_block_is_not_counted_twice() -> None:
    # 4 blocks: 1 cached + 3 free. A table of 4 that reuses the cached one needs only 3 fresh.
    alloc = BlockAllocator(4)
    _cache_chain(alloc, [5])
    got = alloc.allocate_with_prefix([5], 4)
    assert got is not None and got[1] == 1
    assert alloc.counts() == BlockCounts(used=4, free=0, cached=0, total=4)


# --------------------------------------------------------------------------- registration


def test_registration_keeps_the_first_copy_of_a_prefix() -> None:
    alloc = BlockAllocator(4)
    a, b = alloc.allocate(2)
    assert alloc.register(a, 7)
    assert not alloc.register(b, 7)  # same prefix computed twice: the first copy stays cached
    assert not alloc.register(a, 8)  # a block caches one prefix only
    alloc.free([a, b])
    assert alloc.counts() == BlockCounts(used=0, free=3, cached=1, total=4)
    assert alloc.cached_block_hashes() == frozenset({7})


def test_registering_a_block_nobody_holds_is_an_internal_error() -> None:
    alloc = BlockAllocator(4)
    with pytest.raises(PdorchError) as caught:
        alloc.register(2, 7)
    assert caught.value.code is ErrorCode.INTERNAL


# --------------------------------------------------------------------------- eviction


def test_eviction_is_least_recently_released_first_and_tail_first() -> None:
    alloc = BlockAllocator(6)
    _cache_chain(alloc, [1, 2, 3])  # released first
    _cache_chain(alloc, [10, 20, 30])
    assert alloc.counts() == BlockCounts(used=0, free=0, cached=6, total=6)
    expected_left = [{1, 2, 10, 20, 30}, {1, 10, 20, 30}, {10, 20, 30}, {10, 20}, {10}, set()]
    for left in expected_left:
        alloc.allocate(1)
        assert alloc.cached_block_hashes() == frozenset(left)
        _assert_invariant(alloc)


def test_reuse_refreshes_a_cached_block() -> None:
    alloc = BlockAllocator(4)
    _cache_chain(alloc, [1])
    _cache_chain(alloc, [2])
    got = alloc.allocate_with_prefix([1], 1)  # touch "1": now released after "2"
    assert got is not None
    alloc.free(got[0])
    alloc.allocate(3)  # the 2 free blocks, then evicts the least recently released: "2"
    assert alloc.cached_block_hashes() == frozenset({1})


def test_free_blocks_go_before_cached_ones() -> None:
    alloc = BlockAllocator(5)
    _cache_chain(alloc, [1, 2])
    alloc.allocate(3)
    assert alloc.cached_block_hashes() == frozenset({1, 2})


def test_referenced_blocks_are_never_evicted() -> None:
    alloc = BlockAllocator(4)
    cached = _cache_chain(alloc, [1, 2])
    held = alloc.allocate_with_prefix([1], 1)
    assert held == (cached[:1], 1)
    assert sorted(alloc.allocate(3)) == sorted(set(range(4)) - {cached[0]})  # evicts "2", not "1"
    with pytest.raises(PdorchError) as caught:
        alloc.allocate(1)
    assert caught.value.code is ErrorCode.OUT_OF_BLOCKS
    assert alloc.cached_block_hashes() == frozenset({1})
    assert alloc.cached_prefix_length([1]) == 1


def test_out_of_blocks_counts_evictable_blocks_as_available() -> None:
    alloc = BlockAllocator(3)
    _cache_chain(alloc, [1, 2])
    assert alloc.try_allocate(4) is None
    assert alloc.cached_block_hashes() == frozenset({1, 2})  # a refused allocation evicts nothing
    assert len(alloc.allocate(3)) == 3


# --------------------------------------------------------------------------- accounting fuzz


@pytest.mark.parametrize("seed", range(4))
def test_random_operations_keep_exact_accounting(seed: int) -> None:
    rng = random.Random(seed)
    alloc = BlockAllocator(24)
    chains = [[rng.randrange(1 << 62) for _ in range(6)] for _ in range(4)]
    holders: list[tuple[list[int], list[int]]] = []  # (table, hashes of its leading blocks)
    for _ in range(400):
        op = rng.random()
        if op < 0.45:
            chain = rng.choice(chains)[: rng.randint(0, 6)]
            cached_run = alloc.cached_prefix_length(chain)
            got = alloc.allocate_with_prefix(
                chain, rng.randint(len(chain), 8), keep_available=rng.randint(0, 2)
            )
            if got is not None:
                table, hits = got
                assert hits == cached_run
                for index in range(hits, len(chain)):  # "compute" the rest and publish it
                    alloc.register(table[index], chain[index])
                holders.append((table, chain))
        elif op < 0.55:
            table = alloc.try_allocate(rng.randint(1, 4))
            if table is not None:
                holders.append((table, []))
        elif holders:
            table, _ = holders.pop(rng.randrange(len(holders)))
            alloc.free(table)
        _assert_invariant(alloc)
        held = [b for table, _ in holders for b in table]
        assert alloc.num_used == len(set(held))
        assert sum(alloc.reference_counts().values()) == len(held)
        # A prefix somebody holds is never evicted: its first block still answers its hash.
        for _, chain in holders:
            if chain:
                assert alloc.cached_prefix_length(chain[:1]) == 1
    for table, _ in holders:
        alloc.free(table)
    assert alloc.num_used == 0 and alloc.num_free + alloc.num_cached == 24


def test_sharing_and_eviction_are_thread_safe() -> None:
    alloc = BlockAllocator(32)
    chains = [[1000 * c + i for i in range(5)] for c in range(3)]
    exclusive: set[int] = set()  # fresh blocks handed out and not yet freed
    lock = threading.Lock()
    problems: list[str] = []

    def churn(worker: int) -> None:
        rng = random.Random(worker)
        for _ in range(3000):
            chain = rng.choice(chains)[: rng.randint(0, 5)]
            got = alloc.allocate_with_prefix(chain, rng.randint(len(chain), 6))
            if got is None:
                continue
            table, hits = got
            with lock:
                clash = exclusive & set(table[hits:])
                if clash:
                    problems.append(f"fresh blocks {clash} handed out twice")
                exclusive.update(table[hits:])
            for index in range(hits, len(chain)):
                alloc.register(table[index], chain[index])
            with lock:
                exclusive.difference_update(table[hits:])
            alloc.free(table)

    threads = [threading.Thread(target=churn, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert problems == []
    assert alloc.num_used == 0
    _assert_invariant(alloc)
