"""Pick the highest total score; ties go to a pseudo-random node (seeded by the request), not the first."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from scheduler.placement.context import RequestContext
from scheduler.placement.types import NodeView


class MaxScoreParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Scores within this of the best count as ties.
    tie_epsilon: float = 1e-9


class MaxScorePicker:
    def __init__(self, params: MaxScoreParams) -> None:
        if params.tie_epsilon < 0:
            raise ValueError("tie_epsilon must be >= 0")
        self.params = params

    def pick(self, ctx: RequestContext, nodes: Sequence[NodeView], scores: Sequence[float]) -> NodeView:
        best = max(scores)
        tied = [n for n, s in zip(nodes, scores, strict=True) if s >= best - self.params.tie_epsilon]
        if len(tied) == 1:
            return tied[0]
        return ctx.rng(f"tie/{ctx.pool}").choice(tied)
