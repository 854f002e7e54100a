"""Pick at random with probability proportional to score ** power (spreads load, still favours the best)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from scheduler.placement.context import RequestContext
from scheduler.placement.types import NodeView


class WeightedRandomParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    power: float = 1.0


class WeightedRandomPicker:
    def __init__(self, params: WeightedRandomParams) -> None:
        if params.power < 0:
            raise ValueError("power must be >= 0")
        self.params = params

    def pick(self, ctx: RequestContext, nodes: Sequence[NodeView], scores: Sequence[float]) -> NodeView:
        weights = [max(0.0, s) ** self.params.power for s in scores]
        rng = ctx.rng(f"weighted/{ctx.pool}")
        if sum(weights) <= 0:
            return rng.choice(list(nodes))
        return rng.choices(list(nodes), weights=weights, k=1)[0]
