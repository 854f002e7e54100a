"""Prefer nodes holding the request's LoRA adapter, weighing a load elsewhere against queueing.

The cost of a node is its prefill wait (``prefill_wait_s``) plus what the adapter costs there: 0
when resident (or soon: booked requests use it), one load into a free slot, one load plus
``evict_penalty`` loads when an idle adapter must be evicted (someone may want it back), and no
score at all when every slot is in use. Scores are best/cost, so a resident node behind a queue
longer than a load loses to an idle node without the adapter. Requests without an adapter score 1
everywhere (no opinion).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from scheduler.placement.adapter_cost import AdapterState, adapter_load_s, adapter_state
from scheduler.placement.context import RequestContext
from scheduler.placement.plugins.scorers.normalize import ratio_to_best
from scheduler.placement.types import NodeView

# Keeps a resident idle node's cost positive, so costs stay proportional (no division by zero).
_FLOOR_S = 1e-3


class AdapterAffinityParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Extra cost of evicting an idle adapter, in loads.
    evict_penalty: float = 0.5
    # Seconds per load (0 = the accelerator table's ``adapter_load_s`` for the node's class).
    load_s: float = 0.0


class AdapterAffinityScorer:
    def __init__(self, params: AdapterAffinityParams) -> None:
        if params.evict_penalty < 0 or params.load_s < 0:
            raise ValueError("evict_penalty and load_s must be >= 0")
        self.params = params

    def score(self, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[float]:
        adapter = ctx.request.adapter
        if not adapter:
            return [1.0] * len(nodes)
        costs = [self._cost(ctx, n, adapter) for n in nodes]
        finite = [c for c in costs if c is not None]
        if not finite:
            return [0.0] * len(nodes)
        scores = ratio_to_best(finite)
        it = iter(scores)
        return [0.0 if c is None else next(it) for c in costs]

    def _cost(self, ctx: RequestContext, node: NodeView, adapter: str) -> float | None:
        state = adapter_state(node, adapter)
        if state is AdapterState.BLOCKED:
            return None
        load = self.params.load_s or adapter_load_s(node, ctx.config.accelerators)
        loads = {AdapterState.RESIDENT: 0.0, AdapterState.FREE_SLOT: 1.0}.get(
            state, 1.0 + self.params.evict_penalty
        )
        return _FLOOR_S + node.prefill_wait_s + loads * load
