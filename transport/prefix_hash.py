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
from collections.abc import Sequence

import numpy as np

from transport.errors import ErrorCode, PdorchError


def prefix_block_hashes(
    token_ids: Sequence[int] | np.ndarray, block_size: int, salt: bytes = b""
) -> list[int]:
    """The chained hash of every full block of ``token_ids`` (``len(token_ids) // block_size`` of them)."""
    if block_size <= 0:
        raise PdorchError(ErrorCode.INTERNAL, f"block_size must be positive, got {block_size}")
    ids = np.asarray(token_ids, dtype="<i8")
    hashes: list[int] = []
    parent = hashlib.blake2b(salt, digest_size=8).digest() if salt else b""
    for start in range(0, len(ids) - block_size + 1, block_size):
        digest = hashlib.blake2b(parent, digest_size=8)
        digest.update(ids[start : start + block_size].tobytes())
        parent = digest.digest()
        hashes.append(int.from_bytes(parent, "little") >> 1)
    return hashes
