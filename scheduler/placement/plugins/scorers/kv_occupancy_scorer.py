"""Prefer nodes with more free KV: score = 1 - (used + reserved) / total (AIBrix's least-kv-cache)."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from scheduler.placement.context import RequestContext
from scheduler.placement.types import NodeView


class KvOccupancyParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Count scheduler-side reservations as occupied (false: only what workers report as used).
    include_reserved: bool = True


class KvOccupancyScorer:
    def __init__(self, params: KvOccupancyParams) -> None:
        self.params = params

    def score(self, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[float]:
        out = []
        for n in nodes:
            if n.blocks_total <= 0:
                out.append(0.0)
                continue
            held = n.blocks_used + (n.blocks_reserved if self.params.include_reserved else 0)
            out.append(min(1.0, max(0.0, 1.0 - held / n.blocks_total)))
        return out
