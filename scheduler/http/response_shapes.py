"""The shapes of what the scheduler answers, for its OpenAPI document (``openapi.py``).

The handlers build their answers as plain dicts; these Structs only describe them. A test checks
real answers against the document, so the two cannot drift apart.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    code: str
    param: None = None


class ErrorResponse(msgspec.Struct):
    """OpenAI's error shape, for every error the scheduler answers."""

    error: ErrorDetail


class CachedTokens(msgspec.Struct):
    cached_tokens: int


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: CachedTokens | None = None


class CompletionLogprobs(msgspec.Struct):
    """One entry per token (with echo, the prompt's first; its very first has None)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[ChatLogprob]


class PromptLogprob(msgspec.Struct):
    logprob: float
    decoded_token: str


# vLLM's prompt_logprobs: None for the first prompt token, then token id -> its log-probability.
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None
    token_ids: list[int] | None = None  # with return_token_ids
    prompt_logprobs: PromptLogprobs | None = None  # with prompt_logprobs (and no echo)


class Completion(msgspec.Struct):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class AssistantMessage(msgspec.Struct):
    role: Literal["assistant"]
    content: str


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None
    token_ids: list[int] | None = None
    prompt_logprobs: PromptLogprobs | None = None


class ChatCompletion(msgspec.Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Model(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = None  # a LoRA adapter's base model


class ModelList(msgspec.Struct):
    object: Literal["list"]
    data: list[Model]


class Tokens(msgspec.Struct):
    """vLLM's /tokenize answer."""

    count: int
    max_model_len: int
    tokens: list[int]


class Text(msgspec.Struct):
    """vLLM's /detokenize answer."""

    prompt: str


class Health(msgspec.Struct):
    status: str


class Readiness(msgspec.Struct):
    ready: bool
    prefill_workers: bool
    decode_workers: bool


class ClusterState(msgspec.Struct):
    """Every registered worker with its load, the admission queue, and on Kubernetes the workers
    each pool should have and the autoscaler's last decisions (docs/operations.md)."""

    kv_mode: str
    workers: list[dict[str, Any]]
    expected: dict[str, list[str]]
    autoscaler: dict[str, Any]
    admission: dict[str, int]
