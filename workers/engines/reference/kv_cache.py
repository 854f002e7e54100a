"""The paged KV cache: fixed-size blocks, addressed through a per-sequence block table.

One array ``[num_blocks, layers, block_size, 2, kv_heads, head_dim]`` holds it all: a block keeps
every layer's rows, layer after layer, so a block is one span of memory (what a same-host sender
is lent whole, ``transport/kv/same_host/block_pool.py``). Each layer is a view
``[num_blocks, block_size, 2, kv_heads, head_dim]`` of it. Rows are token-major, so a sequence's
KV for one layer is simply its blocks' rows laid end to end: the KV plane moves it as
``[num_tokens, 2, kv_heads, head_dim]`` arrays via :meth:`gather` and :meth:`scatter`.

With ``shared``, the blocks live in a shared block pool (each in a memfd of its own) instead of
private memory, so the KV plane can lend a transfer's blocks to a sender on this host.

A block may sit in several sequences' tables at once: a cached prompt prefix shared through the
prefix cache. Such a block is only ever read; the allocator decides who shares what.

Every value in the cache is finite (``scatter`` refuses anything else). The batched decode
attention relies on that: it pads block tables with arbitrary blocks and masks them out, and a
masked-out NaN would still poison ``0 * NaN``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from transport.errors import ErrorCode, PdorchError
from transport.kv.same_host.block_pool import BlockPool, LentBlocks
from workers.engines.reference.block_allocator import BlockAllocator
from workers.engines.reference.config import ModelConfig

__all__ = ["BlockAllocator", "PagedKvCache"]

log = logging.getLogger(__name__)


class PagedKvCache:
    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, *, shared: bool = False) -> None:
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
        shape = (num_blocks, cfg.layers, block_size, *self.row_shape)
        self.pool: BlockPool | None = None
        if shared:
            try:
                self.pool = BlockPool(num_blocks, self.bytes_per_block)
            except OSError as e:
                log.warning("KV blocks in private memory (same-host senders get a ring instead): %s", e)
        if self.pool is None:
            self._blocks = np.zeros(shape, dtype=self.dtype)
        else:
            # The pool's blocks sit a page-aligned stride apart; within one, the layout is C order.
            row_bytes = cfg.kv_bytes_per_token // cfg.layers
            row_strides = np.empty((1, *self.row_shape), dtype=self.dtype).strides[1:]
            strides = (self.pool.stride, block_size * row_bytes, row_bytes, *row_strides)
            self._blocks = np.ndarray(shape, dtype=self.dtype, buffer=self.pool.memory, strides=strides)
        self._layers = [self._blocks[:, layer] for layer in range(cfg.layers)]

    def close(self) -> None:
        """Let go of the storage (a shared pool's memfds close now, its memory with the last view)."""
        self._layers = []
        self._blocks = np.empty((0,), dtype=self.dtype)
        if self.pool is not None:
            self.pool.close()

    @property
    def num_layers(self) -> int:
        return self.cfg.layers

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
        self.check_finite([rows])
        storage = self._layers[layer]
        done = 0  # rows written so far; copy one block-sized (or shorter) span at a time
        while done < len(rows):
            block_index, offset = divmod(row_offset + done, self.block_size)
            span = min(self.block_size - offset, len(rows) - done)
            storage[block_ids[block_index], offset : offset + span] = rows[done : done + span]
            done += span

    def lend(self, block_ids: Sequence[int], num_tokens: int) -> LentBlocks:
        """The blocks that hold a sequence's first ``num_tokens`` rows, lent to a same-host sender
        to write them in place (a shared pool only). What the last one holds past those rows (a
        former owner's KV) is cleared first: the sender sees nothing but its own rows."""
        assert self.pool is not None, "lent from private memory"
        needed = self.blocks_for(num_tokens)
        self._check_table(block_ids, needed, num_tokens)
        ids = list(block_ids[:needed])
        if ids:
            self._blocks[ids[-1], :, num_tokens - (needed - 1) * self.block_size :] = 0
        return self.pool.lend(ids, self.block_size, self.cfg.kv_bytes_per_token // self.cfg.layers)

    @staticmethod
    def check_finite(rows: Sequence[np.ndarray]) -> None:
        """Refuse rows that hold NaN or infinity (see the module's docstring)."""
        if not all(np.isfinite(piece).all() for piece in rows):
            raise PdorchError(ErrorCode.KV_CORRUPT, "KV rows contain NaN or infinity")

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
