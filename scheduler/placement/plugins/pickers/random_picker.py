"""Pick uniformly at random, ignoring scores (the random baseline), seeded by the request."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from scheduler.placement.context import RequestContext
from scheduler.placement.types import NodeView


class RandomParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class RandomPicker:
    def __init__(self, params: RandomParams) -> None:
        self.params = params

    def pick(self, ctx: RequestContext, nodes: Sequence[NodeView], scores: Sequence[float]) -> NodeView:
        return ctx.rng(f"random/{ctx.pool}").choice(list(nodes))
