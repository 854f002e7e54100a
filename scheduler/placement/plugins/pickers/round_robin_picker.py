"""Pick candidates in turn (by worker id order), ignoring scores: the round-robin baseline.

It keeps one counter per picker instance: deterministic state, no clock or I/O, so the same sequence
of decisions always yields the same picks.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from scheduler.placement.context import RequestContext
from scheduler.placement.types import NodeView


class RoundRobinParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class RoundRobinPicker:
    def __init__(self, params: RoundRobinParams) -> None:
        self.params = params
        self._next = 0

    def pick(self, ctx: RequestContext, nodes: Sequence[NodeView], scores: Sequence[float]) -> NodeView:
        ordered = sorted(nodes, key=lambda n: n.worker_id)
        node = ordered[self._next % len(ordered)]
        self._next += 1
        return node
