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


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None
    token_ids: list[int] | None = None  # with return_token_ids


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
    logprobs: None
    token_ids: list[int] | None = None


class ChatCompletion(msgspec.Struct):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Model(msgspec.Struct):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(msgspec.Struct):
    object: Literal["list"]
    data: list[Model]


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
