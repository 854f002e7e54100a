"""Prefer the node that would finish this prefill first: (queued + uncached tokens) / prefill rate.

One estimate covers queueing, heterogeneous speeds and the prefix cache (cached tokens cost nothing),
so no weight has to trade prefix hits against queue length. Scores are best/estimate: a node twice as
slow as the best scores 0.5.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from scheduler.placement.context import RequestContext
from scheduler.placement.plugins.scorers.normalize import ratio_to_best
from scheduler.placement.types import NodeView


class PrefillDelayParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class PrefillDelayScorer:
    def __init__(self, params: PrefillDelayParams) -> None:
        self.params = params

    def score(self, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[float]:
        return ratio_to_best([ctx.prefill_delay_s(n) for n in nodes])
