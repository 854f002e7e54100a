"""Prompt prefix hashes: the key placement uses to find nodes that already hold a prompt's prefix KV.

Block ``i``'s hash covers tokens ``0 .. (i+1)*block_size`` (a chain: it hashes block ``i``'s token ids
together with block ``i-1``'s hash), so equal hashes mean equal whole prefixes, as in vLLM's prefix
cache. The scheme is ``transport/prefix_hash.py``'s, which the engines use for their own caches. A
request with a LoRA adapter has its hashes salted with the adapter, so one adapter's prefix is never
credited to another adapter or to the base model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Container, Sequence
from itertools import takewhile

import numpy as np

from transport.prefix_hash import prefix_block_hashes


def prompt_block_hashes(
    token_ids: Sequence[int] | np.ndarray, block_size: int, adapter: str = ""
) -> tuple[int, ...]:
    """Chained 63-bit hashes of the prompt's full blocks (a partial last block gets none), salted
    with the LoRA adapter it runs with: its KV depends on the adapter's weights, so the same tokens
    under another adapter, or the base model, are another prefix."""
    return tuple(prefix_block_hashes(token_ids, block_size, adapter_salt(adapter)))


def adapter_salt(adapter: str) -> bytes:
    """The salt of an adapter's prefix hashes (none for the base model)."""
    return f"lora:{adapter}".encode() if adapter else b""


def salt_block_hashes(block_hashes: Sequence[int], adapter: str) -> tuple[int, ...]:
    """Already chained hashes (e.g. a trace's) made the adapter's own: each is rehashed with the
    adapter's salt, which keeps equal prefixes equal under one adapter and apart across adapters."""
    if not adapter:
        return tuple(block_hashes)
    salt = adapter_salt(adapter)
    return tuple(_salted(salt, h) for h in block_hashes)


def _salted(salt: bytes, block_hash: int) -> int:
    # The hash is fixed-width and last, so (salt, hash) pairs never run into each other.
    digest = hashlib.blake2b(salt + block_hash.to_bytes(8, "little", signed=True), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


def matched_prefix_blocks(block_hashes: Sequence[int], cached: Container[int]) -> int:
    """How many leading blocks of the prompt ``cached`` holds (the chain stops at the first miss)."""
    # A ledger's prefix view offers its memory's own membership test: a long prompt held by many
    # nodes is thousands of look-ups per decision, a Python call each through ``in``.
    membership = getattr(cached, "membership", None)
    contains = membership() if membership is not None else cached.__contains__
    return len(list(takewhile(contains, block_hashes)))
