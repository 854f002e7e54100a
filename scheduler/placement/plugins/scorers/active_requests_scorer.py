"""Prefer nodes with fewer requests in flight from this scheduler (least-request)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from scheduler.placement.context import RequestContext
from scheduler.placement.plugins.scorers.normalize import lower_is_better
from scheduler.placement.types import NodeView


class ActiveRequestsParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class ActiveRequestsScorer:
    def __init__(self, params: ActiveRequestsParams) -> None:
        self.params = params

    def score(self, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[float]:
        return lower_is_better([float(n.inflight) for n in nodes])
