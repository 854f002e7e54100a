"""Synthetic traces: named workloads unlike the public traces, for checking that placement
generalizes, and a small templated workload for tests.

Each named workload is seeded and needs no file: log-normal prompt and output lengths (``mu``,
``sigma`` of the natural log, clipped to 16-8000 and 2-3000 tokens) and arrivals at 1 request/s on
average, either Poisson or in bursts (a Poisson process switched on and off: ``burst_s`` seconds at
``(burst_s + pause_s) / burst_s`` requests/s, then ``pause_s`` seconds of nothing). A goodput
scale on them reads as requests/s.
"""

from __future__ import annotations

import math

import msgspec
import numpy as np

from simulate.trace import DEFAULT_MAX_TOKENS, Trace, TraceRequest


class Workload(msgspec.Struct, frozen=True):
    prompt: tuple[float, float]  # mu, sigma of ln(prompt tokens)
    output: tuple[float, float]  # mu, sigma of ln(output tokens)
    burst_s: float = 0.0  # 0: Poisson arrivals
    pause_s: float = 0.0


WORKLOADS: dict[str, Workload] = {
    # Median prompt ~670 tokens, answer ~150: a chat service.
    "synthetic-chat": Workload(prompt=(6.5, 1.0), output=(5.0, 1.0)),
    # Median prompt ~240, answer ~540: long answers to short questions.
    "synthetic-decode-heavy": Workload(prompt=(5.5, 0.8), output=(6.3, 0.6)),
    # Median prompt ~3000, answer ~33: summarisation and classification.
    "synthetic-prefill-heavy": Workload(prompt=(8.0, 0.7), output=(3.5, 0.8)),
    # The chat lengths arriving in 10 s bursts at 3x the mean rate, then 20 s of quiet.
    "synthetic-bursty-chat": Workload(prompt=(6.5, 1.0), output=(5.0, 1.0), burst_s=10.0, pause_s=20.0),
}


def workload_trace(name: str, requests: int = 2000, seed: int = 0) -> Trace:
    """One of :data:`WORKLOADS` by name."""
    return generate(WORKLOADS[name], requests, seed, name)


def generate(w: Workload, requests: int, seed: int, name: str = "synthetic") -> Trace:
    rng = np.random.default_rng(seed)
    arrivals = _arrivals(rng, requests, w)
    prompts = np.clip(rng.lognormal(*w.prompt, requests), 16, 8000).astype(int)
    outputs = np.clip(rng.lognormal(*w.output, requests), 2, 3000).astype(int)
    reqs = tuple(
        TraceRequest(float(a), int(p), int(o)) for a, p, o in zip(arrivals, prompts, outputs, strict=True)
    )
    return Trace(name, reqs)


def _arrivals(rng: np.random.Generator, n: int, w: Workload) -> np.ndarray:
    if w.burst_s <= 0:
        return np.cumsum(rng.exponential(1.0, n))
    # Poisson at the burst rate in "busy time", then each busy second mapped past the pauses.
    busy = np.cumsum(rng.exponential(w.burst_s / (w.burst_s + w.pause_s), n))
    return busy + np.floor(busy / w.burst_s) * w.pause_s


def synthetic_trace(
    n: int,
    *,
    rate_per_s: float = 4.0,
    seed: int = 0,
    templates: int = 8,
    block_tokens: int = 64,
    prompt_median: int = 1024,
    output_median: int = 64,
    tenants: int = 2,
) -> Trace:
    """A small reproducible workload: Poisson arrivals, log-normal lengths, shared prompt templates.

    Each request starts with one of ``templates`` shared prefixes (half its blocks) and ends with
    unique blocks, so prefix caching matters; a template's outputs cluster around its own length.
    """
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate_per_s, size=n)
    arrivals = np.cumsum(gaps) - gaps[0]
    prompts = np.maximum(block_tokens, rng.lognormal(math.log(prompt_median), 0.6, size=n)).astype(int)
    template_of = rng.integers(0, templates, size=n)
    template_out = rng.lognormal(math.log(output_median), 0.8, size=templates)
    outputs = np.maximum(1, rng.lognormal(np.log(template_out[template_of]), 0.3)).astype(int)
    next_id = 1_000_000
    reqs = []
    for i in range(n):
        blocks = int(prompts[i]) // block_tokens
        shared = blocks // 2
        t = int(template_of[i])
        ids = [t * 10_000 + 1 + j for j in range(shared)]
        ids += list(range(next_id, next_id + blocks - shared))
        next_id += blocks - shared
        reqs.append(
            TraceRequest(
                arrival_s=float(arrivals[i]),
                prompt_len=int(prompts[i]),
                output_len=int(min(outputs[i], DEFAULT_MAX_TOKENS)),
                hash_ids=tuple(ids),
                tenant=f"tenant-{i % tenants}",
            )
        )
    return Trace("synthetic", tuple(reqs), prefix_block_tokens=block_tokens)
