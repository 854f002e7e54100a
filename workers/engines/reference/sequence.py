"""Per-request state inside the engine core, and the rules that end a request.

A prompt's life: waiting (no blocks) -> prefilling (blocks for the whole prompt held; its KV is
filled chunk by chunk, the first ``num_cached`` positions straight from the prefix cache) ->
running (decoding one token per step) -> finished. Handed-off DECODE sequences start running.
"""

from __future__ import annotations

import enum

import numpy as np

from transport.messages import FinishReason, SamplingParams, TokenLogprobs
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.logits_processors import TokenHistory
from workers.engines.reference.lora.adapter import LoraAdapter
from workers.engines.reference.model import LayerKvCallback


class SequenceKind(enum.Enum):
    PREFILL_ONLY = "prefill_only"  # disaggregated prefill: first token, then hand KV off
    GENERATE = "generate"  # colocated: prefill, then decode here
    DECODE = "decode"  # disaggregated decode: KV arrived from a prefill worker


class EngineSequence:
    """One request's progress. Only the engine thread mutates it, except ``cancelled``."""

    __slots__ = (
        "adapter",
        "admitted_at",
        "block_hashes",
        "blocks",
        "cancelled",
        "history",
        "kind",
        "last_token",
        "num_cached",
        "num_computed",
        "num_generated",
        "num_registered",
        "on_layer",
        "output_offset",
        "prompt",
        "prompt_len",
        "prompt_logprobs",
        "request_id",
        "sampling",
    )

    def __init__(
        self,
        request_id: str,
        kind: SequenceKind,
        prompt_len: int,
        sampling: SamplingParams,
        prompt: np.ndarray | None = None,
        on_layer: LayerKvCallback | None = None,
        block_hashes: list[int] | None = None,
        output_offset: int = 0,
        adapter: LoraAdapter | None = None,
    ) -> None:
        self.request_id = request_id
        self.adapter = adapter  # referenced in the engine's adapter slots until released
        self.kind = kind
        self.prompt_len = prompt_len
        self.prompt = prompt  # None for DECODE: its prompt lives in the cache already
        self.sampling = sampling
        self.on_layer = on_layer
        # Chained hashes of the prompt's full blocks; empty when prefix caching is off.
        self.block_hashes: list[int] = block_hashes or []
        self.blocks: list[int] = []
        self.num_computed = 0  # prompt positions whose KV is in the blocks (cached or computed)
        self.num_cached = 0  # of those, how many came from the prefix cache
        self.num_registered = 0  # leading full prompt blocks already offered to the prefix cache
        self.num_generated = 0  # tokens generated here
        # A resumed request: the last ``output_offset`` prompt tokens are its own earlier output,
        # so the first token generated here has output index ``output_offset``.
        self.output_offset = output_offset
        self.last_token = -1
        self.admitted_at = -1
        self.cancelled = False
        # Prompt positions 1.. with their log-probabilities, filled chunk by chunk when asked for.
        self.prompt_logprobs: list[TokenLogprobs] | None = [] if sampling.prompt_logprobs >= 0 else None
        # The tokens seen so far, kept only when penalties depend on them.
        self.history: TokenHistory | None = None
        if sampling.penalized and prompt is not None:
            self.history = TokenHistory.of_resumed(prompt.tolist(), output_offset)

    @property
    def feed_position(self) -> int:
        """Where the last generated token goes when it is fed back in."""
        return self.prompt_len + self.num_generated - 1

    @property
    def next_output_index(self) -> int:
        """The request's output index of the next token sampled here (seeds its RNG draw)."""
        return self.output_offset + self.num_generated


def finish_reason(
    cfg: ModelConfig,
    sampling: SamplingParams,
    prompt_len: int,
    token: int,
    num_generated: int,
    output_offset: int = 0,
) -> FinishReason | None:
    """Whether generating ``token`` (the ``num_generated``-th here, counting from 1) ends the request.

    ``prompt_len`` includes a resumed request's earlier output; ``output_offset`` is its length.
    """
    if token == cfg.eos_token_id and not sampling.ignore_eos:
        return FinishReason.STOP
    if token in sampling.stop_token_ids:
        return FinishReason.STOP
    if output_offset + num_generated >= sampling.max_tokens:
        return FinishReason.LENGTH
    if prompt_len + num_generated >= cfg.max_model_len:
        return FinishReason.LENGTH
    return None
