"""vLLM's log-probabilities, read into pdorch's ``TokenLogprobs`` (by token id, not text).

pdorch asks vLLM's completions API for ``logprobs`` with ``return_tokens_as_token_ids`` (so the
``top_logprobs`` keys read ``token_id:N``, never ambiguous text) and for ``prompt_logprobs`` (keyed
by token id already). vLLM always includes the sampled token among the top ones; pdorch keeps the
``k`` most likely, ordered by log-probability then id, as the reference engine does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from transport.errors import ErrorCode, PdorchError
from transport.messages import TokenLogprobs


def _token_id(key: str) -> int:
    try:
        return int(key.rsplit(":", 1)[-1])
    except ValueError:
        raise PdorchError(ErrorCode.JOB_FAILED, f"vLLM logprobs key {key!r} is not a token id") from None


def _entry(logprob: float, alternatives: dict[int, float], top: int) -> TokenLogprobs:
    ordered = sorted(alternatives.items(), key=lambda item: (-item[1], item[0]))[:top]
    return TokenLogprobs(float(logprob), [t for t, _ in ordered], [float(v) for _, v in ordered])


def token_logprobs(choice: dict[str, Any], top: int) -> list[TokenLogprobs]:
    """The logprobs of a completion choice's tokens (streamed chunk or whole), [] if none."""
    found = choice.get("logprobs")
    if not found:
        return []
    values: Sequence[float] = found.get("token_logprobs") or []
    tops: Sequence[dict[str, float] | None] = found.get("top_logprobs") or [None] * len(values)
    return [
        _entry(value, {_token_id(k): v for k, v in (alternatives or {}).items()}, top)
        for value, alternatives in zip(values, tops, strict=True)
    ]


def prompt_logprobs(
    choice: dict[str, Any], prompt: Sequence[int] | np.ndarray, top: int
) -> list[TokenLogprobs]:
    """vLLM's ``prompt_logprobs`` (None for the first token, then one map per token keyed by id)."""
    found = choice.get("prompt_logprobs")
    if not found:
        return []
    out = []
    for token, entries in zip([int(t) for t in prompt[1:]], found[1:], strict=True):
        alternatives = {int(k): float(v["logprob"]) for k, v in (entries or {}).items()}
        if token not in alternatives:
            raise PdorchError(ErrorCode.JOB_FAILED, f"vLLM gave no logprob for prompt token {token}")
        out.append(_entry(alternatives[token], alternatives, top))
    return out
