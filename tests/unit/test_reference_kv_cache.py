"""Block allocator accounting and the paged KV cache's gather/scatter."""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest

from transport.errors import ErrorCode, PdorchError
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.kv_cache import BlockAllocator, PagedKvCache

CFG = ModelConfig(layers=2)


def _rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *CFG.kv_row_shape))


# --------------------------------------------------------------------------- allocator


def test_allocate_and_free_keep_exact_counts() -> None:
    alloc = BlockAllocator(10)
    first = alloc.allocate(3)
    second = alloc.allocate(7)
    assert len(set(first) | set(second)) == 10
    assert (alloc.num_used, alloc.num_free, alloc.num_total) == (10, 0, 10)
    alloc.free(first)
    assert (alloc.num_used, alloc.num_free) == (7, 3)
    assert sorted(alloc.allocate(3)) == sorted(first)
    assert alloc.allocate(0) == []


def test_exhaustion_is_all_or_nothing() -> None:
    alloc = BlockAllocator(4)
    alloc.allocate(3)
    with pytest.raises(PdorchError) as caught:
        alloc.allocate(2)
    assert caught.value.code is ErrorCode.OUT_OF_BLOCKS
    assert alloc.num_free == 1
    assert alloc.try_allocate(2) is None
    assert alloc.try_allocate(1) is not None
    assert alloc.num_free == 0


@pytest.mark.parametrize(
    "bad_free",
    [
        pytest.param(lambda held: held[:1], id="double-free"),
        pytest.param(lambda held: [held[1], held[1]], id="same-id-twice-in-one-call"),
        pytest.param(lambda held: [99], id="never-allocated"),
        pytest.param(lambda held: [held[1], 99], id="partly-invalid"),
    ],
)
def test_bad_free_is_detected_and_changes_nothing(bad_free) -> None:  # type: ignore[no-untyped-def]
    alloc = BlockAllocator(8)
    held = alloc.allocate(4)
    alloc.free(held[:1])
    before = (alloc.num_used, alloc.num_free)
    with pytest.raises(PdorchError) as caught:
        alloc.free(bad_free(held))
    assert caught.value.code is ErrorCode.INTERNAL
    assert (alloc.num_used, alloc.num_free) == before


def test_allocator_rejects_non_positive_size() -> None:
    with pytest.raises(PdorchError) as caught:
        BlockAllocator(0)
    assert caught.value.code is ErrorCode.CONFIG


def test_allocator_is_thread_safe() -> None:
    alloc = BlockAllocator(64)
    owners: dict[int, int] = {}
    owners_lock = threading.Lock()
    problems: list[str] = []

    def churn(worker: int) -> None:
        rng = random.Random(worker)
        for _ in range(1500):
            ids = alloc.try_allocate(rng.randint(1, 6))
            if ids is None:
                continue
            with owners_lock:
                clash = [i for i in ids if i in owners]
                if clash:
                    problems.append(f"blocks {clash} handed out twice")
                owners.update(dict.fromkeys(ids, worker))
            with owners_lock:
                for i in ids:
                    del owners[i]
            alloc.free(ids)

    threads = [threading.Thread(target=churn, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert problems == []
    assert (alloc.num_used, alloc.num_free) == (0, 64)


# --------------------------------------------------------------------------- paged cache


@pytest.mark.parametrize(
    ("num_tokens", "block_size", "expected"), [(0, 16, 0), (1, 16, 1), (16, 16, 1), (17, 16, 2), (33, 4, 9)]
)
def test_blocks_for(num_tokens: int, block_size: int, expected: int) -> None:
    assert PagedKvCache(CFG, 4, block_size).blocks_for(num_tokens) == expected


def test_storage_layout_is_token_major_per_layer() -> None:
    cache = PagedKvCache(CFG, 5, 4)
    assert cache.num_layers == 2
    assert cache.layer_array(0).shape == (5, 4, 2, 2, 32)
    assert cache.bytes_per_block == 4 * CFG.kv_bytes_per_token


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 11, 50])
def test_scatter_in_chunks_then_gather_round_trips_across_blocks(chunk: int) -> None:
    cache = PagedKvCache(CFG, 32, 4)
    table = [7, 2, 19, 0, 31, 5, 12, 8, 3, 22, 14, 9, 27]  # not contiguous, not sorted
    rows = _rows(50, seed=chunk)
    for layer in range(CFG.layers):
        for start in range(0, len(rows), chunk):
            cache.scatter(layer, table, start, rows[start : start + chunk] + layer)
    for layer in range(CFG.layers):
        got = cache.gather(layer, table, 50)
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, rows + layer)
        np.testing.assert_array_equal(cache.gather(layer, table, 13), rows[:13] + layer)
    untouched = sorted(set(range(32)) - set(table))
    assert not cache.layer_array(0)[untouched].any()


def test_gather_is_a_copy() -> None:
    cache = PagedKvCache(CFG, 4, 4)
    cache.scatter(0, [1, 2], 0, _rows(6, seed=1))
    got = cache.gather(0, [1, 2], 6)
    got[:] = 0
    np.testing.assert_array_equal(cache.gather(0, [1, 2], 6), _rows(6, seed=1))
    assert cache.gather(0, [1, 2], 0).shape == (0, 2, 2, 32)


def test_scatter_at_an_offset_leaves_earlier_rows_alone() -> None:
    cache = PagedKvCache(CFG, 4, 4)
    cache.scatter(1, [3, 0, 2], 0, _rows(10, seed=1))
    cache.scatter(1, [3, 0, 2], 6, _rows(4, seed=2))
    expected = np.concatenate([_rows(10, seed=1)[:6], _rows(4, seed=2)])
    np.testing.assert_array_equal(cache.gather(1, [3, 0, 2], 10), expected)


@pytest.mark.parametrize(
    ("table", "offset", "rows", "mentions"),
    [
        ([0, 1], 0, np.zeros((3, 2, 2, 16)), "shaped"),
        ([0, 1], 0, np.zeros((3, 2, 2, 32), dtype=np.float32), "float32"),
        ([0, 1], 0, np.full((3, 2, 2, 32), np.nan), "NaN"),
        ([0, 1], 0, np.full((3, 2, 2, 32), np.inf), "NaN"),
        ([0, 1], 6, np.zeros((3, 2, 2, 32)), "need 3 blocks"),
        ([0, 1], -1, np.zeros((3, 2, 2, 32)), "negative"),
        ([0, 9], 0, np.zeros((8, 2, 2, 32)), "outside"),
    ],
)
def test_bad_scatter_is_kv_corrupt_and_writes_nothing(
    table: list[int], offset: int, rows: np.ndarray, mentions: str
) -> None:
    cache = PagedKvCache(CFG, 4, 4)
    with pytest.raises(PdorchError) as caught:
        cache.scatter(0, table, offset, rows)
    assert caught.value.code is ErrorCode.KV_CORRUPT
    assert mentions in caught.value.message
    assert not cache.layer_array(0).any()


def test_gather_beyond_the_table_is_refused() -> None:
    cache = PagedKvCache(CFG, 4, 4)
    with pytest.raises(PdorchError):
        cache.gather(0, [0, 1], 9)
