"""What the HTTP layer hands the orchestrator, and what it gets back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from transport.messages import FinishReason, SamplingParams, TokenLogprobs


@dataclass
class GenerationRequest:
    request_id: str
    model: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    tenant: str = ""
    priority: int = 0
    hint: int = 0  # the client's expected output length (a header), 0 = none
    # A LoRA adapter of ``model`` (the client named it as its model), "" = the base model itself.
    adapter: str = ""
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class TokenBatch:
    token_ids: list[int]
    finish_reason: FinishReason | None
    cached_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token, when asked for
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # on the first batch
