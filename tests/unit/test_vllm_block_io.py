"""Moving whole KV blocks out of and into a paged layer cache."""

from __future__ import annotations

import numpy as np
import pytest

from transport.errors import ErrorCode, PdorchError
from workers.engines.vllm.block_io import BlockSink, read_blocks, write_blocks


def _cache(num_blocks: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((num_blocks, 2, 4, 8)).astype(np.float32)


def test_a_run_of_blocks_is_read_as_a_view() -> None:
    layer = _cache()
    rows = read_blocks(layer, [3, 4, 5])
    assert np.shares_memory(rows, layer)
    np.testing.assert_array_equal(rows, layer[3:6])


def test_scattered_blocks_are_gathered_in_order() -> None:
    layer = _cache()
    rows = read_blocks(layer, [7, 2, 5])
    assert not np.shares_memory(rows, layer)
    np.testing.assert_array_equal(rows, np.stack([layer[7], layer[2], layer[5]]))
    assert read_blocks(layer, []).shape == (0, 2, 4, 8)


@pytest.mark.parametrize("dst_ids", [[1, 2, 3], [9, 0, 4]])
def test_written_blocks_land_where_asked_and_nowhere_else(dst_ids: list[int]) -> None:
    src, dst = _cache(seed=1), np.zeros((10, 2, 4, 8), np.float32)
    write_blocks(dst, dst_ids, read_blocks(src, [5, 6, 7]))
    for d, s in zip(dst_ids, [5, 6, 7], strict=True):
        np.testing.assert_array_equal(dst[d], src[s])
    untouched = [b for b in range(10) if b not in dst_ids]
    assert not dst[untouched].any()


def test_rows_that_do_not_fit_are_rejected() -> None:
    dst = np.zeros((10, 2, 4, 8), np.float32)
    with pytest.raises(PdorchError) as e:
        write_blocks(dst, [1, 2], np.zeros((2, 2, 4, 4), np.float32))
    assert e.value.code is ErrorCode.KV_REJECTED
    with pytest.raises(PdorchError):
        write_blocks(dst, [1, 2], np.zeros((2, 2, 4, 8), np.float16))
    with pytest.raises(PdorchError):
        write_blocks(dst, [1, 2, 3], np.zeros((2, 2, 4, 8), np.float32))


def test_sink_drops_blocks_held_locally_and_fills_the_rest() -> None:
    src = [_cache(seed=2), _cache(seed=3)]
    dst = [np.zeros_like(src[0]), np.zeros_like(src[1])]
    # The prompt has 4 blocks; the first is a local prefix-cache hit, the rest go to blocks 6, 8, 9.
    sink = BlockSink(dst, [6, 8, 9], skip_rows=1)
    prompt_blocks = [0, 1, 2, 3]
    for layer in range(2):
        rows = read_blocks(src[layer], prompt_blocks)
        sink.write(layer, 0, rows[:2])  # a transfer may arrive in pieces
        assert not sink.complete()
        sink.write(layer, 2, rows[2:])
    assert sink.complete()
    for layer in range(2):
        np.testing.assert_array_equal(dst[layer][[6, 8, 9]], src[layer][[1, 2, 3]])
        assert not dst[layer][[0, 1, 2, 3, 4, 5, 7]].any()


def test_sink_rejects_rows_beyond_the_prompt_or_unknown_layers() -> None:
    dst = [np.zeros((10, 2, 4, 8), np.float32)]
    sink = BlockSink(dst, [1, 2], skip_rows=0)
    with pytest.raises(PdorchError):
        sink.write(0, 1, np.zeros((2, 2, 4, 8), np.float32))
    with pytest.raises(PdorchError):
        sink.write(1, 0, np.zeros((1, 2, 4, 8), np.float32))
