"""Prefill on the decode node when little of the prompt is uncached there (llm-d's prefix-based decider).

At most ``threshold_tokens`` uncached prompt tokens on the decode pick: prefill there. Otherwise the
prefill profile's pick prefills, or the decode node itself when the prefill pool has no candidate.
"""

from __future__ import annotations

import msgspec

from scheduler.placement.context import RequestContext
from scheduler.placement.plugin import PickPrefill
from scheduler.placement.types import NodeView, Placement


class ThresholdDeciderParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    threshold_tokens: int = 256


class ThresholdDecider:
    prefills_on_decode = True

    def __init__(self, params: ThresholdDeciderParams) -> None:
        if params.threshold_tokens < 0:
            raise ValueError(f"threshold_tokens must be >= 0, got {params.threshold_tokens}")
        self.params = params

    def decide(self, ctx: RequestContext, decode: NodeView, pick_prefill: PickPrefill) -> Placement:
        if ctx.uncached_tokens(decode) <= self.params.threshold_tokens:
            return ctx.placement(decode, decode)
        prefill = pick_prefill()
        if prefill is None:
            return ctx.placement(decode, decode)
        return ctx.placement(prefill, decode)
