"""Opening a memfd another process offered, through ``/proc/<pid>/fd/<fd>``, and checking it is the
one offered: a regular file of that inode and size, owned by this user and open to no other.
The kernel lets only the owner of the process (or root) open it at all."""

from __future__ import annotations

import os
import stat

from transport.errors import ErrorCode, PdorchError


def open_offered(pid: int, fd: int, inode: int, size: int, what: str) -> int:
    """A new fd of the offered memfd (close it once mapped); ``CONFIG`` if it cannot be reached or
    is not what the offer says (another host, another user, a recycled fd number)."""
    try:
        own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise PdorchError(ErrorCode.CONFIG, f"cannot open the receiver's {what}: {e}") from None
    try:
        st = os.fstat(own)
    except OSError as e:
        os.close(own)
        raise PdorchError(ErrorCode.CONFIG, f"cannot inspect the receiver's {what}: {e}") from None
    if (
        not stat.S_ISREG(st.st_mode)
        or st.st_ino != inode
        or st.st_size != size
        or st.st_uid != os.getuid()
        or stat.S_IMODE(st.st_mode) & 0o077
    ):
        os.close(own)
        raise PdorchError(ErrorCode.CONFIG, f"the receiver's {what} is not the one offered")
    return own
