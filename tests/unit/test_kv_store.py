"""The broker's store: byte capacity, tombstones, TTL expiry."""

from __future__ import annotations

import numpy as np
import pytest

from transport.errors import ErrorCode, PdorchError
from transport.kv.messages import KV_PROTOCOL_VERSION, KvBegin
from transport.kv.store import MAX_TOMBSTONES, KvStore


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _begin(tid: str) -> KvBegin:
    return KvBegin(KV_PROTOCOL_VERSION, tid, 1, 1, [1], "uint8", 1 << 16)


async def test_capacity_is_reserved_up_front_and_freed_on_removal() -> None:
    store = KvStore(capacity_bytes=100, ttl_s=10, clock=FakeClock())
    store.reserve(_begin("a"), 60)
    with pytest.raises(PdorchError) as info:
        store.reserve(_begin("b"), 41)
    assert info.value.code is ErrorCode.KV_REJECTED
    store.reserve(_begin("b"), 40)
    assert store.used_bytes == 100 and len(store) == 2
    store.remove("a", ErrorCode.KV_REJECTED, "delivered")
    assert store.used_bytes == 40 and store.get("a") is None
    tomb = store.tombstone("a")
    assert tomb is not None and tomb.message == "delivered"


async def test_duplicate_transfer_is_refused() -> None:
    store = KvStore(capacity_bytes=100, ttl_s=10, clock=FakeClock())
    store.reserve(_begin("a"), 1)
    with pytest.raises(PdorchError):
        store.reserve(_begin("a"), 1)


async def test_expired_skips_entries_being_fetched() -> None:
    clock = FakeClock()
    store = KvStore(capacity_bytes=100, ttl_s=10, clock=clock)
    a = store.reserve(_begin("a"), 1)
    store.reserve(_begin("b"), 1)
    clock.now += 10
    a.active_fetches = 1
    assert [e.transfer_id for e in store.expired()] == ["b"]


async def test_entry_keeps_written_rows_in_order() -> None:
    store = KvStore(capacity_bytes=100, ttl_s=10, clock=FakeClock())
    entry = store.reserve(_begin("a"), 2)
    entry.write_checksummed(0, 0, np.zeros((1, 1), np.uint8), [11])
    entry.write_checksummed(0, 1, np.ones((1, 1), np.uint8), [22])
    stored = [(c.layer, c.row_offset, int(c.rows[0, 0]), c.checksums) for c in entry.chunks]
    assert stored == [(0, 0, 0, [11]), (0, 1, 1, [22])]


async def test_tombstones_are_bounded() -> None:
    store = KvStore(capacity_bytes=10**9, ttl_s=10, clock=FakeClock())
    for i in range(MAX_TOMBSTONES + 10):
        store.reserve(_begin(str(i)), 1)
        store.remove(str(i), ErrorCode.KV_TIMEOUT, "gone")
    assert store.tombstone("0") is None
    assert store.tombstone(str(MAX_TOMBSTONES + 9)) is not None
