"""Drop nodes that should not take new work: draining ones, decode nodes whose KV endpoint is
refusing transfers (until it recovers), decode nodes whose KV network is taken as down (handoffs
with two or more peers lately did not land; while the request has another way), and decode nodes
without KV room. (A single pair of nodes whose handoffs did not land is the handlers' to avoid:
``NodeView.takes_kv_from``.)

With ``require_kv_room`` a decode candidate must have ``blocks_free`` (total - used - reserved) for the
request's whole reservation (prompt + predicted output), so placement never puts a request on a node
that would have to preempt for it; the request waits in admission instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from scheduler.placement.context import Pool, RequestContext
from scheduler.placement.types import NodeView


class HealthFilterParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    require_kv_room: bool = False
    # Drop nodes with more waiting requests than this (0 = no limit).
    max_waiting: int = 0


class HealthFilter:
    def __init__(self, params: HealthFilterParams) -> None:
        if params.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        self.params = params

    def filter(self, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[NodeView]:
        limit = self.params.max_waiting
        out = [n for n in nodes if not n.draining and (limit == 0 or n.waiting <= limit)]
        if ctx.pool is Pool.DECODE:
            out = [n for n in out if not n.kv_refusing]
            reachable = [n for n in out if not n.kv_unreachable]
            # Left out while another decode node or a prefill node running it whole can take the
            # request; with neither, tried rather than the request refused (the failure that put
            # it there may have passed: its handoff is the probe).
            if reachable or ctx.config.fallback_to_prefill_node:
                out = reachable
        if self.params.require_kv_room and ctx.pool is Pool.DECODE:
            out = [n for n in out if ctx.has_room(n)]
        return out
