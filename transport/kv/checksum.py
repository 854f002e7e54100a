"""Per-chunk integrity check of the KV plane.

xxh3-64 (xxHash): measured at ~50 GB/s on one core here, against ~6 GB/s for ``zlib.crc32``, so
checking every chunk costs ~1% of a loopback transfer instead of more than the transfer itself;
64 bits make an undetected random corruption far less likely than a 32-bit CRC would. It guards
against bugs and memory/buffer reuse mistakes on the path, not against an attacker.
"""

from __future__ import annotations

from typing import Any

import xxhash


def checksum(buf: Any) -> int:
    """Checksum of the bytes of ``buf`` (any C-contiguous buffer: numpy array, bytes, memoryview)."""
    return xxhash.xxh3_64_intdigest(buf)
