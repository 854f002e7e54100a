"""Prefer nodes that hold more of the prompt's prefix: score = cached prefix share of the prompt's blocks."""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from scheduler.placement.context import RequestContext
from scheduler.placement.types import NodeView


class PrefixAffinityParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


class PrefixAffinityScorer:
    def __init__(self, params: PrefixAffinityParams) -> None:
        self.params = params

    def score(self, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[float]:
        prompt = ctx.request.prompt_len
        if prompt <= 0 or not ctx.request.block_hashes:
            return [0.0] * len(nodes)
        return [ctx.cached_tokens(n) / prompt for n in nodes]
