"""The sender's side of lent blocks: the blocks a receiver lent one transfer, mapped one after
another into a range of the sender's own, written in place, unmapped when the transfer closes.

Nothing is kept between transfers: the next transfer's blocks are other blocks (and a block
goes to other requests once this one is done), so a sender reaches a block only while it fills it.
"""

from __future__ import annotations

import mmap
import os

import numpy as np

from transport.errors import ErrorCode, PdorchError
from transport.kv.checksum import checksum
from transport.kv.messages import KvShmBlocks
from transport.kv.same_host.block_rows import BlockRows
from transport.kv.same_host.fixed_map import huge_page_bytes, map_over, reserve
from transport.kv.same_host.offered_fd import open_offered

# Rows per announced chunk, in bytes: as a ring slot, few messages per transfer while the receiver
# verifies one chunk as the next is written.
CHUNK_BYTES = 4 * 1024 * 1024


def blocks_needed(rows_per_layer: int, block_rows: int) -> int:
    return -(-rows_per_layer // block_rows)


def check_offer(offer: KvShmBlocks, num_layers: int, rows_per_layer: int, row_bytes: int) -> None:
    """``BAD_MESSAGE`` unless the offer fits the transfer exactly: one block per ``block_rows`` rows,
    each at least the rows' bytes and less than a page more (a page of this system, or a huge
    page), so a hostile receiver cannot make the sender map more than the transfer's own size."""
    block_bytes = num_layers * offer.block_rows * row_bytes if offer.block_rows > 0 else 0
    if (
        block_bytes <= 0
        or offer.page_bytes not in (mmap.PAGESIZE, huge_page_bytes())
        or offer.stride % offer.page_bytes
        or not block_bytes <= offer.stride < block_bytes + offer.page_bytes
        or len(offer.fds) != len(offer.inodes)
        or len(offer.fds) != blocks_needed(rows_per_layer, offer.block_rows)
    ):
        raise PdorchError(ErrorCode.BAD_MESSAGE, "implausible shared KV blocks offered")


class MappedBlocks:
    def __init__(self, mm: mmap.mmap, memory: np.ndarray, block_rows: int, row_bytes: int) -> None:
        self._mm = mm
        self._rows: BlockRows | None = BlockRows(list(memory), block_rows, row_bytes, contiguous=memory)
        self.closed = False

    @classmethod
    def attach(cls, offer: KvShmBlocks, num_layers: int, rows_per_layer: int, row_bytes: int) -> MappedBlocks:
        """Map the offered blocks; ``BAD_MESSAGE`` for an offer that does not fit the transfer,
        ``CONFIG`` if a block cannot be reached or is not the one offered."""
        check_offer(offer, num_layers, rows_per_layer, row_bytes)
        stride = offer.stride
        mm, base, start = reserve(len(offer.fds) * stride, offer.page_bytes)
        try:
            for i, (fd, inode) in enumerate(zip(offer.fds, offer.inodes, strict=True)):
                own = open_offered(offer.pid, fd, inode, stride, "shared KV block")
                try:
                    # Populated at once: one call per block instead of a fault per page of the copy.
                    map_over(base + i * stride, stride, own, populate=True)
                except OSError as e:
                    raise PdorchError(ErrorCode.CONFIG, f"cannot map a shared KV block: {e}") from None
                finally:
                    os.close(own)  # the mapping keeps the pages; no fd is left behind
        except BaseException:
            mm.close()
            raise
        size = len(offer.fds) * stride
        memory = np.frombuffer(mm, dtype=np.uint8)[start : start + size].reshape(len(offer.fds), stride)
        return cls(mm, memory, offer.block_rows, row_bytes)

    def write(self, layer: int, row_offset: int, rows: np.ndarray, checksum_rows: int) -> list[int]:
        """Copy the C-contiguous ``rows`` into place; return the checksum of each span of
        ``checksum_rows`` rows, each hashed right before its copy (which then reads it from cache)."""
        assert self._rows is not None, "written after close"
        digests = []
        for start in range(0, rows.shape[0], checksum_rows):
            span = rows[start : start + checksum_rows]
            digests.append(checksum(span))
            self._rows.write(layer, row_offset + start, span)
        return digests

    def close(self) -> bool:
        """Unmap; False while a view of the blocks is still alive (call again later)."""
        self.closed = True
        self._rows = None
        try:
            self._mm.close()
        except BufferError:
            return False
        return True
