"""A ring buffer in a memfd, shared by the receiver that created it and one sender.

The receiver creates it (:meth:`Ring.create`) and offers it in its ``KvAccept``; the sender maps
the same pages (:meth:`Ring.attach`) and keeps no fd of it. Once the sender's first chunk shows it
mapped the ring, the receiver drops its fds too (:meth:`Ring.seal`): from then on no process can
open the ring, only the two mappings reach it.

A transfer's small chunks are packed one after another from the start of the ring, its chunks of
half a slot or more each take a whole slot (:func:`place`, which both sides run on the same chunk
sizes, so the chunk messages need no offset): a chunk that would run past the end starts over at
0, and what it skips is charged to it. Each chunk is charged its place in credit (with what it
skipped), the window is the ring, and chunks arrive in order, so the bytes the sender may have
written and the receiver not yet emptied never exceed the ring: a place is written only once
emptied. At most one slot (``slot_bytes``) per chunk; a short prompt's small layers are then in
flight together instead of one per slot.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat

import msgspec
import numpy as np

from transport.errors import ErrorCode, PdorchError
from transport.kv.checksum import checksum
from transport.kv.messages import KvShmRing

PAGE_BYTES = 4096
MEMFD_NAME = "pdorch-kv"
# Each chunk starts on a cache line.
ALIGN = 64
# With a chunk at most one slot, a chunk's charge (what it skips + itself) stays under two slots;
# from three slots on, that is under the three quarters of the window a receiver always gives back
# once it has emptied everything (it re-grants by quarters), so a sender never waits for credit
# that cannot come.
MIN_SLOTS = 3


def place(cursor: int, nbytes: int, size: int, slot: int) -> tuple[int, int, int]:
    """Where a chunk of ``nbytes`` (at most ``slot``) goes in a ring of ``size`` bytes (whole
    slots) whose next free place is ``cursor``: (its offset, the credit it takes, the next cursor)."""
    aligned = -(-nbytes // ALIGN) * ALIGN
    if 2 * aligned >= slot:
        # A large chunk takes a whole slot: packing gains it nothing, and a transfer of large
        # chunks then touches as few of the ring's pages as it has chunks in flight (packed, it
        # would sweep the whole ring, which measured 5-10% slower at 512 tokens).
        start = -(-cursor // slot) * slot
        return start % size, start - cursor + slot, (start + slot) % size
    if cursor + aligned <= size:
        return cursor, aligned, (cursor + aligned) % size
    return 0, size - cursor + aligned, aligned % size


def _fds_of(target: os.stat_result) -> set[int]:
    """This process's fds open on the file ``target`` describes."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            st = os.fstat(int(name))
        except OSError:
            continue
        if (st.st_ino, st.st_dev) == (target.st_ino, target.st_dev):
            found.add(int(name))
    return found


def _map(fd: int, size: int) -> tuple[mmap.mmap, int | None]:
    """Map ``fd`` whole; also return the fd Python's mmap keeps for itself (a dup it does not
    expose before Python 3.13), found as the one that appeared, so it can be dropped later."""
    target = os.fstat(fd)
    before = _fds_of(target)
    mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    new = _fds_of(target) - before
    return mm, (new.pop() if len(new) == 1 else None)


def _point_at_null(fd: int) -> None:
    """Make ``fd`` refer to /dev/null: whoever owns the number (the mmap object) may still close it,
    but it no longer reaches the ring."""
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        os.dup2(null, fd, inheritable=False)
    finally:
        os.close(null)


def slot_bytes_for(configured: int, row_bytes: int) -> int:
    """A slot of about ``configured`` bytes that holds at least one row, in whole pages (so every
    slot is aligned for any dtype)."""
    want = max(configured, row_bytes)
    return -(-want // PAGE_BYTES) * PAGE_BYTES


class Ring:
    def __init__(self, mm: mmap.mmap, offer: KvShmRing, fd: int | None, mmap_fd: int | None) -> None:
        self.offer = offer
        self.slots = offer.slots
        self.slot_bytes = offer.slot_bytes
        self.size = offer.slots * offer.slot_bytes
        self._mm = mm
        self._fd = fd  # the receiver keeps its fd open until sealed: the sender reaches the ring through it
        self._mmap_fd = mmap_fd
        self._bytes: np.ndarray = np.frombuffer(mm, dtype=np.uint8)
        self.closed = False

    @classmethod
    def create(cls, slots: int, slot_bytes: int) -> Ring:
        """A new ring, its pages allocated now (not on the first chunk's critical path). Raises
        OSError where memfds are not available or memory is short."""
        if slots < MIN_SLOTS:
            raise ValueError(f"a shared KV ring needs at least {MIN_SLOTS} slots, not {slots}")
        size = slots * slot_bytes
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        try:
            os.fchmod(fd, 0o600)  # memfds start at 0777; only the owner may open it anyway
            os.ftruncate(fd, size)
            mm, mmap_fd = _map(fd, size)
            inode = os.fstat(fd).st_ino
            offer = KvShmRing(pid=os.getpid(), fd=fd, inode=inode, slots=slots, slot_bytes=slot_bytes)
        except BaseException:
            os.close(fd)
            raise
        return cls(mm, offer, fd, mmap_fd)

    @classmethod
    def attach(cls, offer: KvShmRing) -> Ring:
        """Map the ring a receiver offered; ``CONFIG`` if it cannot be reached or is not what the
        offer says (another host, another user, a recycled fd number, a sealed ring)."""
        size = offer.slots * offer.slot_bytes
        if offer.slots < MIN_SLOTS or offer.slot_bytes <= 0 or offer.slot_bytes % PAGE_BYTES:
            raise PdorchError(ErrorCode.BAD_MESSAGE, f"implausible shared KV ring {offer}")
        if offer.fd < 0:
            raise PdorchError(ErrorCode.CONFIG, "the shared KV ring is sealed and not mapped here any more")
        try:
            fd = os.open(f"/proc/{offer.pid}/fd/{offer.fd}", os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise PdorchError(ErrorCode.CONFIG, f"cannot open the receiver's shared KV ring: {e}") from None
        try:
            st = os.fstat(fd)
            if (
                not stat.S_ISREG(st.st_mode)
                or st.st_ino != offer.inode
                or st.st_size != size
                or st.st_uid != os.getuid()
                or stat.S_IMODE(st.st_mode) & 0o077
            ):
                raise PdorchError(ErrorCode.CONFIG, "the receiver's shared KV ring is not the one offered")
            mm, mmap_fd = _map(fd, size)
            if mmap_fd is not None:
                _point_at_null(mmap_fd)
        except OSError as e:
            raise PdorchError(ErrorCode.CONFIG, f"cannot map the receiver's shared KV ring: {e}") from None
        finally:
            os.close(fd)  # the mapping keeps the pages; no fd is left behind
        return cls(mm, offer, None, None)

    def seal(self) -> None:
        """Receiver, once the sender mapped the ring: close every fd of it here, so that no other
        process can open it any more. Offered again (to the same sender), it names no fd."""
        if self._fd is None:
            return
        if self._mmap_fd is not None:
            _point_at_null(self._mmap_fd)
            self._mmap_fd = None
        os.close(self._fd)
        self._fd = None
        self.offer = msgspec.structs.replace(self.offer, fd=-1)

    def _at(self, offset: int, nbytes: int) -> np.ndarray:
        if offset < 0 or offset + nbytes > self.size or offset % ALIGN:
            raise PdorchError(ErrorCode.INTERNAL, f"{nbytes} bytes at {offset} do not fit the shared ring")
        return self._bytes[offset : offset + nbytes]

    def write(self, offset: int, rows: np.ndarray, checksum_rows: int) -> list[int]:
        """Sender: copy the C-contiguous ``rows`` to ``offset`` (from :func:`place`); return the
        checksum of each span of ``checksum_rows`` rows, each hashed from ``rows`` (so a place
        corrupted later fails the receiver's check) right after its copy: the copy reads the span
        from memory and the hash from cache, ~4% faster end to end at 512 tokens than hashing
        first (in-process A/B, bench/kv_handoff.py's shape)."""
        dst = self._at(offset, rows.nbytes).view(rows.dtype).reshape(rows.shape)
        digests = []
        for start in range(0, rows.shape[0], checksum_rows):
            span = rows[start : start + checksum_rows]
            dst[start : start + checksum_rows] = span
            digests.append(checksum(span))
        return digests

    def rows(
        self, offset: int, count: int, dtype: np.dtype, row_shape: tuple[int, ...], row_bytes: int
    ) -> np.ndarray:
        """Receiver: a read-only view of ``count`` rows at ``offset``. The place is reused once its
        credit is returned: whoever keeps the rows must copy them."""
        view = self._at(offset, count * row_bytes).view(dtype).reshape(count, *row_shape)
        view.flags.writeable = False
        return view

    def close(self) -> bool:
        """Unmap (and, on the receiver, close the fd); the pages go when no process maps them. False
        while a view of a slot is still alive (e.g. in the frame that failed the transfer): call
        again later; True once unmapped."""
        if not self.closed:
            self.closed = True
            if self._fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self._fd)
                self._fd = None
            self._bytes = np.empty(0, np.uint8)  # drop this ring's own view of the mapping
        try:
            self._mm.close()  # also closes the fd that mmap keeps for itself
        except BufferError:
            return False
        return True


class Closing:
    """Rings closed while a view still held them: retried until unmapped."""

    def __init__(self) -> None:
        self._rings: list[Ring] = []

    def close(self, ring: Ring) -> None:
        if not ring.close():
            self._rings.append(ring)

    def retry(self) -> None:
        self._rings = [ring for ring in self._rings if not ring.close()]

    def __len__(self) -> int:
        return len(self._rings)
