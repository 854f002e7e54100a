"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from aiohttp import web

from scheduler.admission.gate import Ticket
from scheduler.admission.queue import QueueFull
from scheduler.app_keys import ADMISSION, CLUSTER, CONFIG, METRICS, ORCHESTRATOR, PLANNER, TOKENIZERS
from scheduler.cluster import Cluster
from scheduler.config import SchedulerConfig
from scheduler.flow import GenerationRequest
from scheduler.http import sse
from scheduler.http.choices import Choice, Item, Progress, choices, generate, merge
from scheduler.http.errors import error_body
from scheduler.http.json_body import json_response
from scheduler.http.logprobs_format import chat_logprobs, completion_logprobs
from scheduler.http.openai_schema import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    bad,
    chat_messages,
    check_common,
    completion_prompts,
    stop_strings,
)
from scheduler.http.request_io import client_tenant, request_body
from scheduler.placement.types import PlacementRequest
from scheduler.tokenizer.base import GIL_FREE_CHARS, Tokenizer
from scheduler.tokenizer.registry import TokenizerRegistry
from transport.errors import ErrorCode, PdorchError
from transport.messages import Hello, SamplingParams, TokenLogprobs
from transport.token_ids import pack_token_ids


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
    echo: bool = False  # completions: the prompt's text (and logprobs, when asked for) come first
    n: int = 1  # choices
    seeded: bool = False  # the client gave the seed (choice i samples with seed + i)
    created: int = field(default_factory=lambda: int(time.time()))

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])


# How much of a model name the client sent an error shows (the body may hold megabytes of it).
_SHOWN_CHARS = 256


def _tokenizer_for(cluster: Cluster, tokenizers: TokenizerRegistry, model: str) -> tuple[Tokenizer, Hello]:
    hello = cluster.hello_for_model(model)
    if hello is None:
        if not cluster.workers():
            raise PdorchError(ErrorCode.NO_WORKER, "no worker is registered yet")
        known = ", ".join(cluster.models()) or "none"
        shown = model if len(model) <= _SHOWN_CHARS else model[:_SHOWN_CHARS] + "..."
        raise PdorchError(ErrorCode.MODEL_NOT_FOUND, f"model {shown!r} does not exist (served: {known})")
    return tokenizers.get(hello.tokenizer), hello


def _prompt_limit(cfg: SchedulerConfig, hello: Hello) -> int:
    """The most tokens a prompt may have: the configured limit, within the model's context."""
    if hello.max_model_len > 1:
        return min(cfg.max_prompt_tokens, hello.max_model_len - 1)
    return cfg.max_prompt_tokens


async def _token_ids(tokenizer: Tokenizer, source: str | list[tuple[str, str]], limit: int) -> list[int]:
    """The ids of a text, or of a chat (its messages' roles and contents, through the model's
    template). One that cannot fit in ``limit`` tokens is refused before any work (a hostile 8 MB
    prompt would take seconds to tokenize); a long one is tokenized on a thread, so that the event
    loop goes on serving other requests and the workers' heartbeats meanwhile."""
    if isinstance(source, str):
        chars, encode = len(source), partial(tokenizer.encode, source)
    else:  # the template only adds to the contents
        chars, encode = sum(len(text) for _, text in source), partial(tokenizer.apply_chat_template, source)
    if chars > limit * tokenizer.max_token_chars:
        raise PdorchError(
            ErrorCode.PROMPT_TOO_LONG,
            f"prompt has more than {limit} tokens ({chars} characters); the limit is {limit}",
        )
    return encode() if chars < GIL_FREE_CHARS else await asyncio.to_thread(encode)


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


async def _build(
    request: web.Request,
    req: CompletionRequest | ChatCompletionRequest,
    chat: bool,
    prompt: str | list[int] | None = None,
) -> _Job:
    """``prompt``: a completion's (one of its batch); chat's come from its messages."""
    cfg = request.app[CONFIG]
    tenant = client_tenant(request, cfg)
    asked = req.max_completion_tokens if chat and req.max_completion_tokens is not None else req.max_tokens
    tokenizer, hello = _tokenizer_for(request.app[CLUSTER], request.app[TOKENIZERS], req.model)
    max_model_len = hello.max_model_len
    limit = _prompt_limit(cfg, hello)
    if chat:
        ids = await _token_ids(tokenizer, chat_messages(req), limit)
    elif isinstance(prompt, str):
        ids = await _token_ids(tokenizer, prompt, limit)
    else:
        assert prompt is not None
        ids = prompt
    if len(ids) > limit:
        raise PdorchError(ErrorCode.PROMPT_TOO_LONG, f"prompt has {len(ids)} tokens; the limit is {limit}")
    vocab = hello.vocab_size
    packed = pack_token_ids(ids, vocab)  # what the jobs carry, checked in one pass
    room = max_model_len - len(ids) if max_model_len > 1 else cfg.max_tokens_limit
    # As vLLM and OpenAI: chat takes the rest of the context unless told; completions take 16.
    default = min(room, cfg.max_tokens_limit) if chat else cfg.default_max_tokens
    max_tokens = check_common(req, asked, default_max=default, limit=cfg.max_tokens_limit)
    if asked is not None and max_tokens > room:
        raise bad(
            f"this model's context is {max_model_len} tokens; the prompt has {len(ids)} and "
            f"max_tokens asks for {max_tokens} more (at most {room})"
        )
    bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    for token in [*bias, *(req.stop_token_ids or [])]:
        if not 0 <= token < (vocab or token + 1):
            raise bad(f"token id {token} is outside the model's vocabulary (size {vocab})")
    temperature = 1.0 if req.temperature is None else req.temperature
    # Seeded sampling with a seed we draw keeps prefill and decode workers on the same random stream.
    seed = req.seed if req.seed is not None else random.getrandbits(63)
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=seed,
        stop_token_ids=list(req.stop_token_ids or []),
        ignore_eos=req.ignore_eos,
        logprobs=req.token_logprobs(),
        prompt_logprobs=req.wanted_prompt_logprobs(),
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        logit_bias=bias,
        min_tokens=req.min_tokens,
        top_k=max(0, req.top_k or 0),
        min_p=req.min_p or 0.0,
    )
    # 128 random bits from the OS, as uuid4 would draw, without building a UUID (a fifth of the cost).
    rid = ("chatcmpl-" if chat else "cmpl-") + os.urandom(16).hex()
    adapter = req.model if req.model != hello.model else ""
    greq = GenerationRequest(
        rid,
        hello.model,  # what serves it (placement matches nodes on it); the adapter is separate
        packed,
        sampling,
        tenant=tenant,
        priority=req.priority,
        hint=_hint(request),
        adapter=adapter,
    )
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    echo = not chat and req.echo
    return _Job(
        greq,
        tokenizer,
        stop_strings(req),
        req.stream,
        include_usage,
        req.return_token_ids,
        chat,
        echo,
        n=req.n,
        seeded=req.seed is not None,
    )


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


# The outcome of a request whose client went away before its answer was complete.
CLIENT_GONE = "client_gone"


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    """Every generation request is counted once in ``pdorch_requests_total``, by its outcome:
    ``ok``, an error code (a 400 or 404 included), or ``client_gone``."""
    progress = Progress()
    try:
        req = await request_body(request, ChatCompletionRequest if chat else CompletionRequest)
        if isinstance(req, CompletionRequest):
            jobs = [await _build(request, req, False, prompt) for prompt in completion_prompts(req)]
        else:
            jobs = [await _build(request, req, True)]
        return await _serve(request, jobs, progress)
    except PdorchError as e:
        progress.error = str(e.code)
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        progress.error = CLIENT_GONE
        raise
    finally:
        request.app[METRICS].requests.labels(progress.error or "ok").inc()


def _model_cards(cluster: Cluster) -> dict[str, dict[str, Any]]:
    """Every model served, and every LoRA adapter with its base model as ``parent`` (as vLLM)."""
    cards = {m: {"id": m, "object": "model", "created": 0, "owned_by": "pdorch"} for m in cluster.models()}
    for adapter, base in sorted(cluster.adapters().items()):
        cards.setdefault(
            adapter, {"id": adapter, "object": "model", "created": 0, "owned_by": "pdorch", "parent": base}
        )
    return cards


async def models(request: web.Request) -> web.Response:
    client_tenant(request, request.app[CONFIG])
    return json_response({"object": "list", "data": list(_model_cards(request.app[CLUSTER]).values())})


async def model(request: web.Request) -> web.Response:
    client_tenant(request, request.app[CONFIG])
    name = request.match_info["model_id"]
    card = _model_cards(request.app[CLUSTER]).get(name)
    if card is None:
        raise PdorchError(ErrorCode.MODEL_NOT_FOUND, f"model {name!r} does not exist")
    return json_response(card)


# ---------------------------------------------------------------------------------------------


def _usage(jobs: list[_Job], all_choices: list[Choice]) -> dict[str, Any]:
    prompt = sum(len(job.greq.prompt_token_ids) for job in jobs)
    completion = sum(len(c.progress.token_ids) for c in all_choices)
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    # Each prompt's cache hit where it was prefilled (its other choices share its blocks anyway).
    if cached := sum(c.progress.cached_tokens for c in all_choices if c.index % jobs[0].n == 0):
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def _choice(
    job: _Job,
    index: int,
    text: str,
    finish: str | None,
    token_ids: list[int] | None,
    delta: bool,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": logprobs}
    if job.chat and delta:
        choice["delta"] = {"content": text} if text else {}
    elif job.chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    if token_ids is not None and job.return_token_ids:
        choice["token_ids"] = token_ids
    return choice


def _logprobs(
    job: _Job, choice: Choice, start: int, end: int, *, offset: int, echo: bool
) -> dict[str, Any] | None:
    """The logprobs of the choice's output tokens ``[start, end)`` in the request's shape (with
    ``echo``, its prompt's first), or None when the client asked for none."""
    progress = choice.progress
    wanted = job.greq.sampling.logprobs >= 0
    if not wanted and not (echo and progress.prompt_logprobs):
        return None
    ids = progress.token_ids[start:end]
    lps: list[TokenLogprobs | None] = list(progress.logprobs[start:end]) if wanted else [None] * len(ids)
    if len(lps) != len(ids):
        raise PdorchError(ErrorCode.JOB_FAILED, "the engine did not report the logprobs asked for")
    if job.chat:
        return chat_logprobs(ids, [lp for lp in lps if lp is not None], job.token_text)
    if echo:
        ids = choice.greq.prompt_token_ids.tolist() + ids
        lps = [None, *progress.prompt_logprobs, *lps]
    return completion_logprobs(ids, lps, job.token_text, offset)


def _prompt_logprobs(job: _Job, choice: Choice) -> list[dict[str, Any] | None] | None:
    """vLLM's ``prompt_logprobs`` of a choice: None for the first prompt token, then each token's
    entry and the most likely ones', keyed by token id."""
    progress = choice.progress
    if job.greq.sampling.prompt_logprobs < 0 or job.echo or not progress.prompt_logprobs:
        return None
    out: list[dict[str, Any] | None] = [None]
    for token, lp in zip(choice.greq.prompt_token_ids[1:].tolist(), progress.prompt_logprobs, strict=True):
        entry = {
            str(t): {"logprob": v, "decoded_token": job.token_text(t)}
            for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)
        }
        entry.setdefault(str(token), {"logprob": lp.logprob, "decoded_token": job.token_text(token)})
        out.append(entry)
    return out


def _envelope(job: _Job, chunk: bool) -> dict[str, Any]:
    kind = ("chat.completion" if job.chat else "text_completion") + (".chunk" if chunk and job.chat else "")
    return {
        "id": job.greq.request_id,
        "object": kind,
        "created": job.created,
        "model": job.greq.adapter or job.greq.model,
    }


async def _serve(request: web.Request, jobs: list[_Job], progress: Progress) -> web.StreamResponse:
    """Answer the request: its one prompt's choices, or a batch's, every prompt placed and admitted
    as a request of its own and their choices numbered in order (``progress``: the first's)."""
    job = jobs[0]
    per_prompt = [
        choices(j.greq, j.n, j.seeded, progress if p == 0 else Progress(), offset=p * j.n)
        for p, j in enumerate(jobs)
    ]
    all_choices = [c for prompt_choices in per_prompt for c in prompt_choices]
    streams = [_produce(request, j, cs) for j, cs in zip(jobs, per_prompt, strict=True)]
    items = streams[0] if len(streams) == 1 else merge(streams)
    async with contextlib.aclosing(items):
        # Wait for the first token before answering, so that failures before it (no worker,
        # overload, a lost worker) get a proper HTTP status.
        first = await anext(items)
        if job.stream:
            return await _stream(request, jobs, all_choices, first, items)
        texts = ["" for _ in all_choices]
        for choice, delta in [first, *[item async for item in items]]:
            texts[choice.index] += delta or ""
        return _complete(jobs, all_choices, texts)


async def _produce(
    request: web.Request, job: _Job, prompt_choices: list[Choice]
) -> AsyncGenerator[Item, None]:
    """One prompt's choices' items: admitted, placed and generated; its latencies recorded when it
    is done (or closed)."""
    app = request.app
    metrics, orchestrator = app[METRICS], app[ORCHESTRATOR]
    metrics.prompt_tokens.inc(len(job.greq.prompt_token_ids))
    progress = prompt_choices[0].progress
    first_at: float | None = None
    try:
        _objectives(request, job.greq)
        plan = orchestrator.plan(job.greq, followers=job.n - 1)
        async with await _admit(app, job, plan[1]) as ticket:
            timeout_s = app[CONFIG].request_timeout_s
            items = generate(
                orchestrator, plan, ticket.grant, prompt_choices, job.tokenizer, job.stop, timeout_s
            )
            async with contextlib.aclosing(items):
                async for item in items:
                    if first_at is None:
                        first_at = time.monotonic()
                    yield item
    except PdorchError as e:
        progress.error = str(e.code)
        raise
    finally:
        orchestrator.forget(job.greq)  # a placement booked for a request that never started
        tokens = len(progress.token_ids)
        metrics.tokens_generated.inc(sum(len(c.progress.token_ids) for c in prompt_choices))
        if first_at is not None:
            now = time.monotonic()
            ttft = first_at - job.greq.arrival
            tpot = (now - first_at) / (tokens - 1) if tokens > 1 else None
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


# The client's own objectives, in milliseconds (llm-d's SLO headers); the config's ``slo`` otherwise.
TTFT_HEADER = "X-SLO-TTFT-Ms"
TPOT_HEADER = "X-SLO-TPOT-Ms"


def _objectives(request: web.Request, greq: GenerationRequest) -> None:
    for header, field_name in ((TTFT_HEADER, "ttft_slo_s"), (TPOT_HEADER, "tpot_slo_s")):
        raw = request.headers.get(header)
        if raw is None:
            continue
        try:
            value = float(raw)
        except ValueError:
            raise bad(f"header {header} must be a number of milliseconds") from None
        if not (math.isfinite(value) and value > 0):
            raise bad(f"header {header} must be a positive number of milliseconds")
        setattr(greq, field_name, value / 1e3)


async def _admit(app: web.Application, job: _Job, preq: PlacementRequest) -> Ticket:
    """Wait in the fair-share queue until placement finds room for the request (or give up). The
    room check is the request's placement, booked when it succeeds: ``ticket.grant``."""
    cfg, orchestrator = app[CONFIG], app[ORCHESTRATOR]
    if not app[CLUSTER].can_serve(cfg.colocated, app[PLANNER].placer.whole_request_roles):
        raise PdorchError(ErrorCode.NO_WORKER, "no worker of a needed role is available")
    try:
        return await app[ADMISSION].acquire(
            job.greq.tenant,
            job.greq.priority,
            cfg.queue_timeout_s,
            has_room=lambda: orchestrator.decide(job.greq, preq),
            cost=job.n,
        )
    except PdorchError as e:
        if e.code is ErrorCode.DEADLINE_EXCEEDED:
            raise QueueFull(f"no capacity within {cfg.queue_timeout_s:g}s; retry later", 1.0) from None
        raise


def _complete(jobs: list[_Job], all_choices: list[Choice], texts: list[str]) -> web.Response:
    job = jobs[0]  # what the batch's prompts share (the envelope, the options)
    body = _envelope(job, chunk=False)
    body["choices"] = []
    for c, text in zip(all_choices, texts, strict=True):
        p = c.progress
        prompt_text = _prompt_text(job, c) if job.echo else ""
        logprobs = _logprobs(job, c, 0, len(p.token_ids), offset=0, echo=job.echo)
        choice = _choice(job, c.index, prompt_text + text, p.finish_reason, p.token_ids, False, logprobs)
        if (prompt_logprobs := _prompt_logprobs(job, c)) is not None:
            choice["prompt_logprobs"] = prompt_logprobs
        body["choices"].append(choice)
    body["usage"] = _usage(jobs, all_choices)
    return json_response(body)


def _prompt_text(job: _Job, choice: Choice) -> str:
    return job.tokenizer.decode(choice.greq.prompt_token_ids.tolist())


async def _stream(
    request: web.Request, jobs: list[_Job], all_choices: list[Choice], first: Item, items: AsyncIterator[Item]
) -> web.StreamResponse:
    job = jobs[0]  # what the batch's prompts share (the envelope, the options)
    resp = await sse.open_stream(request)

    def chunk(c: Choice, text: str, finish: str | None, echo: bool = False) -> dict[str, Any]:
        p = c.progress
        body = _envelope(job, chunk=True)
        start, p.sent_ids = p.sent_ids, len(p.token_ids)
        text = _prompt_text(job, c) + text if echo else text
        logprobs = _logprobs(job, c, start, p.sent_ids, offset=p.chars, echo=echo)
        p.chars += len(text)
        body["choices"] = [
            _choice(job, c.index, text, finish, p.token_ids[start : p.sent_ids], True, logprobs)
        ]
        if job.include_usage:
            body["usage"] = None
        return body

    def role(c: Choice) -> dict[str, Any]:
        body = _envelope(job, chunk=True)
        body["choices"] = [
            {"index": c.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        ]
        return body

    # With token ids or logprobs asked for, every batch of tokens is news, even without text yet.
    per_token = job.return_token_ids or job.greq.sampling.logprobs >= 0
    started: set[int] = set()  # choices whose first chunk (role, echo) went out
    finished: set[int] = set()  # choices whose finish chunk went out (or waits for [DONE])

    def events(item: Item) -> list[dict[str, Any]]:
        """What one item sends: each piece as soon as it exists (with its token ids, when asked
        for them); the finish reason in a last chunk of its own, as vLLM and OpenAI send it, with
        the choice's last piece (the same batch of tokens ends it)."""
        c, delta = item
        out = []
        if c.index not in started:
            started.add(c.index)
            if job.chat:
                out.append(role(c))
            if job.echo:
                out.append(chunk(c, delta or "", None, echo=True))
                delta = ""
        if delta is not None and (delta or (per_token and len(c.progress.token_ids) > c.progress.sent_ids)):
            out.append(chunk(c, delta, None))
        if c.index not in finished and (delta is None or c.progress.finish_reason is not None):
            finished.add(c.index)
            out.append(chunk(c, "", c.progress.finish_reason))
        return out

    tail: list[dict[str, Any]] = []

    async def send(item: Item, head: bool = False) -> None:
        """``item``'s events, at once (``head``: the headers with them, even with nothing to say
        yet); those that end the last choice go out with [DONE] and the end of the response, one
        write where there were three (its last tokens, its finish chunk, the end)."""
        sent = events(item)
        if len(finished) == len(all_choices):
            tail.extend(sent)
        elif sent or head:
            await sse.send_events(resp, *sent)

    progress = all_choices[0].progress
    try:
        await send(first, head=True)
        async for item in items:
            await send(item)
        if job.include_usage:
            usage = _envelope(job, chunk=True)
            usage["choices"] = []
            usage["usage"] = _usage(jobs, all_choices)
            tail.append(usage)
    except PdorchError as e:
        # Headers are gone; the error travels as an event, which OpenAI clients raise.
        progress.error = str(e.code)
        tail.append(error_body(e))
    except ConnectionResetError:
        # The client hung up mid-stream: stop here (closing the generator cancels its jobs).
        progress.error = CLIENT_GONE
        return resp
    try:
        await sse.finish(resp, *tail)
    except ConnectionResetError:
        progress.error = progress.error or CLIENT_GONE
    return resp


async def tokenize(request: web.Request) -> web.Response:
    """vLLM's ``POST /tokenize``: the token ids a prompt (or chat) is sent to the model as."""
    client_tenant(request, request.app[CONFIG])
    req = await request_body(request, TokenizeRequest)
    tokenizer, hello = _tokenizer_for(request.app[CLUSTER], request.app[TOKENIZERS], req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad("give either 'prompt' or 'messages'")
    # Nothing longer than a prompt may be is counted (nor tokenized: see _token_ids).
    limit = _prompt_limit(request.app[CONFIG], hello)
    if req.messages is not None:
        source: str | list[tuple[str, str]] = chat_messages(
            ChatCompletionRequest(model=req.model, messages=req.messages)
        )
    else:
        source = req.prompt or ""
    ids = await _token_ids(tokenizer, source, limit)
    return json_response({"count": len(ids), "max_model_len": hello.max_model_len, "tokens": ids})


async def detokenize(request: web.Request) -> web.Response:
    """vLLM's ``POST /detokenize``: the text of token ids."""
    client_tenant(request, request.app[CONFIG])
    req = await request_body(request, DetokenizeRequest)
    tokenizer, hello = _tokenizer_for(request.app[CLUSTER], request.app[TOKENIZERS], req.model)
    if hello.vocab_size and (wrong := next((t for t in req.tokens if not 0 <= t < hello.vocab_size), None)):
        raise bad(f"token id {wrong} is outside the model's vocabulary (size {hello.vocab_size})")
    return json_response({"prompt": tokenizer.decode(req.tokens)})
