"""A decode engine's KV blocks in shared memory, each lendable on its own to a same-host sender.

Each block is a memfd of its own (mode 0600, no name in any file system), and the blocks are
mapped one after another into one range of this process, so the engine sees a single
``[blocks, stride]`` array and never knows. A same-host transfer is lent exactly the blocks it
fills (:meth:`BlockPool.lend`); its sender maps those and writes every row straight into place:
one copy, where the ring costs two.

Why a memfd per block and not one for the pool: a sender that opens a memfd can map all of it,
so only per-block memfds let a transfer reach its own blocks and nothing else. The pool keeps
their fds open (it lends them again, to other transfers), so the decode's own user can open any
of them through ``/proc/<pid>/fd``, as it can the ring before it is sealed; no other user can.

A block a transfer was lent is *retired* if that transfer fails (:meth:`BlockPool.retire`): its
memfd is replaced by a new one, so a sender that is still writing (it has not heard of the
failure yet) writes into pages no block uses any more, never into the next owner's KV. The old
pages go with the sender's mapping. A successful sender has written everything before it sent
its end, and unmaps the blocks when the transfer closes.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import resource
import threading
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from transport.kv.messages import KvShmBlocks
from transport.kv.same_host.block_rows import BlockRows
from transport.kv.same_host.fixed_map import huge_page_bytes, map_over, reserve

log = logging.getLogger(__name__)

BLOCK_MEMFD_NAME = "pdorch-blocks"
# Open files left for everything else a decode process holds (sockets, libraries, rings).
FD_HEADROOM = 1024


class LentBlocks(NamedTuple):
    offer: KvShmBlocks
    rows: BlockRows


def stride_for(block_bytes: int, page_bytes: int = mmap.PAGESIZE) -> int:
    """Each block starts on a page: a memfd maps at page granularity."""
    return -(-block_bytes // page_bytes) * page_bytes


def _new_block(stride: int, huge: bool) -> tuple[int, int]:
    fd = os.memfd_create(BLOCK_MEMFD_NAME, os.MFD_CLOEXEC | (os.MFD_HUGETLB if huge else 0))
    try:
        os.fchmod(fd, 0o600)  # memfds start at 0777; only the owner may open it anyway
        os.ftruncate(fd, stride)  # pages come on first touch, as the engine's own memory would
        return fd, os.fstat(fd).st_ino
    except BaseException:
        os.close(fd)
        raise


def _fd_budget(blocks: int) -> None:
    """Raise the soft limit on open files far enough for ``blocks`` more, or OSError."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = len(os.listdir("/proc/self/fd")) + blocks + FD_HEADROOM
    if soft != resource.RLIM_INFINITY and soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            raise OSError(f"{blocks} shared KV blocks need {need} open files; the limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


class BlockPool:
    def __init__(self, count: int, block_bytes: int, *, huge: bool = False) -> None:
        """``count`` blocks of ``block_bytes`` each (stored at a page-aligned stride), in huge pages
        with ``huge``. Raises OSError where memfds, enough open files or (``huge``) enough free huge
        pages are not available."""
        self.count = count
        self.block_bytes = block_bytes
        self.huge = huge
        self.page_bytes = huge_page_bytes() if huge else mmap.PAGESIZE
        if not self.page_bytes:
            raise OSError("this host has no huge pages")
        self.stride = stride_for(block_bytes, self.page_bytes)
        _fd_budget(count)
        reserved = reserve(count * self.stride, self.page_bytes)
        self._mm, self._base = reserved.mm, reserved.address
        self._fds: list[int] = []
        self._inodes: list[int] = []
        self._lock = threading.Lock()  # lending (the KV plane's thread) against retiring
        try:
            for i in range(count):
                fd, inode = _new_block(self.stride, huge)
                self._fds.append(fd)
                self._inodes.append(inode)
                map_over(self._base + i * self.stride, self.stride, fd)
        except BaseException:
            self.close()
            raise
        self._pid = os.getpid()
        whole = np.frombuffer(self._mm, dtype=np.uint8)
        start = reserved.offset
        self.memory: np.ndarray = whole[start : start + count * self.stride].reshape(count, self.stride)

    def lend(self, block_ids: Sequence[int], block_rows: int, row_bytes: int) -> LentBlocks:
        """``block_ids`` (in transfer order) lent to a transfer: their offer to the sender, ``block_rows``
        rows of each layer per block, and where its rows will be."""
        with self._lock:
            offer = KvShmBlocks(
                pid=self._pid,
                block_rows=block_rows,
                stride=self.stride,
                page_bytes=self.page_bytes,
                fds=[self._fds[b] for b in block_ids],
                inodes=[self._inodes[b] for b in block_ids],
            )
        return LentBlocks(offer, BlockRows([self.memory[b] for b in block_ids], block_rows, row_bytes))

    def retire(self, block_ids: Sequence[int]) -> None:
        """Give each block fresh pages (zeros) behind the same addresses; its old memfd is closed
        here, and its pages go once no sender maps them. Raises OSError if a block could not be
        replaced (it then keeps its old pages)."""
        with self._lock:
            if not self._fds:  # closed: no block is lent again
                return
            for b in block_ids:
                fd, inode = _new_block(self.stride, self.huge)
                address = self._base + b * self.stride
                try:
                    map_over(address, self.stride, fd)
                except OSError:
                    os.close(fd)
                    map_over(address, self.stride, self._fds[b])  # never leave a hole behind
                    raise
                old, self._fds[b], self._inodes[b] = self._fds[b], fd, inode
                os.close(old)

    def close(self) -> None:
        """Close every block's memfd; the memory goes with the last view of it (the engine's)."""
        with self._lock:
            for fd in self._fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._fds.clear()
            self.memory = np.empty((0, self.stride), dtype=np.uint8)
            with contextlib.suppress(BufferError):
                self._mm.close()
