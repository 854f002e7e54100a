"""Latency models placement reads: prefill time, decode step time and KV handoff time per node class.

The coefficients are learnt online outside placement (``scheduler/prediction/latency.py``) from what
the cluster observes, and handed to placement frozen in the snapshot's :class:`LatencyTable`. This
module holds only what both sides must agree on: the feature vectors and the arithmetic of a
prediction. Each model is linear in features chosen by how the work scales:

* prefill of ``uncached`` tokens after ``cached`` ones, on a node decoding ``batch`` requests that
  hold ``context`` tokens: ``[1, u, (c+u)^2 - c^2, u * batch, u * context, u * min(1, batch)]``
  (scaled). The constant is the per-call overhead, the linear and quadratic terms the dense and
  attention work; the next two are what chunked prefill pays when it shares iterations with a
  decode batch, and the last what chunking itself costs: with anything decoding, a prompt is cut
  into chunks that each pay an iteration's fixed cost, however small the batch (a node lent one
  request to decode prefills its next long prompt in many iterations instead of one).
* one decode step: ``[1, batch, context, prefill tokens per step]``; the last term is the prompt
  tokens the node prefilled meanwhile, spread over the steps: a chunked prefill shares iterations
  with the decode batch and lengthens each by what its tokens cost, not by the whole iteration (a
  prefill's own duration would count the decode work of its iterations twice). Its coefficient is
  therefore a prefill's **stall** per token on the node's decoding requests (:func:`stall_s`), and
  a node that keeps prefilling at ``r`` tokens/s spends the share ``rho = coef * r`` of its time
  on it: its steps take ``1 / (1 - rho)`` of their time alone (:func:`step_s`).
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

# A node with more prefill work than time still decodes a step with every prefill chunk: its
# steps are long, not endless (and predictions stay finite).
MAX_PREFILL_SHARE = 0.99
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
    # Per node seen working: its class's models scaled by how much slower (> 1) or faster than the
    # class's typical node it has been (a throttled or degraded part; absent: not observed yet).
    nodes: dict[str, ClassLatency] = {}
    version: int = 0  # bumps with every publication (what is derived from it may be cached)


def class_latency(
    table: LatencyTable,
    model: str,
    accelerator: str,
    accelerators: dict[str, AcceleratorProfile],
    worker_id: str = "",
) -> ClassLatency:
    """The learnt models of a node class, or the prior for a class not seen yet; with ``worker_id``,
    that node's own where its speed has been learnt."""
    found = table.nodes.get(worker_id) if worker_id else None
    if found is None:
        found = table.classes.get(class_key(model, accelerator))
    if found is None:
        profile = accelerators.get(accelerator)
        found = ClassLatency(prior_prefill(profile), prior_decode(profile))
    return found


def scaled(models: ClassLatency, prefill: float, decode: float) -> ClassLatency:
    """Models that predict ``prefill`` and ``decode`` times the time (every prediction is linear in
    the coefficients)."""
    return ClassLatency(
        LinearModel(tuple(c * prefill for c in models.prefill.coef)),
        LinearModel(tuple(c * decode for c in models.decode.coef)),
    )


def class_key(model: str, accelerator: str) -> str:
    return f"{model}/{accelerator}"


def link_key(model: str, prefill_accelerator: str, decode_accelerator: str) -> str:
    return f"{model}/{prefill_accelerator}->{decode_accelerator}"


# A prompt's share of the prefill features that add up over prompts (see prompt_work).
PromptWork = tuple[float, float, float]


def prefill_x(uncached: float, cached: float, batch: float, context: float) -> tuple[float, ...]:
    return work_x(prompt_work(uncached, cached), batch, context)


def prompt_work(uncached: float, cached: float) -> PromptWork:
    """A prompt's share of the prefill features, which add up over prompts: (1, u, (c + u)^2 - c^2)."""
    u = max(0, uncached) / TOKENS
    c = max(0, cached) / TOKENS
    return (1.0, u, (c + u) ** 2 - c * c)


def work_x(work: PromptWork, batch: float, context: float) -> tuple[float, ...]:
    """The prefill features of the prompts whose :func:`prompt_work` sums to ``work``, on a node
    with this decode batch. Linear in ``work``, and every feature and learnt coefficient is >= 0,
    so one prediction of the sum is the sum of the prompts' predictions: a node's whole queue is
    predicted in O(1) from running totals."""
    n, u, q = work
    chunked = u * min(1.0, batch)  # batch is a time average: this stands in for the share chunked
    return (n, u, q, u * batch / BATCH, u * context / CONTEXT, chunked)


def decode_x(batch: float, context: float, prefill_tokens_per_step: float = 0.0) -> tuple[float, ...]:
    return (1.0, batch / BATCH, context / CONTEXT, prefill_tokens_per_step / TOKENS)


def stall_s(decode: LinearModel, prefill_tokens: float) -> float:
    """What prefilling ``prefill_tokens`` on a node delays the requests decoding there."""
    return max(0.0, decode.coef[3] * prefill_tokens / TOKENS)


def step_s(decode: LinearModel, batch: float, context: float, prefill_tokens_per_s: float = 0.0) -> float:
    """One decode step of ``batch`` requests holding ``context`` tokens on a node that prefills
    ``prefill_tokens_per_s`` meanwhile."""
    if batch <= 0:
        return 0.0
    alone = decode.predict(decode_x(batch, context))
    rho = min(MAX_PREFILL_SHARE, stall_s(decode, prefill_tokens_per_s))
    return alone / (1.0 - rho)


def handoff_x(kv_bytes: float) -> tuple[float, ...]:
    return (1.0, kv_bytes / GBYTES)


def prior_prefill(profile: AcceleratorProfile | None) -> LinearModel:
    rate = 0.0
    if profile is not None:
        rate = profile.prefill_tokens_per_s or profile.tflops * TOKENS_PER_S_PER_TFLOPS
    per_token = TOKENS / rate if rate > 0 else 1.0
    return LinearModel((PRIOR_PREFILL_FIXED_S, per_token, 0.0, 0.0, 0.0, 0.0))


def prior_decode(profile: AcceleratorProfile | None) -> LinearModel:
    # A prompt prefilled on the node delays its decoding requests by about its prefill time.
    return LinearModel((0.0, 0.0, 0.0, prior_prefill(profile).coef[1]))


def prior_handoff() -> LinearModel:
    return LinearModel((0.0, 0.0))
