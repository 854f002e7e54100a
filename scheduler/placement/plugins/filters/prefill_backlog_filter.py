"""Keep prefill work off nodes whose queue is already long: late binding through the admission queue.

In the prefill pool, drops nodes whose queued prefill work (queued tokens / prefill rate), less the
time their prefix cache would save this request, exceeds ``max_wait_s`` (a node holding the
prompt's prefix is worth a longer wait: a cache keeps paying off only if requests go back to it).
When every node is that busy the request waits in the scheduler's admission queue, which serves
the most urgent request first, and is placed on whichever node frees up first, instead of joining
a long first-come-first-served queue on one node. The decode pool is not filtered.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from scheduler.placement.context import Pool, RequestContext
from scheduler.placement.prefill_backlog import backlog_ok
from scheduler.placement.types import NodeView


class PrefillBacklogParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    max_wait_s: float = 0.1
    # The allowed wait also grows with the request's own work: ``relative`` x its uncached prefill
    # time on that node (a 60k-token prompt may queue behind more than a 500-token one).
    relative: float = 0.0


class PrefillBacklogFilter:
    def __init__(self, params: PrefillBacklogParams) -> None:
        if not (params.max_wait_s >= 0 and params.relative >= 0):
            raise ValueError("max_wait_s and relative must be >= 0")
        self.params = params

    def filter(self, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[NodeView]:
        if ctx.pool is not Pool.PREFILL:
            return list(nodes)
        p = self.params
        return [n for n in nodes if backlog_ok(ctx, n, p.max_wait_s, p.relative)]
