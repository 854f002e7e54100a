"""An upper bound on the goodput any placement policy can reach on a trace and a cluster.

Goodput (DistServe) is the highest arrival rate at which a share ``target`` of the requests meets
both SLOs. Whatever a policy does, the cluster's instances must compute every served request's
prefill and decode its tokens within the TPOT objective. This module bounds how many requests per
second that allows, from the same cost model the simulator runs (``workers/engines/sim/cost.py``),
as a fluid relaxation:

- every instance may do both phases, sharing its time: a share ``x`` prefilling, the rest decoding
  (a node that drains its batch before prefilling costs no request any TPOT, which is the most
  favourable way to share);
- prefill: one iteration per prompt (no chunking overhead), every prefix block seen earlier in the
  trace cached (an unbounded prefix cache);
- decode: an instance's token rate is bounded by the batch that keeps the step within the TPOT
  objective and within its KV capacity and batch limit. If every request of a batch meets TPOT,
  the batch-weighted mean step is at most the objective; for a fixed per-token cost the rate
  ``B / step(B)`` is highest with a constant batch, so that batch's rate bounds it. The context a
  decode step reads is the trace's token-weighted mean (what the steps read on average);
- only ``target`` of the requests need to be served: the prefill demand leaves out the most costly
  prompts, the decode demand the requests with the most decode work, each separately (a policy
  must leave out one set for both);
- free: TTFT (queueing), the KV handoff, preemption, adapter loads.

Each relaxation can only raise the bound, except the use of mean context (a second-order effect);
``tests/unit/test_capacity_bound.py`` checks the bound against the simulator. The best split of
time is a fractional knapsack: instances whose prefill rate is highest relative to their decode
rate prefill first, until prefill and decode sustain the same request rate.
"""

from __future__ import annotations

from collections import defaultdict

import msgspec
import numpy as np

from simulate.cluster import ClusterSpec
from simulate.slo import SloSpec
from simulate.trace import Trace
from workers.engines.sim.cost import CostModel, model_shapes


class ClassShare(msgspec.Struct, frozen=True):
    accelerator: str
    tp: int
    instances: int
    prefill_share: float  # of the instances' time, in the best split
    prefill_s_per_request: float  # mean over the served prompts
    decode_tokens_per_s: float  # one instance, decoding only


class CapacityBound(msgspec.Struct, frozen=True):
    served_per_s: float  # requests per second meeting both objectives, at most
    arrivals_per_s: float  # the arrival rate at which ``target`` of them could (served / target)
    rate_scale: float  # the same as the trace's arrival-rate scale (the goodput searches' unit)
    shares: tuple[ClassShare, ...]


def _uncached_prompts(trace: Trace) -> np.ndarray:
    """Each prompt's tokens not covered by a prefix block some earlier request had."""
    seen: set[int] = set()
    out = np.empty(len(trace.requests), dtype=np.int64)
    for i, r in enumerate(trace.requests):
        cached = 0
        for h in r.hash_ids:
            if h not in seen:
                break
            cached += 1
        seen.update(r.hash_ids)
        out[i] = max(1, r.prompt_len - min(r.prompt_len - 1, cached * trace.prefix_block_tokens))
    return out


def _cheapest(cost: np.ndarray, share: float) -> np.ndarray:
    """A mask of the ``share`` of entries with the lowest cost."""
    keep = max(1, int(np.ceil(share * len(cost))))
    mask = np.zeros(len(cost), dtype=bool)
    mask[np.argsort(cost, kind="stable")[:keep]] = True
    return mask


def capacity_bound(
    trace: Trace, cluster: ClusterSpec, slo: SloSpec, *, model: str = "llama-2-70b", max_batch: int = 256
) -> CapacityBound:
    if not trace.requests:
        raise ValueError("an empty trace has no capacity bound")
    shape = model_shapes()[model]
    prompts = np.array([r.prompt_len for r in trace.requests], dtype=np.float64)
    uncached = _uncached_prompts(trace)
    steps = np.array([max(0, r.output_len - 1) for r in trace.requests], dtype=np.float64)
    # Decode work of a request: its tokens times the context they read (KV-token-seconds, up to a
    # constant); the prefill work is its uncached prompt (any class's time grows with it).
    context = steps * (prompts + steps / 2)
    decoded = _cheapest(context, slo.target)
    prefilled = _cheapest(uncached.astype(np.float64), slo.target)
    mean_steps = float(steps[decoded].mean())
    mean_context = float(context[decoded].sum() / max(1.0, steps[decoded].sum()))

    counts: dict[tuple[str, int], int] = defaultdict(int)
    for inst in cluster.instances:
        counts[(inst.accelerator, inst.tp)] += 1
    rows = []
    for (accelerator, tp), n in counts.items():
        cost = CostModel(accelerator, tp, shape)
        served_prompts = zip(prompts[prefilled], uncached[prefilled], strict=True)
        prefill_s = float(np.mean([cost.prefill_ms(int(p - u), int(p)) for p, u in served_prompts])) / 1e3
        per_seq_ms = cost.d1 + cost.d2 * mean_context
        batch = min(
            (slo.tpot_s * 1e3 - cost.d0) / per_seq_ms, cost.kv_capacity_tokens / mean_context, max_batch
        )
        tokens_per_s = batch / (cost.d0 + batch * per_seq_ms) * 1e3 if batch > 0 else 0.0
        # Requests per second the class sustains doing only one phase.
        prefill_rate = n / prefill_s
        decode_rate = n * tokens_per_s / mean_steps if mean_steps > 0 else float("inf")
        rows.append([accelerator, tp, n, prefill_s, tokens_per_s, prefill_rate, decode_rate])
    # Fractional knapsack: prefill first on the classes best at it relative to decoding.
    rows.sort(key=lambda r: r[5] / r[6] if r[6] > 0 else float("inf"), reverse=True)
    shares = [0.0] * len(rows)
    prefill_total, decode_total = 0.0, sum(r[6] for r in rows)
    for i, r in enumerate(rows):
        if prefill_total >= decode_total:
            break
        # Moving share x of this class to prefill: prefill + x * p, decode - x * d; meet in the middle.
        x = min(1.0, (decode_total - prefill_total) / (r[5] + r[6]))
        shares[i] = x
        prefill_total += x * r[5]
        decode_total -= x * r[6]
    served = min(prefill_total, decode_total)
    arrivals = served / slo.target
    base = len(trace.requests) / trace.duration_s if trace.duration_s > 0 else 1.0
    return CapacityBound(
        served_per_s=served,
        arrivals_per_s=arrivals,
        rate_scale=arrivals / base,
        shares=tuple(ClassShare(r[0], r[1], r[2], x, r[3], r[4]) for r, x in zip(rows, shares, strict=True)),
    )
