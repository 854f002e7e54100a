"""The shared ring itself: private to its user, mapped only as offered, slots in the right place."""

from __future__ import annotations

import os
import stat

import msgspec
import numpy as np
import pytest

from transport.errors import ErrorCode, PdorchError
from transport.kv.checksum import checksum
from transport.kv.same_host.ring import PAGE_BYTES, Ring, slot_bytes_for


def test_a_ring_is_readable_and_writable_by_its_user_only() -> None:
    ring = Ring.create(2, PAGE_BYTES)
    try:
        mode = os.stat(f"/proc/self/fd/{ring.offer.fd}").st_mode
        assert stat.S_IMODE(mode) == 0o600
    finally:
        assert ring.close()


def test_attach_maps_only_the_ring_offered() -> None:
    ring = Ring.create(2, PAGE_BYTES)
    try:
        for wrong in (
            msgspec.structs.replace(ring.offer, inode=ring.offer.inode + 1),  # a recycled fd number
            msgspec.structs.replace(ring.offer, slots=3),  # not the size it claims
            msgspec.structs.replace(ring.offer, pid=2**22 + 1),  # no such process
        ):
            with pytest.raises(PdorchError) as e:
                Ring.attach(wrong)
            assert e.value.code == ErrorCode.CONFIG
        with pytest.raises(PdorchError):
            Ring.attach(msgspec.structs.replace(ring.offer, slot_bytes=PAGE_BYTES + 1))  # unaligned
    finally:
        ring.close()


def test_what_the_sender_writes_the_receiver_reads_with_its_checksums() -> None:
    receiver_side = Ring.create(3, PAGE_BYTES)
    sender_side = Ring.attach(receiver_side.offer)
    try:
        rows = np.arange(8 * 256, dtype=np.float32).reshape(8, 256)  # 1 KiB rows: 4 per page
        digests = sender_side.write(4, rows[:4], checksum_rows=2)  # chunk 4 -> slot 1
        assert digests == [checksum(rows[:2]), checksum(rows[2:4])]
        seen = receiver_side.rows(4, 4, np.dtype(np.float32), (256,), 1024)
        assert np.array_equal(seen, rows[:4]) and not seen.flags.writeable
        assert not receiver_side.rows(3, 4, np.dtype(np.float32), (256,), 1024).any()  # slot 0: untouched
        held = receiver_side.rows(4, 1, np.dtype(np.float32), (256,), 1024)
        assert not receiver_side.close()  # a live view keeps the mapping...
        del held, seen
        assert receiver_side.close()  # ...until it is gone
    finally:
        sender_side.close()


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
    receiver_side = Ring.create(2, PAGE_BYTES)
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
