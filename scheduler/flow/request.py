"""What the HTTP layer hands the orchestrator, and what it gets back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from transport.messages import FinishReason, SamplingParams, TokenLogprobs
from transport.token_ids import pack_token_ids


@dataclass
class GenerationRequest:
    request_id: str
    model: str
    prompt_token_ids: np.ndarray  # int32 (transport/token_ids.py): what the jobs carry
    sampling: SamplingParams
    tenant: str = ""
    priority: int = 0
    hint: int = 0  # the client's expected output length (a header), 0 = none
    # A LoRA adapter of ``model`` (the client named it as its model), "" = the base model itself.
    adapter: str = ""
    # The client's own objectives (headers), 0 = the scheduler's configured ``slo``.
    ttft_slo_s: float = 0.0
    tpot_slo_s: float = 0.0
    arrival: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.prompt_token_ids = pack_token_ids(self.prompt_token_ids)


@dataclass
class TokenBatch:
    token_ids: list[int]
    finish_reason: FinishReason | None
    cached_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token, when asked for
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # on the first batch
