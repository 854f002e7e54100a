"""Exact, thread-safe accounting of fixed-size KV blocks.

The engine thread allocates as sequences grow while the agent's event loop reserves blocks for
incoming KV transfers, so every operation holds one lock. Allocation is all-or-nothing: a caller
either gets every block it asked for or none, so a failed request never leaks a partial table.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from transport.errors import ErrorCode, PdorchError


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks <= 0:
            raise PdorchError(ErrorCode.CONFIG, f"num_blocks must be positive, got {num_blocks}")
        self._num_total = num_blocks
        self._lock = threading.Lock()
        # A stack popped from the end; reversed so low ids go out first (easier to read in logs).
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._used: set[int] = set()

    @property
    def num_total(self) -> int:
        return self._num_total

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)

    @property
    def num_used(self) -> int:
        with self._lock:
            return len(self._used)

    def allocate(self, n: int) -> list[int]:
        if n < 0:
            raise PdorchError(ErrorCode.INTERNAL, f"cannot allocate a negative number of blocks ({n})")
        with self._lock:
            if n > len(self._free):
                raise PdorchError(
                    ErrorCode.OUT_OF_BLOCKS,
                    f"need {n} KV blocks, {len(self._free)} of {self._num_total} free",
                )
            ids = [self._free.pop() for _ in range(n)]
            self._used.update(ids)
            return ids

    def try_allocate(self, n: int) -> list[int] | None:
        """Like :meth:`allocate` but returns None instead of raising when blocks are short."""
        try:
            return self.allocate(n)
        except PdorchError as err:
            if err.code is ErrorCode.OUT_OF_BLOCKS:
                return None
            raise

    def free(self, ids: Iterable[int]) -> None:
        ids = list(ids)
        with self._lock:
            # Validate everything before changing anything, so a bad call leaves exact accounting.
            if len(set(ids)) != len(ids):
                raise PdorchError(ErrorCode.INTERNAL, f"block freed twice in one call: {sorted(ids)}")
            not_used = [i for i in ids if i not in self._used]
            if not_used:
                raise PdorchError(
                    ErrorCode.INTERNAL, f"freeing KV blocks that are not allocated (double free?): {not_used}"
                )
            self._used.difference_update(ids)
            self._free.extend(reversed(ids))
