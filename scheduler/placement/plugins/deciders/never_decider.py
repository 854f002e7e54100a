"""Never disaggregate: prefill where the decode profile picked (colocated serving)."""

from __future__ import annotations

import msgspec

from scheduler.placement.context import RequestContext
from scheduler.placement.plugin import PickPrefill
from scheduler.placement.types import NodeView, Placement


class NeverDeciderParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class NeverDecider:
    prefills_on_decode = True

    def __init__(self, params: NeverDeciderParams) -> None:
        self.params = params

    def decide(self, ctx: RequestContext, decode: NodeView, pick_prefill: PickPrefill) -> Placement:
        return ctx.placement(decode, decode)
