"""Token sampling: greedy, or temperature + top-k, min-p and nucleus (top-p) with a per-token
seeded RNG.

The n-th generated token (n = 0 for the token produced by prefill) is drawn from
``np.random.default_rng([seed, n])``. No RNG state carries from one token to the next, so a
prefill worker that samples token 0 and a decode worker that samples tokens 1.. agree exactly
with a single worker that does both.
"""

from __future__ import annotations

import numpy as np

from transport.errors import ErrorCode, PdorchError
from transport.messages import SamplingParams

# SeedSequence entropy must be non-negative; negative seeds wrap to their 64-bit pattern.
_SEED_MASK = (1 << 64) - 1


def validate_sampling(params: SamplingParams) -> None:
    """Raise INVALID_REQUEST for parameters no sampler could honour."""
    if params.max_tokens < 1:
        raise PdorchError(ErrorCode.INVALID_REQUEST, f"max_tokens must be >= 1, got {params.max_tokens}")
    if not np.isfinite(params.temperature) or params.temperature < 0:
        raise PdorchError(ErrorCode.INVALID_REQUEST, f"temperature must be >= 0, got {params.temperature}")
    if not 0.0 < params.top_p <= 1.0:
        raise PdorchError(ErrorCode.INVALID_REQUEST, f"top_p must be in (0, 1], got {params.top_p}")
    if params.top_k < 0:
        raise PdorchError(ErrorCode.INVALID_REQUEST, f"top_k must be >= 0, got {params.top_k}")
    if not 0.0 <= params.min_p <= 1.0:
        raise PdorchError(ErrorCode.INVALID_REQUEST, f"min_p must be in [0, 1], got {params.min_p}")


def nucleus_probabilities(
    logits: np.ndarray, temperature: float, top_p: float, top_k: int = 0, min_p: float = 0.0
) -> np.ndarray:
    """The distribution actually sampled from: softmax(logits / T), cut to the ``top_k`` most
    likely tokens (0: no cut) and to those at least ``min_p`` times as likely as the most likely,
    renormalized, then to the top-p nucleus.

    The nucleus is the smallest set of most likely tokens whose mass reaches ``top_p``; equal
    probabilities are ordered by token id (lowest first), so every cut is deterministic.
    """
    logits = np.asarray(logits, dtype=np.float64)
    # Shift before dividing: a tiny temperature then gives -inf (probability 0), never inf - inf.
    probs = np.exp((logits - logits.max()) / temperature)
    probs /= probs.sum()
    if min_p > 0.0:
        probs = np.where(probs >= min_p * probs.max(), probs, 0.0)
        probs /= probs.sum()
    cut_k = 0 < top_k < probs.size
    if top_p >= 1.0 and not cut_k:
        return probs
    order = np.argsort(-probs, kind="stable")
    keep = top_k if cut_k else order.size
    if top_p < 1.0:
        mass = np.cumsum(probs[order[:keep]])
        # top_p of the top_k's mass (without a top_k cut, exactly top_p, as before there was one).
        target = top_p * mass[-1] if cut_k else top_p
        keep = min(int(np.searchsorted(mass, target, side="left")) + 1, keep)
    nucleus = np.zeros_like(probs)
    nucleus[order[:keep]] = probs[order[:keep]]
    return nucleus / nucleus.sum()


def sample(logits: np.ndarray, params: SamplingParams, index: int) -> int:
    """Pick the token at generated position ``index`` from next-token ``logits`` [vocab]."""
    if params.temperature == 0.0:
        # argmax returns the first maximum: the lowest id wins ties.
        return int(np.argmax(logits))
    probs = nucleus_probabilities(logits, params.temperature, params.top_p, params.top_k, params.min_p)
    rng = np.random.default_rng([params.seed & _SEED_MASK, index])
    cumulative = np.cumsum(probs)
    choice = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    # searchsorted can step past the end only through rounding; never return a zero-mass token.
    choice = min(choice, probs.size - 1)
    while probs[choice] == 0.0:
        choice -= 1
    return choice
