"""Lent blocks, piece by piece: where rows land in them, what a sender may map, and retiring."""

from __future__ import annotations

import gc
import mmap

import msgspec
import numpy as np
import pytest

from tests.support.same_host import block_fds, blocks_mapped
from transport.errors import ErrorCode, PdorchError
from transport.kv.checksum import checksum
from transport.kv.messages import KvShmBlocks
from transport.kv.same_host.block_pool import BlockPool, stride_for
from transport.kv.same_host.block_rows import BlockRows
from transport.kv.same_host.mapped_blocks import MappedBlocks

LAYERS, BLOCK_ROWS, ROW = 3, 4, (2, 8)  # rows of 16 float32: 64 bytes
ROW_BYTES = 64


@pytest.fixture(autouse=True)
def nothing_left_mapped() -> None:
    yield
    gc.collect()
    assert blocks_mapped() == [] and block_fds() == {}


def _reference(layers: np.ndarray, rows: BlockRows) -> np.ndarray:
    out = np.empty_like(layers)
    for layer in range(layers.shape[0]):
        for before, piece in rows.pieces(layer, 0, layers.shape[1]):
            out[layer, before : before + len(piece) // ROW_BYTES] = piece.view(np.float32).reshape(-1, *ROW)
    return out


@pytest.mark.parametrize("contiguous", [True, False])
def test_rows_land_in_their_blocks_however_they_are_chunked(contiguous: bool) -> None:
    rng = np.random.default_rng(0)
    rows_per_layer = 23  # 6 blocks, the last one short
    count = -(-rows_per_layer // BLOCK_ROWS)
    memory = np.zeros((count, stride_for(LAYERS * BLOCK_ROWS * ROW_BYTES)), dtype=np.uint8)
    rows = BlockRows(list(memory), BLOCK_ROWS, ROW_BYTES, contiguous=memory if contiguous else None)
    layers = rng.standard_normal((LAYERS, rows_per_layer, *ROW)).astype(np.float32)
    for layer in range(LAYERS):
        start = 0
        while start < rows_per_layer:  # chunks of 1-9 rows: inside a block, across several, at the end
            n = min(int(rng.integers(1, 10)), rows_per_layer - start)
            rows.write(layer, start, layers[layer, start : start + n])
            assert rows.digest(layer, start, n) == checksum(layers[layer, start : start + n])
            views = rows.views(layer, start, n, np.dtype(np.float32), ROW)
            assert np.array_equal(np.concatenate(views), layers[layer, start : start + n])
            assert not any(v.flags.writeable for v in views)
            start += n
    assert np.array_equal(_reference(layers, rows), layers)
    # The layout is the reference engine's: [blocks, layers, block_rows, *row], rows past the end untouched.
    as_cache = (
        memory[:, : LAYERS * BLOCK_ROWS * ROW_BYTES].view(np.float32).reshape(count, LAYERS, BLOCK_ROWS, *ROW)
    )
    assert np.array_equal(as_cache[1, 2, 3], layers[2, 7])
    assert not as_cache[5, :, 3:].any()


def test_a_sender_writes_into_the_pool_through_its_own_mapping() -> None:
    pool = BlockPool(8, LAYERS * BLOCK_ROWS * ROW_BYTES)
    lent = pool.lend([5, 2, 7], BLOCK_ROWS, ROW_BYTES)  # any blocks, in transfer order
    mapped = MappedBlocks.attach(lent.offer, LAYERS, 10, ROW_BYTES)
    try:
        assert len(blocks_mapped()) == 8 + 3  # the pool's blocks, and the sender's three
        layer = np.arange(10 * 16, dtype=np.float32).reshape(10, *ROW)
        digests = mapped.write(1, 0, layer, checksum_rows=4)
        assert digests == [checksum(layer[i : i + 4]) for i in (0, 4, 8)]
        got = np.concatenate(lent.rows.views(1, 0, 10, np.dtype(np.float32), ROW))
        assert np.array_equal(got, layer)
        # Row 5 of the transfer is row 1 of its second block, pool block 2.
        as_pool = pool.memory[:, : LAYERS * BLOCK_ROWS * ROW_BYTES].view(np.float32)
        as_pool = as_pool.reshape(8, LAYERS, BLOCK_ROWS, *ROW)
        assert np.array_equal(as_pool[2, 1, 1], layer[5])
        assert not as_pool[[0, 1, 3, 4, 6]].any()  # no other block was touched
    finally:
        assert mapped.close()
        del lent
        pool.close()


def test_a_retired_block_is_out_of_a_stale_senders_reach() -> None:
    pool = BlockPool(4, LAYERS * BLOCK_ROWS * ROW_BYTES)
    lent = pool.lend([1], BLOCK_ROWS, ROW_BYTES)
    mapped = MappedBlocks.attach(lent.offer, LAYERS, BLOCK_ROWS, ROW_BYTES)
    try:
        ones = np.ones((BLOCK_ROWS, *ROW), dtype=np.float32)
        mapped.write(0, 0, ones, checksum_rows=BLOCK_ROWS)
        assert pool.memory[1].any()
        before = set(block_fds().values())
        pool.retire([1])
        assert not pool.memory[1].any()  # fresh pages behind the same addresses
        assert len(set(block_fds().values()) - before) == 1 and len(block_fds()) == 4
        mapped.write(1, 0, ones, checksum_rows=BLOCK_ROWS)  # a sender that has not heard yet
        assert not pool.memory[1].any()  # ... writes into pages no block uses
    finally:
        mapped.close()
        del lent
        pool.close()


def _offer(pool: BlockPool, blocks: list[int], **changes: object) -> KvShmBlocks:
    return msgspec.structs.replace(pool.lend(blocks, BLOCK_ROWS, ROW_BYTES).offer, **changes)


@pytest.mark.parametrize(
    ("changes", "rows", "code"),
    [
        ({}, 9, ErrorCode.BAD_MESSAGE),  # 9 rows take 3 blocks, two are offered
        ({"block_rows": 0}, 8, ErrorCode.BAD_MESSAGE),
        ({"stride": 1 << 30}, 8, ErrorCode.BAD_MESSAGE),  # would map far more than the transfer
        ({"stride": 100}, 8, ErrorCode.BAD_MESSAGE),  # not whole pages
        ({"inodes": [1]}, 8, ErrorCode.BAD_MESSAGE),
        ({"inodes": [1, 2]}, 8, ErrorCode.CONFIG),  # not the memfds offered
        ({"pid": 2**22 + 7}, 8, ErrorCode.CONFIG),  # no such process
        ({"fds": [0, 1]}, 8, ErrorCode.CONFIG),
    ],
)
def test_an_offer_that_does_not_fit_the_transfer_is_refused(
    changes: dict[str, object], rows: int, code: ErrorCode
) -> None:
    pool = BlockPool(4, LAYERS * BLOCK_ROWS * ROW_BYTES)
    try:
        with pytest.raises(PdorchError) as e:
            MappedBlocks.attach(_offer(pool, [0, 3], **changes), LAYERS, rows, ROW_BYTES)
        assert e.value.code == code
        assert len(blocks_mapped()) == 4  # nothing of a refused offer stays mapped
    finally:
        pool.close()


def test_blocks_start_on_pages() -> None:
    assert stride_for(1) == stride_for(mmap.PAGESIZE) == mmap.PAGESIZE
    assert stride_for(mmap.PAGESIZE + 1) == 2 * mmap.PAGESIZE
