"""The broker's store: transfers held until a decode agent took them, bounded in bytes and time.

Bytes are reserved for a whole transfer when it begins (its size is known from the begin
message), so a full store refuses new transfers up front instead of failing them half-way. One
sender (``owner``: a connection) may hold at most ``max_owner_bytes`` of it, so a sender that
reserves and never sends, or whose transfers nobody fetches, cannot lock the others out. Stored
rows are the received frames themselves (no copy); a fetch may read an entry while it is still
arriving (the broker forwards chunks as they come). An entry leaves the store when a fetcher
confirmed it (delivered), when its TTL passed with no fetch in progress (evicted), or when its
inbound transfer failed. A bounded record of recently removed ids lets a late fetch be told why
(its tombstone) instead of waiting out its deadline.
"""

from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict
from collections.abc import Callable

import msgspec
import numpy as np

from transport.errors import ErrorCode, PdorchError
from transport.kv.deadline import Deadline
from transport.kv.messages import KvBegin

MAX_TOMBSTONES = 4096


class StoredChunk(msgspec.Struct, gc=False, frozen=True):
    layer: int
    row_offset: int
    rows: np.ndarray
    checksums: list[int]


class Tombstone(msgspec.Struct, gc=False, frozen=True):
    code: ErrorCode
    message: str


class KvEntry:
    """One stored transfer; also the (checksummed) sink its inbound transfer writes to."""

    def __init__(self, begin: KvBegin, size_bytes: int, created_at: float, owner: bytes = b"") -> None:
        self.begin = begin
        self.size_bytes = size_bytes
        self.owner = owner
        self.created_at = created_at
        self.chunks: list[StoredChunk] = []
        self.trailer: dict[str, int | str] = {}
        self.complete = False
        self.error: PdorchError | None = None  # the inbound transfer failed
        self.active_fetches = 0
        # Resolved (and replaced) on every change, so any number of fetches can wait for the next one.
        self._changed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def transfer_id(self) -> str:
        return self.begin.transfer_id

    def write_checksummed(self, layer: int, row_offset: int, rows: np.ndarray, checksums: list[int]) -> None:
        self.chunks.append(StoredChunk(layer, row_offset, rows, checksums))
        self._notify()

    def finish(self, trailer: dict[str, int | str]) -> None:
        self.trailer = trailer
        self.complete = True
        self._notify()

    def fail(self, error: PdorchError) -> None:
        self.error = error
        self._notify()

    def _notify(self) -> None:
        self._changed.set_result(None)
        self._changed = asyncio.get_running_loop().create_future()

    async def wait_for_change(self, deadline: Deadline) -> None:
        """Until the next chunk arrives or the inbound transfer ends."""
        await deadline.wait(asyncio.shield(self._changed), f"more of transfer {self.transfer_id}")


class KvStore:
    def __init__(
        self, capacity_bytes: int, ttl_s: float, clock: Callable[[], float], max_owner_bytes: int = 0
    ) -> None:
        """``max_owner_bytes``: what one owner may hold (0: the whole capacity)."""
        self.capacity_bytes = capacity_bytes
        self.max_owner_bytes = max_owner_bytes or capacity_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, KvEntry] = {}
        self._tombstones: OrderedDict[str, Tombstone] = OrderedDict()
        self._by_owner: Counter[bytes] = Counter()
        self.used_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, transfer_id: str) -> KvEntry | None:
        return self._entries.get(transfer_id)

    def tombstone(self, transfer_id: str) -> Tombstone | None:
        return self._tombstones.get(transfer_id)

    def reserve(self, begin: KvBegin, size_bytes: int, owner: bytes = b"") -> KvEntry:
        """A new entry holding ``size_bytes`` for ``owner``; ``KV_REJECTED`` if it is a duplicate or
        does not fit (in the store, or in the owner's share of it)."""
        tid = begin.transfer_id
        if tid in self._entries:
            raise PdorchError(ErrorCode.KV_REJECTED, f"transfer {tid} is already held")
        if self.used_bytes + size_bytes > self.capacity_bytes:
            free = self.capacity_bytes - self.used_bytes
            raise PdorchError(
                ErrorCode.KV_REJECTED, f"broker full: transfer needs {size_bytes} bytes, {free} free"
            )
        held = self._by_owner[owner]
        if held + size_bytes > self.max_owner_bytes:
            raise PdorchError(
                ErrorCode.KV_REJECTED,
                f"this sender holds {held} bytes; {size_bytes} more would pass its share of "
                f"{self.max_owner_bytes}",
            )
        entry = self._entries[tid] = KvEntry(begin, size_bytes, self._clock(), owner)
        self._tombstones.pop(tid, None)
        self.used_bytes += size_bytes
        self._by_owner[owner] += size_bytes
        return entry

    def held_by(self, owner: bytes) -> int:
        return self._by_owner.get(owner, 0)

    def remove(self, transfer_id: str, code: ErrorCode, message: str) -> None:
        entry = self._entries.pop(transfer_id, None)
        if entry is None:
            return
        self.used_bytes -= entry.size_bytes
        self._by_owner[entry.owner] -= entry.size_bytes
        if self._by_owner[entry.owner] <= 0:
            del self._by_owner[entry.owner]
        self.remember(transfer_id, code, message)

    def remember(self, transfer_id: str, code: ErrorCode, message: str) -> None:
        """Record why ``transfer_id`` is not (or no longer) held, for a fetch that comes later."""
        self._tombstones[transfer_id] = Tombstone(code, message)
        self._tombstones.move_to_end(transfer_id)
        while len(self._tombstones) > MAX_TOMBSTONES:
            self._tombstones.popitem(last=False)

    def expired(self) -> list[KvEntry]:
        """Entries past their TTL that no fetch is reading right now."""
        cutoff = self._clock() - self.ttl_s
        return [e for e in self._entries.values() if e.created_at <= cutoff and e.active_fetches == 0]
