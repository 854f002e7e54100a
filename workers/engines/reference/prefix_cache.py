"""Which blocks a prompt starts with, and which of its blocks are published for reuse.

Automatic prefix caching in the style of vLLM: a prompt's full blocks are named by chained hashes
(``prefix_hash``). On admission a prompt takes the longest run of cached blocks that matches its
first blocks (shared, reference-counted) and fresh blocks for the rest; only the rest is computed.
As prefill chunks complete, each newly filled full prompt block is registered under its hash, so a
later prompt can reuse it even while this one still runs. When the sequence ends, its registered
blocks stay cached (evictable) in the allocator instead of being freed.

Cached blocks are never written again: a sequence writes only positions after its cached prefix,
and decode writes only after the prompt, so a full prompt block is read-only once registered.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from transport.prefix_hash import prefix_block_hashes
from workers.engines.reference.block_allocator import BlockAllocator
from workers.engines.reference.sequence import EngineSequence


class PrefixCache:
    def __init__(self, allocator: BlockAllocator, block_size: int, enabled: bool) -> None:
        self.allocator = allocator
        self.block_size = block_size
        self.enabled = enabled

    def hashes(self, token_ids: Sequence[int] | np.ndarray, salt: bytes = b"") -> list[int]:
        """The cache keys of a prompt's full blocks (none when caching is off); ``salt``: the
        LoRA adapter's, whose KV is its own."""
        return prefix_block_hashes(token_ids, self.block_size, salt) if self.enabled else []

    def admit(self, seq: EngineSequence, keep_available: int) -> bool:
        """Give ``seq`` blocks for its whole prompt, reusing cached leading blocks.

        Returns False (changing nothing) if that would leave fewer than ``keep_available`` blocks
        available. At least one prompt token is always computed so the first token's logits
        exist: a prompt whose every block is cached recomputes its last block.
        """
        needed = -(-seq.prompt_len // self.block_size)
        reusable = seq.block_hashes[: (seq.prompt_len - 1) // self.block_size]
        got = self.allocator.allocate_with_prefix(reusable, needed, keep_available)
        if got is None:
            return False
        seq.blocks, hits = got
        seq.num_cached = seq.num_computed = hits * self.block_size
        seq.num_registered = hits
        return True

    def publish_computed(self, seq: EngineSequence) -> None:
        """Register the full prompt blocks whose KV the last prefill chunk completed."""
        full = min(seq.num_computed // self.block_size, len(seq.block_hashes))
        for index in range(seq.num_registered, full):
            # False means another block already caches this prefix: this copy stays private.
            self.allocator.register(seq.blocks[index], seq.block_hashes[index])
        seq.num_registered = max(seq.num_registered, full)

    def publish_blocks(self, blocks: Sequence[int], block_hashes: Sequence[int]) -> None:
        """Register blocks filled from outside (a handed-off prompt's KV), block i under hash i."""
        for block, block_hash in zip(blocks, block_hashes, strict=False):
            self.allocator.register(block, block_hash)
