"""Keep the nodes that can serve the pool being placed (prefill or decode)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from scheduler.placement.context import Pool, RequestContext
from scheduler.placement.types import NodeView
from transport.messages import Role


class RoleFilterParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Use nodes dedicated to the pool's role when there are any, "both" nodes only otherwise.
    prefer_dedicated: bool = True


class RoleFilter:
    def __init__(self, params: RoleFilterParams) -> None:
        self.params = params

    def filter(self, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[NodeView]:
        if ctx.fallback:
            # Colocated fallback: a node that prefills will decode too ("both" first, then "prefill").
            both = [n for n in nodes if n.role == Role.BOTH]
            allowed = ctx.config.fallback_to_prefill_node
            return both or ([n for n in nodes if n.role == Role.PREFILL] if allowed else [])
        dedicated_role = Role.PREFILL if ctx.pool is Pool.PREFILL else Role.DECODE
        capable = [n for n in nodes if n.role in (dedicated_role, Role.BOTH)]
        if self.params.prefer_dedicated:
            dedicated = [n for n in capable if n.role == dedicated_role]
            return dedicated or capable
        return capable
