"""Service-level objectives and attainment.

A request meets its SLOs when both hold:

* TTFT <= ``ttft_base_s + ttft_scale * isolated prefill time`` of its prompt on the reference class
  (uncached, alone on an idle instance). A fixed TTFT bound is meaningless across prompts of 100 and
  60,000 tokens; the length-aware bound scales with the work the prompt really needs.
* TPOT (time per output token after the first) <= ``tpot_s``.

Goodput follows DistServe: the highest request rate at which at least ``target`` of the requests
meet both SLOs.
"""

from __future__ import annotations

import msgspec

from workers.engines.sim.cost import CostModel


class SloSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ttft_base_s: float = 1.0
    ttft_scale: float = 5.0
    tpot_s: float = 0.1
    target: float = 0.9
    reference_class: str = "h100"
    reference_tp: int = 4

    def describe(self) -> str:
        return (
            f"TTFT <= {self.ttft_base_s:g} s + {self.ttft_scale:g} x isolated prefill on "
            f"{self.reference_class}x{self.reference_tp}, TPOT <= {self.tpot_s * 1e3:g} ms, "
            f"target {self.target:.0%} of requests"
        )


class SloJudge:
    """Per-request TTFT limits from the reference cost model."""

    def __init__(self, slo: SloSpec, reference: CostModel) -> None:
        self.slo = slo
        self.reference = reference

    def ttft_limit_s(self, prompt_len: int) -> float:
        return self.slo.ttft_base_s + self.slo.ttft_scale * self.reference.isolated_prefill_s(prompt_len)

    def met(self, prompt_len: int, ttft_s: float, tpot_s: float) -> bool:
        return ttft_s <= self.ttft_limit_s(prompt_len) and tpot_s <= self.slo.tpot_s
