"""Validation of what callers hand the engine core, done up front on the caller's thread.

A request that passes these checks can still fail later for lack of KV blocks, but never for a
malformed prompt, sampling parameters no sampler could honour, or an impossible handoff.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from transport.errors import ErrorCode, PdorchError
from transport.messages import SamplingParams
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.sampler import validate_sampling
from workers.engines.reference.sequence import finish_reason


def check_prompt(
    cfg: ModelConfig,
    prompt_token_ids: Sequence[int] | np.ndarray,
    sampling: SamplingParams,
    generated: int = 0,
) -> np.ndarray:
    """The prompt as an index array; raises INVALID_REQUEST or PROMPT_TOO_LONG. ``generated``: how
    many of its last tokens are a resumed request's earlier output (fewer than ``max_tokens``)."""
    validate_sampling(sampling)
    if not 0 <= generated < min(sampling.max_tokens, len(prompt_token_ids)):
        raise PdorchError(
            ErrorCode.INVALID_REQUEST,
            f"a resumed request must have generated fewer than max_tokens ({sampling.max_tokens}) "
            f"tokens and keep a prompt; got {generated} of {len(prompt_token_ids)} prompt tokens",
        )
    prompt = np.asarray(prompt_token_ids, dtype=np.intp)
    if prompt.ndim != 1 or prompt.size == 0:
        raise PdorchError(ErrorCode.INVALID_REQUEST, "prompt must be a non-empty list of token ids")
    if prompt.size > cfg.max_model_len:
        raise PdorchError(
            ErrorCode.PROMPT_TOO_LONG,
            f"prompt has {prompt.size} tokens, the model allows {cfg.max_model_len}",
        )
    if prompt.min() < 0 or prompt.max() >= cfg.vocab_size:
        raise PdorchError(ErrorCode.INVALID_REQUEST, f"token ids must be in [0, {cfg.vocab_size})")
    return prompt


def check_handoff_length(cfg: ModelConfig, num_prompt_tokens: int) -> None:
    """A handed-off prompt must leave room for at least one more token."""
    if not 1 <= num_prompt_tokens < cfg.max_model_len:
        raise PdorchError(
            ErrorCode.PROMPT_TOO_LONG if num_prompt_tokens > 0 else ErrorCode.INVALID_REQUEST,
            f"cannot decode after a prompt of {num_prompt_tokens} tokens (max_model_len {cfg.max_model_len})",
        )


def check_decode_start(
    cfg: ModelConfig,
    request_id: str,
    prompt_len: int,
    first_token: int,
    sampling: SamplingParams,
    prompt_token_ids: Sequence[int] | None,
    generated: int = 0,
) -> np.ndarray | None:
    """Validate a handoff's continuation; returns the prompt as an index array when given."""
    validate_sampling(sampling)
    if not 0 <= generated < min(sampling.max_tokens, prompt_len):
        raise PdorchError(ErrorCode.INVALID_REQUEST, f"{request_id}: bad resume point {generated}")
    if not 0 <= first_token < cfg.vocab_size:
        raise PdorchError(ErrorCode.INVALID_REQUEST, f"first token {first_token} outside the vocabulary")
    if finish_reason(cfg, sampling, prompt_len, first_token, 1, generated) is not None:
        raise PdorchError(ErrorCode.INVALID_REQUEST, f"request {request_id} already finished at token 0")
    if prompt_token_ids is None:
        return None
    prompt = check_prompt(cfg, prompt_token_ids, sampling, generated)
    if len(prompt) != prompt_len:
        raise PdorchError(
            ErrorCode.INVALID_REQUEST,
            f"{request_id}: prompt_token_ids has {len(prompt)} tokens, prompt_len is {prompt_len}",
        )
    return prompt


def as_pdorch_error(exc: Exception) -> PdorchError:
    """An exception raised inside a step, as the error the failed request reports."""
    if isinstance(exc, PdorchError):
        return exc
    return PdorchError(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
