"""Always prefill remotely: the prefill profile's pick, then the KV handoff (llm-d's P/D, threshold 0).

With no prefill node available, a decode node that can prefill ("both") does it itself; a dedicated
decode node cannot, so the answer is NO_WORKER.
"""

from __future__ import annotations

import msgspec

from scheduler.placement.context import RequestContext
from scheduler.placement.plugin import PickPrefill
from scheduler.placement.types import NodeView, Placement
from transport.errors import ErrorCode, PdorchError


class AlwaysDeciderParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class AlwaysDecider:
    prefills_on_decode = False

    def __init__(self, params: AlwaysDeciderParams) -> None:
        self.params = params

    def decide(self, ctx: RequestContext, decode: NodeView, pick_prefill: PickPrefill) -> Placement:
        prefill = pick_prefill()
        if prefill is not None:
            return ctx.placement(prefill, decode)
        if not decode.can_prefill:
            raise PdorchError(ErrorCode.NO_WORKER, f"no prefill worker for model {ctx.request.model!r}")
        return ctx.placement(decode, decode)
