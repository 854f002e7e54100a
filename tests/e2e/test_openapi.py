"""The OpenAPI document the scheduler serves is true: it names every route the app serves, and
the real answers of a running cluster (successes and errors) validate against it."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import jsonschema
import pytest

from pdorch.launcher import LocalCluster
from scheduler.app import build_app
from scheduler.config import SchedulerConfig
from scheduler.http.openai_schema import (
    NEUTRAL_EXTENSIONS,
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraAdapterRequest,
    TokenizeRequest,
    parse_body,
)
from scheduler.http.openapi import document
from tests.e2e.helpers import MODEL
from transport.errors import PdorchError
from transport.security import SecurityConfig

pytestmark = pytest.mark.e2e


def test_every_route_is_documented_and_nothing_else() -> None:
    app = build_app(SchedulerConfig(security=SecurityConfig(insecure=True)))
    served = {
        (route.method.lower(), route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(method, path) for path, ops in document()["paths"].items() for method in ops}
    assert served == documented


def test_the_request_examples_are_valid_requests() -> None:
    doc = document()
    for path in (
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
    ):
        content = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        _validator(content["schema"]).validate(content["example"])


def test_null_for_an_optional_field_is_documented_and_taken() -> None:
    """Each optional field of a generation request may be null (meaning not given), in the
    document and in the decoder alike."""
    doc = document()
    for path, kind in (
        ("/v1/completions", CompletionRequest),
        ("/v1/chat/completions", ChatCompletionRequest),
    ):
        content = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        schema, example = content["schema"], content["example"]
        component = doc["components"]["schemas"][kind.__name__]
        optional = set(component["properties"]) - set(component["required"])
        assert {"stream", "n", "max_tokens", "stream_options"} <= optional
        for name in optional:
            body = {**example, name: None}
            _validator(schema).validate(body)
            parse_body(json.dumps(body).encode(), kind)


def test_the_unimplemented_extensions_document_what_the_server_takes() -> None:
    content = document()["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    validator = _validator(content["schema"])
    for field, neutral in NEUTRAL_EXTENSIONS.items():
        for value, taken in [*((v, True) for v in neutral), ("beams", False), (7, False)]:
            body = {**content["example"], field: value}
            assert validator.is_valid(body) is taken, (field, value)
            req = parse_body(json.dumps(body).encode(), CompletionRequest)
            assert (req.unsupported() == "") is taken, (field, value)


def test_the_adapter_requests_document_what_the_server_refuses() -> None:
    # What the document allows, the server takes, and what it refuses, the document refuses: a
    # client (or a fuzzer) generating from the schema reaches the endpoint's logic.
    doc = document()
    for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
        schema = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        validator = _validator(schema)
        for name, ok in (("sql", True), ("a.b:c/d@e+f-g", True), ("x" * 128, True), ("x" * 129, False),
                         ("bad name", False), ("-sql", False), ("sql\n", False), ("", False)):  # fmt: skip
            body = {"lora_name": name, "lora_path": "/adapters/sql"}
            assert validator.is_valid(body) is ok, name
            try:
                parse_body(json.dumps(body).encode(), LoadLoraAdapterRequest)
                taken = True
            except PdorchError:
                taken = False
            assert taken is ok, name
    load = doc["paths"]["/v1/load_lora_adapter"]["post"]["requestBody"]["content"]["application/json"]
    for path in ("", "/a\x00b", "/" * 4097):
        assert not _validator(load["schema"]).is_valid({"lora_name": "sql", "lora_path": path})


def test_the_tokenize_request_documents_its_one_of_prompt_or_messages() -> None:
    # What the document allows, the server's check takes, and what it refuses, the document refuses.
    content = document()["paths"]["/tokenize"]["post"]["requestBody"]["content"]["application/json"]
    validator = _validator(content["schema"])
    chat = [{"role": "user", "content": "hi"}]
    for extra, ok in (
        ({"prompt": "hi"}, True),
        ({"messages": chat}, True),
        ({"prompt": "hi", "messages": None}, True),
        ({"prompt": None, "messages": chat}, True),
        ({}, False),
        ({"prompt": None}, False),
        ({"prompt": None, "messages": None}, False),
        ({"prompt": "hi", "messages": chat}, False),
    ):
        body = {"model": MODEL, **extra}
        assert validator.is_valid(body) is ok, extra
        req = parse_body(json.dumps(body).encode(), TokenizeRequest)
        assert ((req.prompt is None) != (req.messages is None)) is ok, extra


def _validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    # References point into the document's components.
    return jsonschema.Draft202012Validator({**schema, "components": document()["components"]})


def _response_schema(path: str, method: str, status: int, content_type: str) -> dict[str, Any]:
    responses = document()["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} answered {status}, which is not documented"
    content = responses[str(status)]["content"]
    media = content_type.split(";")[0].strip()
    assert media in content, f"{method.upper()} {path} {status} answered {media}, not documented"
    return content[media]["schema"]


async def _check(
    s: aiohttp.ClientSession,
    cluster: LocalCluster,
    method: str,
    path: str,
    expect: int,
    *,
    template: str = "",
    **kwargs: Any,
) -> Any:
    """``template``: the documented path ``path`` is an instance of (default: ``path`` itself)."""
    async with s.request(method, cluster.url + path, **kwargs) as r:
        body = await (r.json() if r.content_type == "application/json" else r.text())
        assert r.status == expect, body
        schema = _response_schema(template or path, method.lower(), r.status, r.content_type)
        _validator(schema).validate(body)
        return body


async def test_real_answers_match_the_document(p2p: LocalCluster) -> None:
    completion = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        served = await _check(s, p2p, "GET", "/openapi.json", 200)
        assert served == document()
        for body in (
            completion,
            {**completion, "return_token_ids": True, "n": 2, "seed": 1},
            {**completion, "logprobs": 2},
            {**completion, "logprobs": 1, "echo": True, "max_tokens": 1},
            {**completion, "prompt_logprobs": 1, "presence_penalty": 0.5, "logit_bias": {"7": -1.0}},
            {**completion, "stream": True},
        ):
            await _check(s, p2p, "POST", "/v1/completions", 200, json=body)
        for body in (chat, {**chat, "logprobs": True, "top_logprobs": 2}, {**chat, "prompt_logprobs": 0}):
            await _check(s, p2p, "POST", "/v1/chat/completions", 200, json=body)
        await _check(s, p2p, "POST", "/v1/completions", 400, json={**completion, "suffix": "x"})
        await _check(s, p2p, "POST", "/v1/completions", 400, data=b"[" * 100 + b"]" * 100)
        await _check(s, p2p, "POST", "/v1/chat/completions", 404, json={**chat, "model": "nope"})
        tokens = await _check(s, p2p, "POST", "/tokenize", 200, json={"model": MODEL, "prompt": "Hello"})
        await _check(s, p2p, "POST", "/tokenize", 200, json={"model": MODEL, "messages": chat["messages"]})
        await _check(s, p2p, "POST", "/tokenize", 400, json={"model": MODEL})
        await _check(s, p2p, "POST", "/detokenize", 200, json={"model": MODEL, "tokens": tokens["tokens"]})
        await _check(s, p2p, "POST", "/detokenize", 404, json={"model": "nope", "tokens": [1]})
        await _check(s, p2p, "GET", f"/v1/models/{MODEL}", 200, template="/v1/models/{model_id}")
        await _check(s, p2p, "GET", "/v1/models/nope", 404, template="/v1/models/{model_id}")
        for path in ("/v1/models", "/v1/cluster", "/health", "/ready", "/metrics"):
            await _check(s, p2p, "GET", path, 200)
