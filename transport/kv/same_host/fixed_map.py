"""Address ranges built from several memfds: one reserved range, each piece mapped over its place.

Python's ``mmap`` cannot place a mapping at an address, so the range is reserved with an ordinary
anonymous ``mmap.mmap`` (which tracks the numpy views of it and unmaps the whole range when it
goes: every piece mapped over it goes with it) and each memfd is mapped over its place with
``mmap(2)``'s ``MAP_FIXED`` through ctypes. Linux only, as memfds are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from typing import NamedTuple

_MAP_FIXED = 0x10  # the same value on every Linux architecture
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
)


class Reserved(NamedTuple):
    mm: mmap.mmap  # the whole range (closing it unmaps everything mapped over it)
    address: int  # where the aligned part starts
    offset: int  # ... as an offset into ``mm``


def reserve(size: int, align: int = mmap.PAGESIZE) -> Reserved:
    """A private anonymous range holding ``size`` bytes from an address that is a multiple of
    ``align`` (a huge page's size, for huge pages)."""
    mm = mmap.mmap(-1, size + align - mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    anchor = ctypes.c_char.from_buffer(mm)
    try:
        start = ctypes.addressof(anchor)
    finally:
        del anchor  # releases the export, so the range can be closed later
    address = -(-start // align) * align
    return Reserved(mm, address, address - start)


def huge_page_bytes() -> int:
    """The size of the host's default huge page (0 where it has none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def map_over(address: int, size: int, fd: int, *, populate: bool = False) -> None:
    """Map ``size`` bytes of ``fd`` (shared, read-write) at ``address``, replacing what was there.
    ``address`` must lie in a range this process reserved; OSError if the kernel refuses."""
    flags = mmap.MAP_SHARED | _MAP_FIXED | (mmap.MAP_POPULATE if populate else 0)
    got = _libc.mmap(address, size, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
    if got == _MAP_FAILED or got != address:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot map a KV block: {os.strerror(err)}")
