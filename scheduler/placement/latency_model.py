"""Latency models placement reads: prefill time, decode step time and KV handoff time per node class.

The coefficients are learnt online outside placement (``scheduler/prediction/latency.py``) from what
the cluster observes, and handed to placement frozen in the snapshot's :class:`LatencyTable`. This
module holds only what both sides must agree on: the feature vectors and the arithmetic of a
prediction. Each model is linear in features chosen by how the work scales:

* prefill of ``uncached`` tokens after ``cached`` ones, on a node decoding ``batch`` requests that
  hold ``context`` tokens: ``[1, u, (c+u)^2 - c^2, u * batch, u * context]`` (scaled). The constant is
  the per-call overhead, the linear and quadratic terms the dense and attention work; the last two
  are what chunked prefill pays when it shares iterations with a decode batch.
* one decode step: ``[1, batch, context, stall per step]``; the last term is prefill time spent on
  the node during the decode (the engine's mixed iterations), so the same model explains the
  observed time per token on nodes that also prefill.
* a KV handoff: ``[1, gigabytes]``.

Before anything is learnt a class uses a prior: prefill from the accelerator table's throughput,
everything else zero (optimistic until the first requests have been observed).
"""

from __future__ import annotations

from operator import mul

import msgspec

from scheduler.placement.config import AcceleratorProfile

# Feature scales: keep every feature near 1 for typical requests (numerically better fits).
TOKENS = 1e3
CONTEXT = 1e6
BATCH = 1e2
GBYTES = 1e9

PREFILL_FEATURES = 5
DECODE_FEATURES = 4
HANDOFF_FEATURES = 2
# Prior prefill throughput per dense TFLOPS of one device (a 70B-class model at tensor parallel 4
# prefills ~10 tokens/s per device TFLOPS: an H100 ~10k tokens/s), and its fixed cost per call.
TOKENS_PER_S_PER_TFLOPS = 10.0
PRIOR_PREFILL_FIXED_S = 0.02


class LinearModel(msgspec.Struct, frozen=True, gc=False):
    coef: tuple[float, ...]

    def predict(self, x: tuple[float, ...]) -> float:
        """``coef . x``, never negative (a time)."""
        return max(0.0, sum(map(mul, self.coef, x)))


class ClassLatency(msgspec.Struct, frozen=True, gc=False):
    prefill: LinearModel
    decode: LinearModel


class LatencyTable(msgspec.Struct, frozen=True, gc=False):
    """The learnt models at one instant: per node class, and per (prefill class, decode class) link."""

    classes: dict[str, ClassLatency] = {}
    handoffs: dict[str, LinearModel] = {}
    # Seconds per LoRA adapter load, per node class that has been seen loading one.
    adapter_load_s: dict[str, float] = {}
    # Share of the TPOT objective kept in reserve, per decode class (absent: none).
    tpot_margin: dict[str, float] = {}
    version: int = 0  # bumps with every publication (what is derived from it may be cached)


def class_latency(
    table: LatencyTable, model: str, accelerator: str, accelerators: dict[str, AcceleratorProfile]
) -> ClassLatency:
    """The learnt models of a node class, or the prior for a class not seen yet."""
    found = table.classes.get(class_key(model, accelerator))
    if found is None:
        found = ClassLatency(prior_prefill(accelerators.get(accelerator)), prior_decode())
    return found


def class_key(model: str, accelerator: str) -> str:
    return f"{model}/{accelerator}"


def link_key(model: str, prefill_accelerator: str, decode_accelerator: str) -> str:
    return f"{model}/{prefill_accelerator}->{decode_accelerator}"


def prefill_x(uncached: float, cached: float, batch: float, context: float) -> tuple[float, ...]:
    u = max(0, uncached) / TOKENS
    c = max(0, cached) / TOKENS
    return (1.0, u, (c + u) ** 2 - c * c, u * batch / BATCH, u * context / CONTEXT)


def decode_x(batch: float, context: float, stall_per_step_s: float = 0.0) -> tuple[float, ...]:
    return (1.0, batch / BATCH, context / CONTEXT, stall_per_step_s)


def handoff_x(kv_bytes: float) -> tuple[float, ...]:
    return (1.0, kv_bytes / GBYTES)


def prior_prefill(profile: AcceleratorProfile | None) -> LinearModel:
    rate = 0.0
    if profile is not None:
        rate = profile.prefill_tokens_per_s or profile.tflops * TOKENS_PER_S_PER_TFLOPS
    per_token = TOKENS / rate if rate > 0 else 1.0
    return LinearModel((PRIOR_PREFILL_FIXED_S, per_token, 0.0, 0.0, 0.0))


def prior_decode() -> LinearModel:
    # A prefill second spent on the node delays its decoding requests by about a second.
    return LinearModel((0.0, 0.0, 0.0, 1.0))


def prior_handoff() -> LinearModel:
    return LinearModel((0.0, 0.0))
