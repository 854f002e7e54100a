"""Drop nodes where the request's LoRA adapter cannot get a slot: every slot holds an adapter that
a request booked there is using, so the request would wait inside the engine, behind work placement
cannot see the end of. It waits in admission instead, and is placed when a slot frees anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from scheduler.placement.adapter_cost import AdapterState, adapter_state
from scheduler.placement.context import RequestContext
from scheduler.placement.types import NodeView


class AdapterSlotsFilterParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class AdapterSlotsFilter:
    def __init__(self, params: AdapterSlotsFilterParams) -> None:
        self.params = params

    def filter(self, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[NodeView]:
        adapter = ctx.request.adapter
        if not adapter:
            return list(nodes)
        return [n for n in nodes if adapter_state(n, adapter) is not AdapterState.BLOCKED]
