"""The P/D profile handler: the decode profile first, then the decider; the colocated fallback.

As in llm-d's P/D profile handler, the decode profile runs first: its node must hold the request's
KV reservation. The configured decider then says whether and where to prefill, running the prefill
profile (over every other node) only if it wants a remote prefill. A request of a colocated
deployment stays on the decode pick.

When no decode node qualifies (no KV room anywhere), the request runs colocated on a node that can
prefill and has room for the whole reservation ("both" nodes, and "prefill" nodes with
``fallback_to_prefill_node``); otherwise NO_WORKER, and the caller's admission queue waits for room.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from scheduler.placement.context import Pool, RequestContext
from scheduler.placement.latency_model import LatencyTable
from scheduler.placement.plugin import Decider, Profiles
from scheduler.placement.types import NodeView, Placement
from transport.errors import ErrorCode, PdorchError


class PdProfileHandlerParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class PdProfileHandler:
    # Its decider keeps a request local on purpose, and its pickers (round-robin, say) mean nothing
    # over a sample: it looks at every node.
    samples = False

    def __init__(self, params: PdProfileHandlerParams) -> None:
        self.params = params

    def place(
        self, profiles: Profiles, ctx: RequestContext, nodes: Sequence[NodeView], latency: LatencyTable
    ) -> Placement:
        decode = profiles.select(Pool.DECODE, ctx, nodes)
        if decode is None:
            return _fallback(profiles, ctx, nodes)
        if ctx.request.colocated:
            return ctx.placement(decode, decode)

        def pick_prefill() -> NodeView | None:
            others = [n for n in nodes if n.worker_id != decode.worker_id]
            # A KV path backing off is tried only when no other prefill node will do (the probe).
            reachable = [n for n in others if decode.takes_kv_from(n)]
            picked = profiles.select(Pool.PREFILL, ctx, reachable) if len(reachable) < len(others) else None
            return picked or profiles.select(Pool.PREFILL, ctx, others)

        return profiles.decider.decide(ctx, decode, pick_prefill)

    def decode_prefills(self, decider: Decider) -> bool:
        return decider.prefills_on_decode


def _fallback(profiles: Profiles, ctx: RequestContext, nodes: Sequence[NodeView]) -> Placement:
    ctx.fallback = True
    try:
        node = profiles.select(Pool.DECODE, ctx, nodes)
    finally:
        ctx.fallback = False
    if node is None:
        raise PdorchError(
            ErrorCode.NO_WORKER, f"no decode worker for model {ctx.request.model!r} has room for the request"
        )
    return ctx.placement(node, node)
