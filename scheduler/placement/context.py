"""What plugins know about the request being placed: computed once per decision, shared by all plugins."""

from __future__ import annotations

import enum
import hashlib
import random

from scheduler.placement.config import PlacementConfig
from scheduler.placement.kv_budget import blocks_for, predicted_output_tokens
from scheduler.placement.prefill_cost import estimate_prefill_s, prefill_rate
from scheduler.placement.prefix import matched_prefix_blocks
from scheduler.placement.types import NodeView, Placement, PlacementRequest


class Pool(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"


class RequestContext:
    """One decision's request plus memoised per-node derived values (cached prefix, delay estimate)."""

    __slots__ = ("_cached", "config", "fallback", "output_tokens", "pool", "request", "reserve_tokens")

    def __init__(self, request: PlacementRequest, config: PlacementConfig) -> None:
        self.request = request
        self.config = config
        self.pool = Pool.DECODE
        # True while the profile handler looks for a colocated fallback node (no decode node had room).
        self.fallback = False
        self.output_tokens = predicted_output_tokens(request, config.reservation)
        self.reserve_tokens = request.prompt_len + self.output_tokens
        self._cached: dict[str, int] = {}

    def cached_tokens(self, node: NodeView) -> int:
        if not self.request.block_hashes:
            return 0
        hit = self._cached.get(node.worker_id)
        if hit is None:
            req = self.request
            per_block = req.prefix_block_tokens or node.block_size
            blocks = matched_prefix_blocks(req.block_hashes, node.cached_block_hashes)
            hit = min(req.prompt_len, blocks * per_block)
            self._cached[node.worker_id] = hit
        return hit

    def uncached_tokens(self, node: NodeView) -> int:
        return self.request.prompt_len - self.cached_tokens(node)

    def reserve_blocks(self, node: NodeView) -> int:
        return blocks_for(self.reserve_tokens, node.block_size)

    def has_room(self, node: NodeView) -> bool:
        """Whether the node's free KV holds the request and its other choices, which decode beside
        it sharing its prompt's full blocks: each needs a copy of the last, partial one and its
        output. Their outputs are counted at the predicted mean (the request's own reservation is
        at a high quantile, but the sum of many is near its mean), and at most up to the node's
        capacity: a request whose choices could not all fit at once waits for an empty node, where
        the engine runs as many as fit and the rest as blocks free."""
        need = own = self.reserve_blocks(node)
        if followers := self.request.followers:
            mean = self.request.predicted_output_len or self.output_tokens
            theirs = followers + blocks_for(followers * mean, node.block_size)
            need = max(own, min(own + theirs, node.blocks_total))
        return node.blocks_total > 0 and node.blocks_free >= need

    def placement(
        self, prefill: NodeView, decode: NodeView, *, ttft_s: float = 0.0, tpot_s: float = 0.0
    ) -> Placement:
        """Prefill on one node, decode (and reserve the KV) on the other; the same node = colocated."""
        return Placement(prefill.worker_id, decode.worker_id, self.reserve_blocks(decode), ttft_s, tpot_s)

    def prefill_rate(self, node: NodeView) -> float:
        if node.prefill_tokens_per_s > 0:
            return node.prefill_tokens_per_s
        return prefill_rate(node, self.config.accelerators)

    def prefill_delay_s(self, node: NodeView) -> float:
        return estimate_prefill_s(node, self.uncached_tokens(node), self.prefill_rate(node))

    def rng(self, salt: str) -> random.Random:
        return request_rng(self.config.seed, self.request.request_id, salt)


def request_rng(seed: int, request_id: str, salt: str) -> random.Random:
    """A generator seeded by (config seed, request id, salt): random, yet reproducible and pure."""
    h = hashlib.blake2b(f"{seed}\0{request_id}\0{salt}".encode(), digest_size=8)
    return random.Random(int.from_bytes(h.digest(), "little"))
