"""Prefer shorter queues (llm-d's queue scorer): min-max over waiting requests or queued prefill tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import msgspec

from scheduler.placement.context import RequestContext
from scheduler.placement.plugins.scorers.normalize import lower_is_better
from scheduler.placement.types import NodeView


class QueueScorerParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    signal: Literal["waiting", "prefill-tokens"] = "waiting"


class QueueScorer:
    def __init__(self, params: QueueScorerParams) -> None:
        self.params = params

    def score(self, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[float]:
        if self.params.signal == "waiting":
            return lower_is_better([float(n.waiting) for n in nodes])
        return lower_is_better([float(n.queued_prefill_tokens) for n in nodes])
