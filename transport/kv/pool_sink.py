"""A :class:`KvSink` whose rows live in a shared block pool of its own, sized for one transfer, so
a same-host sender is lent its blocks and writes the rows straight into them.

The counterpart of :class:`~transport.kv.array_sink.ArraySink` for the lent-blocks path (tests,
benchmarks); an engine lends the blocks of its own cache instead (the reference engine's
``_BlockSink``).
"""

from __future__ import annotations

import numpy as np

from transport.kv.messages import KvBegin
from transport.kv.same_host.block_pool import BlockPool, LentBlocks
from transport.kv.same_host.block_rows import BlockRows


class PoolSink:
    def __init__(
        self,
        num_layers: int,
        rows_per_layer: int,
        row_shape: tuple[int, ...],
        dtype: str,
        block_rows: int = 16,
        *,
        huge: bool = False,
    ) -> None:
        """``huge``: the pool in huge pages. Raises OSError where a shared pool cannot be made (see
        BlockPool)."""
        self._geometry = (num_layers, rows_per_layer, tuple(row_shape), np.dtype(dtype))
        self._row_bytes = int(np.prod(row_shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        self._block_rows = block_rows
        count = -(-rows_per_layer // block_rows)
        self.pool = BlockPool(count, num_layers * block_rows * self._row_bytes, huge=huge)
        memory = self.pool.memory
        self._rows = BlockRows(list(memory), block_rows, self._row_bytes, contiguous=memory)
        self.lent = 0  # transfers lent the blocks
        self.bytes_written = 0  # copied in by the receiver (not lent)

    def write(self, layer: int, row_offset: int, rows: np.ndarray) -> None:
        self._rows.write(layer, row_offset, np.ascontiguousarray(rows))
        self.bytes_written += rows.nbytes

    def lend_blocks(self, begin: KvBegin, row_bytes: int) -> LentBlocks | None:
        layers, rows, shape, dtype = self._geometry
        if (begin.num_layers, begin.rows_per_layer, tuple(begin.row_shape), begin.dtype) != (
            layers,
            rows,
            shape,
            dtype.name,
        ):
            return None
        self.lent += 1
        return self.pool.lend(range(self.pool.count), self._block_rows, row_bytes)

    def placed(self, layer: int, row_offset: int, rows: list[np.ndarray]) -> None:
        pass  # nothing to check beyond the checksums

    @property
    def layers(self) -> np.ndarray:
        """A copy of every row, ``[layers, rows, *row_shape]``."""
        layers, rows, shape, dtype = self._geometry
        out = np.empty((layers, rows, *shape), dtype=dtype)
        for layer in range(layers):
            for before, piece in self._rows.pieces(layer, 0, rows):
                out[layer, before : before + len(piece) // self._row_bytes] = piece.view(dtype).reshape(
                    -1, *shape
                )
        return out

    def close(self) -> None:
        self._rows = BlockRows([], self._block_rows, self._row_bytes)
        self.pool.close()
