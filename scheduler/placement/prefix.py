"""Prompt prefix hashes: the key placement uses to find nodes that already hold a prompt's prefix KV.

Block ``i``'s hash covers tokens ``0 .. (i+1)*block_size`` (a chain: it hashes block ``i``'s token ids
together with block ``i-1``'s hash), so equal hashes mean equal whole prefixes, as in vLLM's prefix
cache. The scheme is ``transport/prefix_hash.py``'s, which the engines use for their own caches.
"""

from __future__ import annotations

from collections.abc import Container, Sequence

import numpy as np

from transport.prefix_hash import prefix_block_hashes


def prompt_block_hashes(token_ids: Sequence[int] | np.ndarray, block_size: int) -> tuple[int, ...]:
    """Chained 63-bit hashes of the prompt's full blocks (a partial last block gets none)."""
    return tuple(prefix_block_hashes(token_ids, block_size))


def matched_prefix_blocks(block_hashes: Sequence[int], cached: Container[int]) -> int:
    """How many leading blocks of the prompt ``cached`` holds (the chain stops at the first miss)."""
    n = 0
    for h in block_hashes:
        if h not in cached:
            break
        n += 1
    return n
