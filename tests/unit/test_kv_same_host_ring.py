"""The shared ring itself: private to its user, mapped only as offered, chunks packed in their place."""

from __future__ import annotations

import os
import stat

import msgspec
import numpy as np
import pytest

from transport.errors import ErrorCode, PdorchError
from transport.kv.checksum import checksum
from transport.kv.same_host.ring import ALIGN, MIN_SLOTS, PAGE_BYTES, Ring, place, slot_bytes_for


def test_a_ring_is_readable_and_writable_by_its_user_only() -> None:
    ring = Ring.create(3, PAGE_BYTES)
    try:
        mode = os.stat(f"/proc/self/fd/{ring.offer.fd}").st_mode
        assert stat.S_IMODE(mode) == 0o600
    finally:
        assert ring.close()


def test_attach_maps_only_the_ring_offered() -> None:
    ring = Ring.create(3, PAGE_BYTES)
    try:
        for wrong in (
            msgspec.structs.replace(ring.offer, inode=ring.offer.inode + 1),  # a recycled fd number
            msgspec.structs.replace(ring.offer, slots=4),  # not the size it claims
            msgspec.structs.replace(ring.offer, pid=2**22 + 1),  # no such process
        ):
            with pytest.raises(PdorchError) as e:
                Ring.attach(wrong)
            assert e.value.code == ErrorCode.CONFIG
        for implausible in (
            msgspec.structs.replace(ring.offer, slot_bytes=PAGE_BYTES + 1),  # unaligned
            msgspec.structs.replace(ring.offer, slots=MIN_SLOTS - 1),  # a sender could starve
        ):
            with pytest.raises(PdorchError):
                Ring.attach(implausible)
    finally:
        ring.close()


def test_what_the_sender_writes_the_receiver_reads_with_its_checksums() -> None:
    receiver_side = Ring.create(3, PAGE_BYTES)
    sender_side = Ring.attach(receiver_side.offer)
    try:
        rows = np.arange(8 * 256, dtype=np.float32).reshape(8, 256)  # 1 KiB rows: 4 per page
        digests = sender_side.write(PAGE_BYTES, rows[:4], checksum_rows=2)
        assert digests == [checksum(rows[:2]), checksum(rows[2:4])]
        seen = receiver_side.rows(PAGE_BYTES, 4, np.dtype(np.float32), (256,), 1024)
        assert np.array_equal(seen, rows[:4]) and not seen.flags.writeable
        assert not receiver_side.rows(0, 4, np.dtype(np.float32), (256,), 1024).any()  # untouched
        held = receiver_side.rows(PAGE_BYTES, 1, np.dtype(np.float32), (256,), 1024)
        assert not receiver_side.close()  # a live view keeps the mapping...
        del held, seen
        assert receiver_side.close()  # ...until it is gone
    finally:
        sender_side.close()


def test_nothing_is_written_or_read_outside_the_ring() -> None:
    ring = Ring.create(3, PAGE_BYTES)
    try:
        rows = np.ones((4, 256), np.float32)
        for offset in (-ALIGN, 2 * PAGE_BYTES + ALIGN, ALIGN // 2):  # past the end, or not aligned
            with pytest.raises(PdorchError):
                ring.write(offset, rows, checksum_rows=4)
    finally:
        assert ring.close()


def test_small_chunks_are_packed_large_ones_take_a_slot_and_none_is_split() -> None:
    slot, size = PAGE_BYTES, 3 * PAGE_BYTES
    assert place(0, 100, size, slot) == (0, 128, 128)  # aligned up to a cache line
    assert place(128, 1000, size, slot) == (128, 1024, 1152)
    assert place(size - 64, 64, size, slot) == (size - 64, 64, 0)  # ends exactly at the end
    # Does not fit before the end: starts over at 0, and the skipped tail is charged to it.
    assert place(size - 64, 1024, size, slot) == (0, 64 + 1024, 1024)
    # Half a slot or more: the next slot boundary, the whole slot, and the gap before it charged.
    assert place(128, slot // 2, size, slot) == (slot, slot - 128 + slot, 2 * slot)
    assert place(2 * slot + 64, slot, size, slot) == (0, slot - 64 + slot, slot)
    assert place(slot, slot, size, slot) == (slot, slot, 2 * slot)


def test_what_is_in_flight_never_overlaps_and_a_sender_never_starves() -> None:
    """Random chunk sizes up to a slot, small and large, credit as a receiver gives it (the ring at
    first, then back a quarter at a time as it empties chunks in order): the places of the chunks
    the receiver has not emptied never overlap, and a chunk's charge always fits the credit of an
    emptied ring."""
    rng = np.random.default_rng(5)
    for slots in (MIN_SLOTS, 4, 7):
        slot, size = 16 * ALIGN, slots * 16 * ALIGN
        cursor, available, returned, queue = 0, size, 0, []
        for _ in range(5_000):
            nbytes = int(rng.integers(1, slot + 1 if rng.random() < 0.3 else slot // 2))
            offset, charge, cursor = place(cursor, nbytes, size, slot)
            # Empty the oldest chunks until this one's charge is available, as a receiver would.
            while available < charge:
                assert queue, f"starved: {charge} needed, {available} available with nothing in flight"
                _, _, freed = queue.pop(0)
                returned += freed
                if returned >= size // 4:
                    available, returned = available + returned, 0
            available -= charge
            assert offset % ALIGN == 0 and offset + nbytes <= size
            for o, n, _ in queue:
                assert offset + nbytes <= o or o + n <= offset, "a chunk overwrote one not emptied yet"
            queue.append((offset, nbytes, charge))


def test_a_slot_holds_at_least_one_row_in_whole_pages() -> None:
    assert slot_bytes_for(4 * 1024 * 1024, 4096) == 4 * 1024 * 1024
    assert slot_bytes_for(1000, 5000) == 2 * PAGE_BYTES


def _fds_of(inode: int) -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.stat(f"/proc/self/fd/{fd}").st_ino == inode:
                found.append(fd)
        except OSError:
            continue
    return found


def test_a_sealed_ring_cannot_be_opened_and_still_carries_data() -> None:
    receiver_side = Ring.create(3, PAGE_BYTES)
    inode = receiver_side.offer.inode
    sender_side = Ring.attach(receiver_side.offer)
    try:
        assert len(_fds_of(inode)) == 2  # the receiver's fd and the one its mmap keeps; none for the sender
        receiver_side.seal()
        assert _fds_of(inode) == [] and receiver_side.offer.fd == -1
        with pytest.raises(PdorchError) as e:
            Ring.attach(receiver_side.offer)  # nobody can map it any more
        assert e.value.code == ErrorCode.CONFIG
        rows = np.full((4, 256), 7.0, np.float32)
        sender_side.write(0, rows, checksum_rows=4)
        assert np.array_equal(receiver_side.rows(0, 4, np.dtype(np.float32), (256,), 1024), rows)
    finally:
        sender_side.close()
        receiver_side.close()
