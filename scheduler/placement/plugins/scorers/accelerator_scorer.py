"""Prefer the accelerator class that suits the pool: compute-heavy for prefill, memory-heavy for decode.

Class properties come from the config's ``accelerators`` table (unknown classes score 0). Prefill
scores a node's dense TFLOPS against the best candidate's; decode scores its HBM bytes per FLOP (how
memory-rich it is for its compute, Splitwise's argument for decoding on A100 and prefilling on H100).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import msgspec

from scheduler.placement.config import AcceleratorProfile
from scheduler.placement.context import Pool, RequestContext
from scheduler.placement.plugins.scorers.normalize import share_of_max
from scheduler.placement.types import NodeView

Metric = Literal["tflops", "hbm-bandwidth", "bytes-per-flop", "memory"]


class AcceleratorScorerParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    prefill_metric: Metric = "tflops"
    decode_metric: Metric = "bytes-per-flop"


def _value(profile: AcceleratorProfile | None, metric: Metric) -> float:
    if profile is None:
        return 0.0
    if metric == "tflops":
        return profile.tflops
    if metric == "hbm-bandwidth":
        return profile.hbm_gbytes_per_s
    if metric == "memory":
        return profile.memory_gb
    return profile.hbm_gbytes_per_s / profile.tflops if profile.tflops > 0 else 0.0


class AcceleratorScorer:
    def __init__(self, params: AcceleratorScorerParams) -> None:
        self.params = params

    def score(self, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[float]:
        metric = self.params.prefill_metric if ctx.pool is Pool.PREFILL else self.params.decode_metric
        table = ctx.config.accelerators
        return share_of_max([_value(table.get(n.accelerator), metric) for n in nodes])
