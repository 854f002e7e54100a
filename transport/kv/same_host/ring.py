"""A ring of fixed-size slots in a memfd, shared by the receiver that created it and one sender.

The receiver creates it (:meth:`Ring.create`) and offers it in its ``KvAccept``; the sender maps
the same pages (:meth:`Ring.attach`). Chunk ``seq`` of a transfer lives in slot ``seq % slots``:
credit (one slot per chunk) keeps the sender from writing a slot the receiver has not emptied.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat

import numpy as np

from transport.errors import ErrorCode, PdorchError
from transport.kv.checksum import checksum
from transport.kv.messages import KvShmRing

PAGE_BYTES = 4096
MEMFD_NAME = "pdorch-kv"


def slot_bytes_for(configured: int, row_bytes: int) -> int:
    """A slot of about ``configured`` bytes that holds at least one row, in whole pages (so every
    slot is aligned for any dtype)."""
    want = max(configured, row_bytes)
    return -(-want // PAGE_BYTES) * PAGE_BYTES


class Ring:
    def __init__(self, mm: mmap.mmap, offer: KvShmRing, fd: int | None) -> None:
        self.offer = offer
        self.slots = offer.slots
        self.slot_bytes = offer.slot_bytes
        self.size = offer.slots * offer.slot_bytes
        self._mm = mm
        self._fd = fd  # the receiver keeps its fd open: the sender reaches the ring through it
        self._bytes: np.ndarray = np.frombuffer(mm, dtype=np.uint8)
        self.closed = False

    @classmethod
    def create(cls, slots: int, slot_bytes: int) -> Ring:
        """A new ring, its pages allocated now (not on the first chunk's critical path). Raises
        OSError where memfds are not available or memory is short."""
        size = slots * slot_bytes
        fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC)
        try:
            os.fchmod(fd, 0o600)  # memfds start at 0777; only the owner may open it anyway
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
            inode = os.fstat(fd).st_ino
            offer = KvShmRing(pid=os.getpid(), fd=fd, inode=inode, slots=slots, slot_bytes=slot_bytes)
        except BaseException:
            os.close(fd)
            raise
        return cls(mm, offer, fd)

    @classmethod
    def attach(cls, offer: KvShmRing) -> Ring:
        """Map the ring a receiver offered; ``CONFIG`` if it cannot be reached or is not what the
        offer says (another host, another user, a recycled fd number)."""
        size = offer.slots * offer.slot_bytes
        if offer.slots <= 0 or offer.slot_bytes <= 0 or offer.slot_bytes % PAGE_BYTES:
            raise PdorchError(ErrorCode.BAD_MESSAGE, f"implausible shared KV ring {offer}")
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
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except OSError as e:
            raise PdorchError(ErrorCode.CONFIG, f"cannot map the receiver's shared KV ring: {e}") from None
        finally:
            os.close(fd)  # the mapping keeps the pages; no fd is left behind
        return cls(mm, offer, None)

    def _slot(self, seq: int, nbytes: int) -> np.ndarray:
        start = (seq % self.slots) * self.slot_bytes
        return self._bytes[start : start + nbytes]

    def write(self, seq: int, rows: np.ndarray, checksum_rows: int) -> list[int]:
        """Sender: copy the C-contiguous ``rows`` into the slot of chunk ``seq``; return the checksum
        of each span of ``checksum_rows`` rows, each hashed from ``rows`` right before its copy (so
        the copy reads it from cache, and a slot corrupted later fails the receiver's check)."""
        dst = self._slot(seq, rows.nbytes).view(rows.dtype).reshape(rows.shape)
        digests = []
        for start in range(0, rows.shape[0], checksum_rows):
            span = rows[start : start + checksum_rows]
            digests.append(checksum(span))
            dst[start : start + checksum_rows] = span
        return digests

    def rows(
        self, seq: int, count: int, dtype: np.dtype, row_shape: tuple[int, ...], row_bytes: int
    ) -> np.ndarray:
        """Receiver: a read-only view of ``count`` rows in the slot of chunk ``seq``. The slot is
        reused once its credit is returned: whoever keeps the rows must copy them."""
        view = self._slot(seq, count * row_bytes).view(dtype).reshape(count, *row_shape)
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
