"""Estimated time until a node would finish a request's prefill: queue + uncached compute.

``(queued prefill tokens + this prompt's uncached tokens) / the node's prefill rate``. The prefix cache
enters as the tokens it saves; a node that reports no rate gets one from its accelerator class.
"""

from __future__ import annotations

from scheduler.placement.config import AcceleratorProfile
from scheduler.placement.types import NodeView

# Rough prefill tokens/s per dense TFLOPS of one device, for a node that reports no rate: a 70B-class
# model at tensor parallel 4 prefills ~10 tokens/s per device TFLOPS (H100: ~10k tokens/s).
TOKENS_PER_S_PER_TFLOPS = 10.0
MIN_RATE = 1.0


def prefill_rate(node: NodeView, accelerators: dict[str, AcceleratorProfile]) -> float:
    if node.prefill_tokens_per_s > 0:
        return node.prefill_tokens_per_s
    prof = accelerators.get(node.accelerator)
    if prof is None:
        return MIN_RATE
    if prof.prefill_tokens_per_s > 0:
        return prof.prefill_tokens_per_s
    return max(MIN_RATE, prof.tflops * TOKENS_PER_S_PER_TFLOPS)


def estimate_prefill_s(node: NodeView, uncached_tokens: int, rate: float) -> float:
    return (max(0, node.queued_prefill_tokens) + max(0, uncached_tokens)) / max(MIN_RATE, rate)


def kv_transfer_s(prompt_tokens: int, kv_bytes_per_token: int, link_gbytes_per_s: float) -> float:
    if link_gbytes_per_s <= 0:
        return 0.0
    return prompt_tokens * kv_bytes_per_token / (link_gbytes_per_s * 1e9)
