"""Prompt prefix hashes: the key placement uses to find nodes that already hold a prompt's prefix KV.

Block ``i``'s hash covers tokens ``0 .. (i+1)*block_size`` (a chain: it hashes block ``i``'s token ids
together with block ``i-1``'s hash), so equal hashes mean equal whole prefixes, as in vLLM's prefix
cache. The hash is BLAKE2b over the little-endian int64 token ids: stable across processes and
machines (Python's ``hash()`` is salted per process for str and bytes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Sequence

import numpy as np


def prompt_block_hashes(token_ids: Sequence[int] | np.ndarray, block_size: int) -> tuple[int, ...]:
    """Chained 63-bit hashes of the prompt's full blocks (a partial last block gets none)."""
    if block_size <= 0:
        raise ValueError("block_size must be positive")
    ids = np.asarray(token_ids, dtype="<i8")
    full = len(ids) // block_size
    out: list[int] = []
    parent = b""
    for i in range(full):
        h = hashlib.blake2b(parent, digest_size=8)
        h.update(ids[i * block_size : (i + 1) * block_size].tobytes())
        parent = h.digest()
        out.append(int.from_bytes(parent, "little") >> 1)  # non-negative, fits an int64
    return tuple(out)


def matched_prefix_blocks(block_hashes: Sequence[int], cached: Container[int]) -> int:
    """How many leading blocks of the prompt ``cached`` holds (the chain stops at the first miss)."""
    n = 0
    for h in block_hashes:
        if h not in cached:
            break
        n += 1
    return n
