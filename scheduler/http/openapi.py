"""The scheduler's OpenAPI 3.1 document, served at ``GET /openapi.json``.

Request bodies are the JSON Schemas of the very Structs that decode them
(``openai_schema.py``); responses are those of ``response_shapes.py``, which a test checks real
answers against. docs/operations.md says how to fuzz the API with it (schemathesis).
"""

from __future__ import annotations

import functools
from typing import Any

import msgspec
from aiohttp import web

from scheduler.http import response_shapes as r
from scheduler.http.json_body import json_response
from scheduler.http.openai import HINT_HEADER
from scheduler.http.openai_schema import (
    NEUTRAL_EXTENSIONS,
    REQUEST_KINDS,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LoadLoraAdapterRequest,
    TokenizeRequest,
    UnloadLoraAdapterRequest,
)

_REF = "#/components/schemas/{name}"

# The error statuses a generation request may get, and why.
_GENERATION_ERRORS = {
    "400": "malformed or unsupported request, prompt too long, nested too deeply",
    "401": "missing or wrong API key (when the scheduler has api_keys)",
    "404": "unknown model",
    "408": "the request body did not arrive in time",
    "413": "the request body is over max_body_bytes (once decompressed too)",
    "415": "a Content-Encoding other than gzip, deflate or identity",
    "429": "admission queue full, or no room within queue_timeout_s (with Retry-After)",
    "503": "no worker of a needed role, or the request ran out of workers to move to",
    "504": "a deadline passed before the first token",
}


def _ref(struct: type) -> dict[str, str]:
    return {"$ref": _REF.format(name=struct.__name__)}


def _json(struct: type) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(struct)}}


def _error(description: str) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": _json(r.ErrorResponse)}
    if description.startswith(("admission", "no worker")):
        response["headers"] = {"Retry-After": {"schema": {"type": "integer", "minimum": 1}}}
    return response


def _generation(summary: str, request: type, response: type, example: dict[str, Any]) -> dict[str, Any]:
    ok = {
        "description": "the completion; with stream=true, server-sent events (data: <chunk>, then [DONE])",
        "content": {**_json(response), "text/event-stream": {"schema": {"type": "string"}}},
    }
    return {
        "post": {
            "summary": summary,
            "parameters": [
                {
                    "name": HINT_HEADER,
                    "in": "header",
                    "required": False,
                    "description": "the client's guess of the output length, for the predictor",
                    "schema": {"type": "integer", "minimum": 0},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request), "example": example}},
            },
            "responses": {"200": ok, **{code: _error(why) for code, why in _GENERATION_ERRORS.items()}},
        }
    }


# The error statuses of /tokenize and /detokenize.
_TOKENIZER_ERRORS = {
    "400": "malformed request (neither or both of prompt and messages; a token outside the vocabulary)",
    "401": "missing or wrong API key (when the scheduler has api_keys)",
    "404": "unknown model",
    "408": "the request body did not arrive in time",
    "413": "the request body is over max_body_bytes (once decompressed too)",
    "415": "a Content-Encoding other than gzip, deflate or identity",
    "503": "no worker is registered yet",
}


def _post(
    summary: str, request: type, example: dict[str, Any], ok: dict[str, Any], errors: dict[str, str]
) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref(request), "example": example}},
            },
            "responses": {"200": ok, **{code: _error(why) for code, why in errors.items()}},
        }
    }


def _tokenizer(summary: str, request: type, response: type, example: dict[str, Any]) -> dict[str, Any]:
    return _post(summary, request, example, _ok(response), _TOKENIZER_ERRORS)


# The error statuses of the run-time LoRA endpoints.
_LORA_ERRORS = {
    "400": "malformed request, a name already loaded (without load_inplace), a path no worker may "
    "read or that holds no usable adapter",
    "401": "not an admin key (lora.admin_keys), or no API key (when the scheduler has api_keys)",
    "404": "run-time loading is off (lora.runtime_updates), an unknown base model, or (unload) an "
    "adapter nobody serves",
    "408": "the request body did not arrive in time",
    "413": "the request body is over max_body_bytes (once decompressed too)",
    "415": "a Content-Encoding other than gzip, deflate or identity",
    "503": "no worker serves the base model",
    "504": "another adapter operation held the cluster for lora.timeout_s",
}


def _lora(summary: str, request: type, example: dict[str, Any]) -> dict[str, Any]:
    ok = {
        "description": "done (plain text, as vLLM; it names the workers that failed, if any)",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    return _post(summary, request, example, ok, _LORA_ERRORS)


def _get(
    summary: str, responses: dict[str, Any], parameters: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": responses}
    if parameters:
        operation["parameters"] = parameters
    return {"get": operation}


def _optionals_take_null(schema: dict[str, Any]) -> None:
    """Let every optional property of a request schema be null too, as the decoder takes it."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        if name in required or prop == {} or {"type": "null"} in prop.get("anyOf", ()):
            continue
        if "anyOf" in prop:
            prop["anyOf"].append({"type": "null"})
        else:
            default = {"default": prop.pop("default")} if "default" in prop else {}
            inner = dict(prop)
            prop.clear()
            prop.update(anyOf=[inner, {"type": "null"}], **default)


@functools.cache
def document() -> dict[str, Any]:
    structs = [
        CompletionRequest,
        ChatCompletionRequest,
        r.ErrorResponse,
        r.Completion,
        r.ChatCompletion,
        TokenizeRequest,
        DetokenizeRequest,
        LoadLoraAdapterRequest,
        UnloadLoraAdapterRequest,
        r.ModelList,
        r.Model,
        r.Tokens,
        r.Text,
        r.ClusterState,
        r.Health,
        r.Readiness,
    ]
    _, components = msgspec.json.schema_components(structs, ref_template=_REF)
    # In what parse_body decodes, null for an optional field means "not given".
    _, requests = msgspec.json.schema_components(REQUEST_KINDS, ref_template=_REF)
    for name in requests:
        _optionals_take_null(components[name])
    # /tokenize takes a prompt or messages, exactly one of them (null is "not given").
    components[TokenizeRequest.__name__]["oneOf"] = [
        {"required": [field], "properties": {field: {"not": {"type": "null"}}}}
        for field in ("prompt", "messages")
    ]
    for kind in (CompletionRequest, ChatCompletionRequest):
        properties = components[kind.__name__]["properties"]
        for field, neutral in NEUTRAL_EXTENSIONS.items():  # the only values taken (else a 400)
            properties[field] = {"enum": list(neutral), "description": "not supported: neutral values only"}
    model = "pdorch-reference"
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "pdorch scheduler",
            "version": "1",
            "description": "OpenAI-compatible completions served by prefill/decode disaggregation.",
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        # Bearer API keys when the scheduler has api_keys, none otherwise.
        "security": [{}, {"bearer": []}],
        "paths": {
            "/v1/completions": _generation(
                "Complete a prompt (or a batch of prompts)",
                CompletionRequest,
                r.Completion,
                {"model": model, "prompt": "Hello, pdorch", "max_tokens": 4},
            ),
            "/v1/chat/completions": _generation(
                "Complete a chat",
                ChatCompletionRequest,
                r.ChatCompletion,
                {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4},
            ),
            "/v1/models": _get(
                "The models the registered workers serve",
                {"200": _ok(r.ModelList), "401": _error(_GENERATION_ERRORS["401"])},
            ),
            "/v1/models/{model_id}": _get(
                "One model the registered workers serve",
                {
                    "200": _ok(r.Model),
                    "401": _error(_GENERATION_ERRORS["401"]),
                    "404": _error("no registered worker serves it"),
                },
                [{"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
            ),
            "/tokenize": _tokenizer(
                "vLLM's /tokenize: the token ids a prompt or chat is sent to the model as",
                TokenizeRequest,
                r.Tokens,
                {"model": model, "prompt": "Hello, pdorch"},
            ),
            "/detokenize": _tokenizer(
                "vLLM's /detokenize: the text of token ids",
                DetokenizeRequest,
                r.Text,
                {"model": model, "tokens": [72, 105]},
            ),
            "/v1/load_lora_adapter": _lora(
                "vLLM's: load a LoRA adapter on every worker of its base model (and on those that join)",
                LoadLoraAdapterRequest,
                {"lora_name": "sql", "lora_path": "/adapters/sql"},
            ),
            "/v1/unload_lora_adapter": _lora(
                "vLLM's: unload a LoRA adapter from every worker",
                UnloadLoraAdapterRequest,
                {"lora_name": "sql"},
            ),
            "/v1/cluster": _get("Workers, their load, admission", {"200": _ok(r.ClusterState)}),
            "/health": _get("The scheduler process serves HTTP", {"200": _ok(r.Health)}),
            "/ready": _get(
                "Requests can be served: a prefill and a decode worker, or one that serves them whole",
                {"200": _ok(r.Readiness), "503": {"description": "not ready", "content": _json(r.Readiness)}},
            ),
            "/metrics": _get(
                "Prometheus metrics",
                {
                    "200": {
                        "description": "text exposition",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            ),
            "/openapi.json": _get(
                "This document",
                {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            ),
        },
    }


def _ok(struct: type) -> dict[str, Any]:
    return {"description": "OK", "content": _json(struct)}


async def openapi(request: web.Request) -> web.Response:
    return json_response(document())
