"""What a request does to the model's logits before a token is drawn: bias, penalties, min_tokens.

All of it is a pure function of the logits, the sampling parameters, the output index and the
tokens seen so far, so a token drawn on the prefill worker (output index 0) and the ones drawn on
the decode worker agree with a single worker that draws them all, and a resumed request (whose
prompt ends with its earlier output) continues exactly.

Semantics, as vLLM implements them:

- ``logit_bias``: added to the token's logit.
- ``presence_penalty`` / ``frequency_penalty`` (OpenAI): subtracted once per output token seen, or
  once per occurrence, from that token's logit. Only the request's *output* counts.
- ``repetition_penalty`` (vLLM, from CTRL): a token seen in the prompt or the output has its logit
  divided by the penalty when positive, multiplied when negative.
- ``min_tokens``: EOS (unless ``ignore_eos``) and ``stop_token_ids`` cannot be drawn before the
  output has that many tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from transport.messages import SamplingParams


class TokenHistory:
    """The tokens a request has seen: its prompt and its output so far (penalties need them)."""

    __slots__ = ("output_counts", "seen")

    def __init__(self, prompt: Sequence[int], output: Sequence[int] = ()) -> None:
        self.output_counts: Counter[int] = Counter(output)
        self.seen: set[int] = set(prompt) | set(output)

    @classmethod
    def of_resumed(cls, prompt: Sequence[int], generated: int) -> TokenHistory:
        """A resumed request's prompt ends with its ``generated`` earlier output tokens."""
        cut = len(prompt) - generated
        return cls(prompt[:cut], prompt[cut:])

    def add(self, token: int) -> None:
        self.output_counts[token] += 1
        self.seen.add(token)


def needs_processing(params: SamplingParams) -> bool:
    return bool(params.logit_bias or params.penalized or params.min_tokens)


def process_logits(
    logits: np.ndarray,
    params: SamplingParams,
    index: int,
    history: TokenHistory | None,
    eos_token_id: int,
) -> np.ndarray:
    """The logits to draw output token ``index`` from (a copy; ``logits`` stays the model's)."""
    out = np.array(logits, dtype=np.float64)
    vocab = out.shape[0]
    for token, bias in params.logit_bias.items():
        if 0 <= token < vocab:
            out[token] += bias
    if history is not None and params.penalized:
        if params.repetition_penalty != 1.0 and history.seen:
            ids = np.fromiter((t for t in history.seen if 0 <= t < vocab), dtype=np.intp)
            vals = out[ids]
            out[ids] = np.where(vals > 0, vals / params.repetition_penalty, vals * params.repetition_penalty)
        if (params.presence_penalty or params.frequency_penalty) and history.output_counts:
            ids = np.fromiter(history.output_counts.keys(), dtype=np.intp)
            counts = np.fromiter(history.output_counts.values(), dtype=np.float64)
            keep = (ids >= 0) & (ids < vocab)
            out[ids[keep]] -= params.presence_penalty + params.frequency_penalty * counts[keep]
    if index < params.min_tokens:
        banned = [t for t in params.stop_token_ids if 0 <= t < vocab]
        if not params.ignore_eos and 0 <= eos_token_id < vocab:
            banned.append(eos_token_id)
        out[banned] = -np.inf
    return out
