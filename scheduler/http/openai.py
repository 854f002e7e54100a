"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

from scheduler.admission.gate import Ticket
from scheduler.admission.queue import QueueFull
from scheduler.app_keys import ADMISSION, CLUSTER, CONFIG, METRICS, ORCHESTRATOR, PLANNER, TOKENIZERS
from scheduler.cluster import Cluster
from scheduler.config import SchedulerConfig
from scheduler.flow import GenerationRequest, TokenBatch
from scheduler.http import sse
from scheduler.http.errors import error_body
from scheduler.http.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    bad,
    chat_messages,
    check_common,
    completion_prompt,
    parse_body,
    stop_strings,
)
from scheduler.placement.types import PlacementRequest
from scheduler.stop_strings import TextStream
from scheduler.tokenizer.base import Tokenizer
from scheduler.tokenizer.registry import TokenizerRegistry
from transport.errors import ErrorCode, PdorchError
from transport.messages import FinishReason, Hello, SamplingParams

_Req = TypeVar("_Req", CompletionRequest, ChatCompletionRequest)


@dataclass
class _Job:
    """A validated request plus how to answer it."""

    greq: GenerationRequest
    tokenizer: Tokenizer
    stop: list[str]
    stream: bool
    include_usage: bool
    return_token_ids: bool
    chat: bool
    created: int = field(default_factory=lambda: int(time.time()))


def _tenant(request: web.Request, cfg: SchedulerConfig) -> str:
    keys = cfg.api_keys
    header = request.headers.get("Authorization", "")
    token = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if keys and token not in keys:
        raise PdorchError(ErrorCode.UNAUTHORIZED, "missing or invalid API key")
    return token[:12] if keys else ""


def _tokenizer_for(cluster: Cluster, tokenizers: TokenizerRegistry, model: str) -> tuple[Tokenizer, Hello]:
    hello = cluster.hello_for_model(model)
    if hello is None:
        if not cluster.workers():
            raise PdorchError(ErrorCode.NO_WORKER, "no worker is registered yet")
        known = ", ".join(cluster.models()) or "none"
        raise PdorchError(ErrorCode.MODEL_NOT_FOUND, f"model {model!r} does not exist (served: {known})")
    return tokenizers.get(hello.tokenizer), hello


# A client's guess of the output length, fed to the output-length predictor.
HINT_HEADER = "X-Expected-Output-Tokens"


def _hint(request: web.Request) -> int:
    raw = request.headers.get(HINT_HEADER)
    if raw is None:
        return 0
    try:
        value = int(raw)
    except ValueError:
        raise bad(f"header {HINT_HEADER} must be a whole number of tokens") from None
    if value < 0:
        raise bad(f"header {HINT_HEADER} must not be negative")
    return value


async def _read(request: web.Request, limit: int, timeout_s: float) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise bad(f"request body exceeds {limit} bytes")
    try:
        async with asyncio.timeout(timeout_s):
            return await request.read()
    except TimeoutError:
        raise PdorchError(
            ErrorCode.REQUEST_TIMEOUT, f"request body not received within {timeout_s:g}s"
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise bad(f"request body exceeds {limit} bytes") from None
    except Exception as e:  # truncated upload, body over aiohttp's client_max_size
        raise bad(f"cannot read request body: {e}") from None


async def _body(request: web.Request, kind: type[_Req]) -> _Req:
    cfg = request.app[CONFIG]
    raw = await _read(request, cfg.max_body_bytes, cfg.http.body_timeout_s)
    return parse_body(raw, kind, cfg.http.max_json_depth)


def _build(request: web.Request, req: CompletionRequest | ChatCompletionRequest, chat: bool) -> _Job:
    cfg = request.app[CONFIG]
    tenant = _tenant(request, cfg)
    max_tokens = (
        req.max_completion_tokens if chat and req.max_completion_tokens is not None else req.max_tokens
    )
    max_tokens = check_common(req, max_tokens, default_max=cfg.default_max_tokens, limit=cfg.max_tokens_limit)
    tokenizer, hello = _tokenizer_for(request.app[CLUSTER], request.app[TOKENIZERS], req.model)
    max_model_len = hello.max_model_len
    if chat:
        ids = tokenizer.apply_chat_template(chat_messages(req))
    else:
        prompt = completion_prompt(req)
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        if (
            hello.vocab_size
            and (bad_id := next((t for t in ids if not 0 <= t < hello.vocab_size), None)) is not None
        ):
            raise bad(f"token id {bad_id} is outside the model's vocabulary (size {hello.vocab_size})")
    limit = min(cfg.max_prompt_tokens, max_model_len - 1) if max_model_len > 1 else cfg.max_prompt_tokens
    if len(ids) > limit:
        raise PdorchError(ErrorCode.PROMPT_TOO_LONG, f"prompt has {len(ids)} tokens; the limit is {limit}")
    temperature = 1.0 if req.temperature is None else req.temperature
    # Seeded sampling with a seed we draw keeps prefill and decode workers on the same random stream.
    seed = req.seed if req.seed is not None else random.getrandbits(63)
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=seed,
        ignore_eos=req.ignore_eos,
    )
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
    greq = GenerationRequest(
        rid, req.model, ids, sampling, tenant=tenant, priority=req.priority, hint=_hint(request)
    )
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return _Job(greq, tokenizer, stop_strings(req), req.stream, include_usage, req.return_token_ids, chat)


async def completions(request: web.Request) -> web.StreamResponse:
    req = await _body(request, CompletionRequest)
    return await _serve(request, _build(request, req, chat=False))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    req = await _body(request, ChatCompletionRequest)
    return await _serve(request, _build(request, req, chat=True))


async def models(request: web.Request) -> web.Response:
    served = request.app[CLUSTER].models()
    data = [{"id": m, "object": "model", "created": 0, "owned_by": "pdorch"} for m in served]
    return web.json_response({"object": "list", "data": data})


# ---------------------------------------------------------------------------------------------


@dataclass
class _Progress:
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    cached_tokens: int = 0
    error: str = ""


async def _text_deltas(
    job: _Job, batches: AsyncIterator[TokenBatch], progress: _Progress
) -> AsyncIterator[str]:
    """Text deltas, one per batch of tokens (empty while the text is held back: an incomplete UTF-8
    sequence, a possible stop string), until the request finishes or a stop string shows up
    (which ends generation)."""
    text = TextStream(job.tokenizer.decoder(), job.stop)
    async for batch in batches:
        progress.token_ids.extend(batch.token_ids)
        progress.cached_tokens = max(progress.cached_tokens, batch.cached_tokens)
        delta = text.feed(batch.token_ids)
        if text.stopped:
            progress.finish_reason = FinishReason.STOP
            yield delta
            return
        if batch.finish_reason is not None:
            progress.finish_reason = str(batch.finish_reason)
            yield delta + text.finish()
            return
        yield delta


def _usage(job: _Job, progress: _Progress) -> dict[str, Any]:
    prompt = len(job.greq.prompt_token_ids)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": len(progress.token_ids),
        "total_tokens": prompt + len(progress.token_ids),
    }
    if progress.cached_tokens:
        usage["prompt_tokens_details"] = {"cached_tokens": progress.cached_tokens}
    return usage


def _choice(
    job: _Job, text: str, finish: str | None, token_ids: list[int] | None, delta: bool
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
    if job.chat and delta:
        choice["delta"] = {"content": text} if text else {}
    elif job.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    if token_ids is not None and job.return_token_ids:
        choice["token_ids"] = token_ids
    return choice


def _envelope(job: _Job, chunk: bool) -> dict[str, Any]:
    kind = ("chat.completion" if job.chat else "text_completion") + (".chunk" if chunk and job.chat else "")
    return {"id": job.greq.request_id, "object": kind, "created": job.created, "model": job.greq.model}


async def _serve(request: web.Request, job: _Job) -> web.StreamResponse:
    metrics, orchestrator = request.app[METRICS], request.app[ORCHESTRATOR]
    metrics.prompt_tokens.inc(len(job.greq.prompt_token_ids))
    progress = _Progress()
    first_at: float | None = None
    try:
        plan = orchestrator.plan(job.greq)
        async with await _admit(request.app, job, plan[1]):
            batches = orchestrator.generate(job.greq, plan)
            async with contextlib.aclosing(batches):
                deltas = _text_deltas(job, batches, progress)
                async with contextlib.aclosing(deltas):
                    # Wait for the first token before answering, so that failures before it
                    # (no worker, overload, a lost worker) get a proper HTTP status.
                    first = await anext(deltas, "")
                    first_at = time.monotonic()
                    if job.stream:
                        return await _stream(request, job, first, deltas, progress)
                    text = first + "".join([d async for d in deltas])
                    return _complete(job, text, progress)
    except PdorchError as e:
        progress.error = str(e.code)
        raise
    finally:
        metrics.requests.labels(progress.error or "ok").inc()
        metrics.tokens_generated.inc(len(progress.token_ids))
        if first_at is not None:
            now = time.monotonic()
            ttft = first_at - job.greq.arrival
            tpot = (now - first_at) / (len(progress.token_ids) - 1) if len(progress.token_ids) > 1 else None
            metrics.ttft.observe(ttft)
            metrics.e2e.observe(now - job.greq.arrival)
            if tpot is not None:
                metrics.tpot.observe(tpot)
            metrics.slo.record(ttft, tpot)
        elif progress.error in _NO_CAPACITY:
            # Turned away or timed out before a first token: a TTFT miss, or overload would look healthy.
            metrics.slo.record(math.inf, None)


# Failures before the first token that mean "no capacity in time" (not a bad request, not a lost
# worker): they count against the TTFT objective.
_NO_CAPACITY = frozenset({ErrorCode.QUEUE_FULL, ErrorCode.DEADLINE_EXCEEDED})


async def _admit(app: web.Application, job: _Job, preq: PlacementRequest) -> Ticket:
    """Wait in the fair-share queue until placement finds room for the request (or give up)."""
    cfg, planner = app[CONFIG], app[PLANNER]
    if not app[CLUSTER].can_serve(cfg.colocated):
        raise PdorchError(ErrorCode.NO_WORKER, "no worker of a needed role is available")
    try:
        return await app[ADMISSION].acquire(
            job.greq.tenant,
            job.greq.priority,
            cfg.queue_timeout_s,
            has_room=lambda: planner.has_room(preq),
        )
    except PdorchError as e:
        if e.code is ErrorCode.DEADLINE_EXCEEDED:
            raise QueueFull(f"no capacity within {cfg.queue_timeout_s:g}s; retry later", 1.0) from None
        raise


def _complete(job: _Job, text: str, progress: _Progress) -> web.Response:
    body = _envelope(job, chunk=False)
    body["choices"] = [_choice(job, text, progress.finish_reason, progress.token_ids, delta=False)]
    body["usage"] = _usage(job, progress)
    return web.json_response(body)


async def _stream(
    request: web.Request, job: _Job, first: str, deltas: AsyncIterator[str], progress: _Progress
) -> web.StreamResponse:
    resp = await sse.open_stream(request)
    sent_ids = 0

    async def emit(text: str, finish: str | None) -> None:
        nonlocal sent_ids
        chunk = _envelope(job, chunk=True)
        ids = progress.token_ids[sent_ids:]
        sent_ids = len(progress.token_ids)
        chunk["choices"] = [_choice(job, text, finish, ids, delta=True)]
        if job.include_usage:
            chunk["usage"] = None
        await sse.send_event(resp, chunk)

    try:
        if job.chat:
            role = _envelope(job, chunk=True)
            role["choices"] = [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            ]
            await sse.send_event(resp, role)
        # Each piece goes out as soon as it exists (with its token ids, when asked for them);
        # the finish reason follows in a last chunk of its own, as vLLM and OpenAI send it.
        if first or job.return_token_ids:
            await emit(first, None)
        async for delta in deltas:
            if delta or (job.return_token_ids and len(progress.token_ids) > sent_ids):
                await emit(delta, None)
        await emit("", progress.finish_reason)
        if job.include_usage:
            tail = _envelope(job, chunk=True)
            tail["choices"] = []
            tail["usage"] = _usage(job, progress)
            await sse.send_event(resp, tail)
    except PdorchError as e:
        # Headers are gone; the error travels as an event, which OpenAI clients raise.
        progress.error = str(e.code)
        await sse.send_event(resp, error_body(e))
    await sse.send_done(resp)
    return resp
