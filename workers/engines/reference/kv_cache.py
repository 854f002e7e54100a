"""The paged KV cache: fixed-size blocks, addressed through a per-sequence block table.

Each layer has one array ``[num_blocks, block_size, 2, kv_heads, head_dim]``. Rows are
token-major, so a sequence's KV for one layer is simply its blocks' rows laid end to end: the KV
plane moves it as ``[num_tokens, 2, kv_heads, head_dim]`` arrays via :meth:`gather` and
:meth:`scatter`.

A block may sit in several sequences' tables at once: a cached prompt prefix shared through the
prefix cache. Such a block is only ever read; the allocator decides who shares what.

Every value in the cache is finite (``scatter`` refuses anything else). The batched decode
attention relies on that: it pads block tables with arbitrary blocks and masks them out, and a
masked-out NaN would still poison ``0 * NaN``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from transport.errors import ErrorCode, PdorchError
from workers.engines.reference.block_allocator import BlockAllocator
from workers.engines.reference.config import ModelConfig

__all__ = ["BlockAllocator", "PagedKvCache"]


class PagedKvCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise PdorchError(
                ErrorCode.CONFIG,
                f"num_blocks and block_size must be positive, got {num_blocks} and {block_size}",
            )
        self.cfg = cfg
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.row_shape = cfg.kv_row_shape
        self.dtype = cfg.np_dtype
        self._layers = [
            np.zeros((num_blocks, block_size, *self.row_shape), dtype=self.dtype) for _ in range(cfg.layers)
        ]

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def bytes_per_block(self) -> int:
        return self.block_size * self.cfg.kv_bytes_per_token

    def layer_array(self, layer: int) -> np.ndarray:
        """The raw storage of one layer (the model writes and reads it in place)."""
        return self._layers[layer]

    def blocks_for(self, num_tokens: int) -> int:
        """How many blocks hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    def gather(self, layer: int, block_ids: Sequence[int], num_tokens: int) -> np.ndarray:
        """A contiguous copy of a sequence's first ``num_tokens`` KV rows in ``layer``."""
        needed = self.blocks_for(num_tokens)
        self._check_table(block_ids, needed, num_tokens)
        if num_tokens == 0:
            return np.empty((0, *self.row_shape), dtype=self.dtype)
        # Fancy indexing copies, and slicing the leading axis of that copy keeps it contiguous.
        blocks = self._layers[layer][np.asarray(block_ids[:needed], dtype=np.intp)]
        return blocks.reshape(-1, *self.row_shape)[:num_tokens]

    def scatter(self, layer: int, block_ids: Sequence[int], row_offset: int, rows: np.ndarray) -> None:
        """Write ``rows`` as rows ``[row_offset, row_offset + len(rows))`` of a sequence.

        Safe from another thread as long as no running sequence uses these blocks (the decode
        side fills reserved blocks before the sequence starts).
        """
        if rows.ndim != 4 or rows.shape[1:] != self.row_shape:
            raise PdorchError(
                ErrorCode.KV_CORRUPT,
                f"KV rows must be shaped [n, {', '.join(map(str, self.row_shape))}], got {list(rows.shape)}",
            )
        if rows.dtype != self.dtype:
            raise PdorchError(
                ErrorCode.KV_CORRUPT, f"KV rows are {rows.dtype}, this cache holds {self.dtype}"
            )
        if row_offset < 0:
            raise PdorchError(ErrorCode.KV_CORRUPT, f"negative KV row offset {row_offset}")
        end = row_offset + rows.shape[0]
        self._check_table(block_ids, self.blocks_for(end), end)
        if not np.isfinite(rows).all():
            raise PdorchError(ErrorCode.KV_CORRUPT, "KV rows contain NaN or infinity")
        storage = self._layers[layer]
        done = 0  # rows written so far; copy one block-sized (or shorter) span at a time
        while done < len(rows):
            block_index, offset = divmod(row_offset + done, self.block_size)
            span = min(self.block_size - offset, len(rows) - done)
            storage[block_ids[block_index], offset : offset + span] = rows[done : done + span]
            done += span

    def _check_table(self, block_ids: Sequence[int], needed: int, num_tokens: int) -> None:
        if num_tokens < 0:
            raise PdorchError(ErrorCode.INTERNAL, f"negative token count {num_tokens}")
        if len(block_ids) < needed:
            raise PdorchError(
                ErrorCode.KV_CORRUPT,
                f"{num_tokens} KV rows need {needed} blocks of {self.block_size}, table has {len(block_ids)}",
            )
        for block_id in block_ids[:needed]:
            if not 0 <= block_id < self.num_blocks:
                raise PdorchError(ErrorCode.KV_CORRUPT, f"block id {block_id} outside [0, {self.num_blocks})")
