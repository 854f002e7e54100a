"""Whole KV blocks in and out of one layer's paged cache, as numpy arrays (no torch here).

A layer's cache is ``[num_blocks, ...]``; a block's inner layout (on CPU: K transposed, V row-major)
is the engine's business, so blocks move as opaque rows between identically configured engines.
Reading a contiguous run of block ids is a view (sent zero-copy, which is why the prefill side
keeps its blocks leased until the transfer ends); scattered ids are gathered with one copy.
"""

from __future__ import annotations

import itertools

import numpy as np

from transport.errors import ErrorCode, PdorchError


def contiguous_run(block_ids: list[int]) -> bool:
    return all(b == a + 1 for a, b in itertools.pairwise(block_ids))


def read_blocks(layer: np.ndarray, block_ids: list[int]) -> np.ndarray:
    """The blocks ``block_ids`` of ``layer``, in order: a view when they are one run, else a copy."""
    if not block_ids:
        return layer[:0]
    if contiguous_run(block_ids):
        return layer[block_ids[0] : block_ids[-1] + 1]
    return layer[np.asarray(block_ids, dtype=np.int64)]


def write_blocks(layer: np.ndarray, block_ids: list[int], rows: np.ndarray) -> None:
    """Store ``rows`` (one per block) into the blocks ``block_ids`` of ``layer``."""
    if rows.shape[0] != len(block_ids) or rows.shape[1:] != layer.shape[1:] or rows.dtype != layer.dtype:
        raise PdorchError(
            ErrorCode.KV_REJECTED,
            f"KV rows {rows.dtype}{tuple(rows.shape)} do not fit {len(block_ids)} blocks of "
            f"{layer.dtype}{tuple(layer.shape[1:])}",
        )
    if not block_ids:
        return
    if contiguous_run(block_ids):
        layer[block_ids[0] : block_ids[-1] + 1] = rows
    else:
        layer[np.asarray(block_ids, dtype=np.int64)] = rows


class BlockSink:
    """Writes a received transfer straight into the engine's cache blocks.

    The sender sends every block of the prompt; rows below ``skip_rows`` (blocks this engine
    already holds from its own prefix cache) are dropped, the rest land in ``block_ids`` in order.
    """

    def __init__(self, layers: list[np.ndarray], block_ids: list[int], skip_rows: int) -> None:
        self._layers = layers
        self._block_ids = block_ids
        self._skip = skip_rows
        self.rows_written = [0] * len(layers)

    @property
    def rows_expected(self) -> int:
        return self._skip + len(self._block_ids)

    def write(self, layer: int, row_offset: int, rows: np.ndarray) -> None:
        if not 0 <= layer < len(self._layers):
            raise PdorchError(ErrorCode.KV_REJECTED, f"KV for layer {layer}, engine has {len(self._layers)}")
        end = row_offset + rows.shape[0]
        if row_offset < 0 or end > self.rows_expected:
            raise PdorchError(
                ErrorCode.KV_REJECTED, f"KV rows {row_offset}:{end} beyond {self.rows_expected}"
            )
        lo = max(row_offset, self._skip)
        if lo < end:
            ids = self._block_ids[lo - self._skip : end - self._skip]
            write_blocks(self._layers[layer], ids, rows[lo - row_offset :])
        self.rows_written[layer] += rows.shape[0]

    def complete(self) -> bool:
        return all(n == self.rows_expected for n in self.rows_written)
