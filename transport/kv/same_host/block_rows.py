"""Where a transfer's rows lie in the blocks it was lent (both sides address them alike).

A block holds ``block_rows`` rows of every layer, layer after layer: row ``r`` of layer ``l`` is at
byte ``(l * block_rows + r % block_rows) * row_bytes`` of the transfer's block ``r // block_rows``.
That is the reference engine's cache layout (``[blocks, layers, block_size, *row]``), so rows land
where the engine reads them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import xxhash


class BlockRows:
    def __init__(
        self,
        blocks: Sequence[np.ndarray],
        block_rows: int,
        row_bytes: int,
        contiguous: np.ndarray | None = None,
    ) -> None:
        """``blocks``: each block's bytes (1-D uint8), in transfer order. ``contiguous``: the same
        blocks as one ``[blocks, stride]`` array, where they are mapped one after another (the
        sender), so runs of whole blocks are copied in one step."""
        self._blocks = blocks
        self._block_rows = block_rows
        self._row_bytes = row_bytes
        self._layer_bytes = block_rows * row_bytes
        self._contiguous = contiguous

    def pieces(self, layer: int, row_start: int, count: int) -> Iterator[tuple[int, np.ndarray]]:
        """(rows before it, its bytes) of each block-sized piece of rows ``[row_start, +count)``."""
        done = 0
        while done < count:
            block, within = divmod(row_start + done, self._block_rows)
            take = min(self._block_rows - within, count - done)
            start = layer * self._layer_bytes + within * self._row_bytes
            yield done, self._blocks[block][start : start + take * self._row_bytes]
            done += take

    def write(self, layer: int, row_start: int, rows: np.ndarray) -> None:
        """Copy the C-contiguous ``rows`` to rows ``[row_start, +len(rows))`` of ``layer``."""
        flat = rows.reshape(len(rows), -1).view(np.uint8)
        count, per = len(rows), self._block_rows
        whole = self._contiguous
        head = min(count, (-row_start) % per)
        if whole is None or count - head < per:
            for before, piece in self.pieces(layer, row_start, count):
                piece[:] = flat[before : before + len(piece) // self._row_bytes].reshape(-1)
            return
        if head:
            self.write(layer, row_start, rows[:head])
        first = (row_start + head) // per
        n = (count - head) // per
        start = layer * self._layer_bytes
        # n whole blocks: one strided copy (``[n, block_rows * row_bytes]`` at the block stride).
        runs = flat[head : head + n * per].reshape(n, -1)
        whole[first : first + n, start : start + self._layer_bytes] = runs
        if head + n * per < count:
            self.write(layer, row_start + head + n * per, rows[head + n * per :])

    def digest(self, layer: int, row_start: int, count: int) -> int:
        """The checksum (checksum.py) of those rows as if they were one contiguous array."""
        h = xxhash.xxh3_64()
        for _, piece in self.pieces(layer, row_start, count):
            h.update(piece)
        return h.intdigest()

    def views(
        self, layer: int, row_start: int, count: int, dtype: np.dtype, row_shape: tuple[int, ...]
    ) -> list[np.ndarray]:
        """Read-only typed views of those rows, a piece per block."""
        out = []
        for _, piece in self.pieces(layer, row_start, count):
            view = piece.view(dtype).reshape(-1, *row_shape)
            view.flags.writeable = False
            out.append(view)
        return out
