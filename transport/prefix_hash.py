"""Chained hashes of a prompt's full KV blocks: the keys of prefix caches, shared by every process.

Block ``i``'s hash covers the tokens of blocks ``0..i``: it is BLAKE2b (8-byte digest) over block
``i-1``'s digest followed by block ``i``'s token ids as little-endian int64. Equal hashes therefore
mean equal whole prefixes, and changing one token changes the hash of its block and of every later
block. A partial last block gets no hash: only full blocks are ever shared.

The hash depends on nothing but the token ids and the block size (not on Python's per-process
``hash()`` salt), so the scheduler and the engines compute the same keys: it lives here, in the one
package both import. A ``salt`` (e.g. a LoRA adapter's identity) starts the chain elsewhere, so
the same tokens under different salts never share a key. Each value is the digest read as a
little-endian integer and shifted right by one bit, so it fits a signed 64-bit field.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import numpy as np

from transport.errors import ErrorCode, PdorchError


def prefix_block_hashes(
    token_ids: Sequence[int] | np.ndarray, block_size: int, salt: bytes = b""
) -> list[int]:
    """The chained hash of every full block of ``token_ids`` (``len(token_ids) // block_size`` of them)."""
    if block_size <= 0:
        raise PdorchError(ErrorCode.INTERNAL, f"block_size must be positive, got {block_size}")
    n = len(token_ids) - len(token_ids) % block_size
    if n == 0:
        return []
    # Once per request on the scheduler, over thousands of tokens: the ids packed in one call, each
    # block hashed from a view of them with a copy of an empty hash object (~1.6x faster than a
    # small array and a new hash object per block).
    if isinstance(token_ids, np.ndarray):
        raw = memoryview(np.ascontiguousarray(token_ids[:n], dtype="<i8").tobytes())
    else:
        raw = memoryview(struct.pack(f"<{n}q", *token_ids[:n]))
    step = 8 * block_size
    fresh, from_bytes = _EMPTY_BLAKE2B_8.copy, int.from_bytes
    parent = hashlib.blake2b(salt, digest_size=8).digest() if salt else b""
    hashes: list[int] = []
    append = hashes.append
    for start in range(0, 8 * n, step):
        digest = fresh()
        digest.update(parent)
        digest.update(raw[start : start + step])
        parent = digest.digest()
        append(from_bytes(parent, "little") >> 1)
    return hashes


# Copying an empty hash is cheaper than making one (no parameters to parse and set up each time).
_EMPTY_BLAKE2B_8 = hashlib.blake2b(digest_size=8)
