"""The vLLM engine adapter: pdorch jobs -> vLLM's HTTP API; vLLM's /metrics -> pdorch load.

The agent runs this beside one vLLM server process. The KV itself never passes through here: the
pdorch connector inside vLLM moves it, steered by ``kv_transfer_params`` on each request.

- prefill: a completion with ``max_tokens=1``; the one token is token 0. With a KV route, vLLM's
  connector pushes the prompt's KV blocks along it (to the decode worker or the KV broker).
- decode: the same prompt, streamed, with a route to load the KV from. vLLM skips the prompt's
  compute, recomputes only the last prompt position and so generates token 0 again: that token is
  taken out of the token stream (it equals prefill's: greedy, or seeded sampling drawing it with the
  same generator state). The first token to arrive proves the KV is in place, so ``KvLoaded`` is
  sent then, carrying that token 0 for a scheduler that has not yet heard from the prefill side.
- generate: colocated, no KV transfer.

A resumed job (``generated`` > 0: the prompt ends with the request's own earlier output) is the
same request with that longer prompt and ``max_tokens`` reduced by ``generated``. vLLM cannot
start a seeded request's random stream at an offset (one generator per request, advanced token by
token), so a resumed *seeded* request continues with valid samples but not the tokens an
uninterrupted run would have drawn; greedy requests continue exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import msgspec

from transport.errors import ErrorCode, PdorchError
from transport.messages import (
    DecodeJob,
    FinishReason,
    GenerateJob,
    KvLoaded,
    Load,
    PrefillJob,
    SamplingParams,
    TokenLogprobs,
    TokenOutput,
)
from workers.engines.base import Emit, EngineInfo
from workers.engines.vllm.client import VllmClient
from workers.engines.vllm.kv_arrivals import ArrivalListener
from workers.engines.vllm.logprobs import prompt_logprobs, token_logprobs
from workers.engines.vllm.metrics import VllmMetrics, parse_metrics
from workers.engines.vllm.transfer_params import RECV, SEND, kv_transfer_params

log = logging.getLogger(__name__)

# /health failures that end in a timeout (not a refusal) before the engine is declared dead: a
# busy CPU host can be slow to answer without being gone.
HEALTH_TIMEOUTS_BEFORE_DEAD = 3
# Extra time the decode's HTTP request gets beyond the job deadline (which bounds its KV load).
DECODE_HTTP_GRACE_S = 10.0


def _finish_reason(value: str | None) -> FinishReason | None:
    if value == "stop":
        return FinishReason.STOP
    if value == "length":
        return FinishReason.LENGTH
    if value is None:
        return None
    raise PdorchError(ErrorCode.JOB_FAILED, f"vLLM finished the request with {value!r}")


def sampling_body(sampling: SamplingParams, max_tokens: int, generated: int = 0) -> dict[str, Any]:
    """vLLM's completion parameters for a job that has ``max_tokens`` left after ``generated``."""
    body: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "seed": sampling.seed,
        "ignore_eos": sampling.ignore_eos,
        "return_token_ids": True,
    }
    if sampling.stop_token_ids:
        body["stop_token_ids"] = list(sampling.stop_token_ids)
    if sampling.top_k:
        body["top_k"] = sampling.top_k
    if sampling.min_p:
        body["min_p"] = sampling.min_p
    if sampling.logprobs >= 0:
        body["logprobs"] = sampling.logprobs
        body["return_tokens_as_token_ids"] = True
    if sampling.prompt_logprobs >= 0:
        body["prompt_logprobs"] = sampling.prompt_logprobs
    if sampling.presence_penalty or sampling.frequency_penalty:
        body["presence_penalty"] = sampling.presence_penalty
        body["frequency_penalty"] = sampling.frequency_penalty
    if sampling.repetition_penalty != 1.0:
        body["repetition_penalty"] = sampling.repetition_penalty
    if sampling.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in sampling.logit_bias.items()}
    if sampling.min_tokens > generated:
        body["min_tokens"] = sampling.min_tokens - generated
    return body


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def eos_token_id(model_dir: str | None) -> int:
    """The model's EOS id from its generation/model config, -1 if unknown."""
    if not model_dir:
        return -1
    for name in ("generation_config.json", "config.json"):
        value = _read_json(Path(model_dir) / name).get("eos_token_id")
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, int):
            return value
    return -1


def vocab_size(model_dir: str | None) -> int:
    """The model's vocabulary size from its config, 0 if unknown."""
    value = _read_json(Path(model_dir) / "config.json").get("vocab_size") if model_dir else None
    return value if isinstance(value, int) and value > 0 else 0


def kv_bytes_per_token(info_labels: dict[str, str], model_dir: str | None) -> int:
    """From vLLM's own figures (cache bytes / cache tokens), else from the model config (float32)."""
    try:
        return int(info_labels["kv_cache_memory_bytes"]) // int(info_labels["kv_cache_size_tokens"])
    except (KeyError, ValueError, ZeroDivisionError):
        pass
    cfg = _read_json(Path(model_dir) / "config.json") if model_dir else {}
    try:
        heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
        return 2 * int(cfg["num_hidden_layers"]) * heads * head_dim * 4
    except (KeyError, TypeError, ValueError):
        return 0


class VllmEngine:
    """:class:`~workers.engines.base.Engine` over one vLLM server at ``url``.

    ``start()`` must be awaited before ``info()``: the figures come from the running server.
    """

    def __init__(
        self,
        url: str,
        *,
        model_dir: str | None = None,
        request_timeout_s: float = 300.0,
        metrics_interval_s: float = 1.0,
        kv_endpoint: str = "",
        startup_timeout_s: float = 180.0,
        arrivals: ArrivalListener | None = None,
    ) -> None:
        """``arrivals``: where the connector's notes that a decode's KV is arriving come in."""
        self.url = url
        self._arrivals = arrivals
        self.model_dir = model_dir
        self.request_timeout_s = request_timeout_s
        self.metrics_interval_s = metrics_interval_s
        self.kv_endpoint = kv_endpoint
        self.startup_timeout_s = startup_timeout_s
        self._client: VllmClient | None = None
        self._emit: Emit | None = None
        self._info: EngineInfo | None = None
        self._model = ""
        self._metrics = VllmMetrics()
        self._poller: asyncio.Task[None] | None = None
        self._health_timeouts = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self, emit: Emit) -> None:
        self._emit = emit
        self._client = VllmClient(self.url, request_timeout_s=self.request_timeout_s)
        await self._wait_ready()
        models = await self._client.models()
        if not models:
            raise PdorchError(ErrorCode.CONFIG, f"vLLM at {self.url} serves no model")
        # The base model, and the LoRA adapters vLLM lists with it as their parent.
        base = next((m for m in models if not m.get("parent")), models[0])
        self._model = str(base["id"])
        adapters = tuple(str(m["id"]) for m in models if m.get("parent") == self._model)
        text = await self._client.metrics_text()
        self._metrics = parse_metrics(text)
        labels = _cache_config_labels(text)
        self._info = EngineInfo(
            engine="vllm",
            model=self._model,
            kv_bytes_per_token=kv_bytes_per_token(labels, self.model_dir),
            block_size=self._metrics.block_size,
            capacity_blocks=self._metrics.num_blocks,
            max_model_len=int(models[0].get("max_model_len") or 0),
            tokenizer=self.model_dir or str(models[0].get("root") or "byte"),
            eos_token_id=eos_token_id(self.model_dir),
            kv_endpoint=self.kv_endpoint,
            vocab_size=vocab_size(self.model_dir),
            adapters=adapters,
        )
        self._poller = asyncio.create_task(self._poll_metrics(), name="vllm-metrics")
        if self._arrivals is not None:
            self._arrivals.start(emit)

    async def _wait_ready(self) -> None:
        assert self._client is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.startup_timeout_s
        while True:
            with contextlib.suppress(PdorchError):
                if await self._client.health(timeout_s=5.0):
                    return
            if loop.time() > deadline:
                raise PdorchError(
                    ErrorCode.CONFIG, f"vLLM at {self.url} not healthy after {self.startup_timeout_s}s"
                )
            await asyncio.sleep(0.5)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        if self._arrivals is not None:
            await self._arrivals.close()
        if self._client is not None:
            await self._client.close()

    def info(self) -> EngineInfo:
        if self._info is None:
            raise PdorchError(ErrorCode.INTERNAL, "VllmEngine.info() called before start()")
        return self._info

    def load(self) -> Load:
        return self._metrics.to_load()

    async def load_adapter(self, name: str, path: str) -> None:
        """Through vLLM's own API (the server runs with --enable-lora and runtime updates on);
        an adapter of that name is replaced in place."""
        client, info = self._started()
        body = {"lora_name": name, "lora_path": path, "load_inplace": name in info.adapters}
        await client.post_json("/v1/load_lora_adapter", body)
        self._info = msgspec.structs.replace(info, adapters=(*(a for a in info.adapters if a != name), name))

    async def unload_adapter(self, name: str) -> None:
        client, info = self._started()
        if name not in info.adapters:
            raise PdorchError(ErrorCode.MODEL_NOT_FOUND, f"adapter {name!r} is not loaded")
        # Refused at once from now on (the agent checks info()), even while vLLM is answering.
        self._info = msgspec.structs.replace(info, adapters=tuple(a for a in info.adapters if a != name))
        await client.post_json("/v1/unload_lora_adapter", {"lora_name": name})

    def _started(self) -> tuple[VllmClient, EngineInfo]:
        if self._client is None or self._info is None:
            raise PdorchError(ErrorCode.INTERNAL, "the vLLM engine is not started")
        return self._client, self._info

    @property
    def metrics(self) -> VllmMetrics:
        return self._metrics

    async def _poll_metrics(self) -> None:
        assert self._client is not None
        while True:
            await asyncio.sleep(self.metrics_interval_s)
            try:
                self._metrics = parse_metrics(await self._client.metrics_text())
            except Exception as e:  # a bad scrape must not end the polling; health() judges liveness
                log.warning("vLLM metrics scrape failed: %s", e)

    async def healthy(self) -> bool:
        assert self._client is not None
        try:
            status, _ = await self._client.get_text("/health", timeout_s=5.0)
        except PdorchError as e:
            if "TimeoutError" in e.message:
                self._health_timeouts += 1
                return self._health_timeouts < HEALTH_TIMEOUTS_BEFORE_DEAD
            return False
        self._health_timeouts = 0
        return status == 200

    # ------------------------------------------------------------------ jobs
    # The agent cancels a job by cancelling its task: the HTTP request closes and vLLM aborts the
    # request and frees its blocks.

    def _body(self, job: PrefillJob | DecodeJob | GenerateJob, max_tokens: int) -> dict[str, Any]:
        body = sampling_body(job.sampling, max_tokens, job.generated)
        # vLLM serves a LoRA adapter under its name (its prefix cache keeps adapters apart).
        return {"model": job.adapter or self._model, "prompt": job.prompt_token_ids.tolist(), **body}

    def _emit_tokens(
        self,
        request_id: str,
        token_ids: list[int],
        finish: FinishReason | None,
        logprobs: list[TokenLogprobs] | None = None,
        prompt: list[TokenLogprobs] | None = None,
    ) -> None:
        assert self._emit is not None
        self._emit(TokenOutput(request_id, token_ids, finish, 0, logprobs or [], prompt or []))

    async def prefill(self, job: PrefillJob) -> None:
        assert self._client is not None
        body = self._body(job, 1)
        if job.kv is not None:
            body["kv_transfer_params"] = kv_transfer_params(SEND, job.kv, job.deadline_s)
        resp = await self._client.complete(body, request_id=job.request_id, timeout_s=job.deadline_s)
        choice = _only_choice(resp)
        tokens = list(choice.get("token_ids") or [])
        if len(tokens) != 1:
            raise PdorchError(ErrorCode.JOB_FAILED, f"vLLM prefill returned {len(tokens)} tokens, expected 1")
        finish = _finish_reason(choice.get("finish_reason"))
        if finish is FinishReason.LENGTH and job.sampling.max_tokens - job.generated > 1:
            finish = None  # only our max_tokens=1 cap stopped it; decode goes on
        s = job.sampling
        logprobs = token_logprobs(choice, s.logprobs)
        prompt = prompt_logprobs(choice, job.prompt_token_ids, s.prompt_logprobs)
        self._emit_tokens(job.request_id, tokens, finish, logprobs, prompt)

    async def decode(self, job: DecodeJob) -> None:
        assert self._client is not None and self._emit is not None
        body = self._body(job, job.sampling.max_tokens - job.generated)
        body.pop("prompt_logprobs", None)  # the prefill side's to report (and vLLM streams none)
        body["kv_transfer_params"] = kv_transfer_params(RECV, job.kv, job.deadline_s)
        # The KV load's own deadline (job.deadline_s, inside vLLM) must fire before the HTTP one,
        # so a lost transfer surfaces as vLLM's failure rather than a bare client timeout.
        timeout_s = job.deadline_s + DECODE_HTTP_GRACE_S
        kv_loaded = False
        arrivals = self._arrivals
        if arrivals is not None:
            arrivals.watch(job.kv.transfer_id, job.request_id)
        try:
            async for event in self._client.stream(body, request_id=job.request_id, timeout_s=timeout_s):
                tokens, finish, logprobs = _event_tokens(event, job.sampling.logprobs)
                if tokens and not kv_loaded:
                    if arrivals is not None:
                        arrivals.unwatch(job.kv.transfer_id)
                    # vLLM regenerated token 0 from the loaded KV: the KV is in place. Token 0 rides
                    # on KvLoaded (the prefill worker's copy may arrive later), not in the stream.
                    self._emit(KvLoaded(request_id=job.request_id, first_token=tokens[0]))
                    tokens, logprobs = tokens[1:], logprobs[1:]
                    kv_loaded = True
                if tokens or finish is not None:
                    self._emit_tokens(job.request_id, tokens, finish, logprobs)
                if finish is not None:
                    return
        except PdorchError as e:
            if kv_loaded:
                raise
            # Before the first token, vLLM fails a request only for its KV load (policy "fail").
            raise PdorchError(
                e.code, f"decode failed before its first token, KV not loaded: {e.message}"
            ) from None
        finally:
            if arrivals is not None:
                arrivals.unwatch(job.kv.transfer_id)
        raise PdorchError(ErrorCode.JOB_FAILED, f"vLLM stream for {job.request_id} ended without a finish")

    async def generate(self, job: GenerateJob) -> None:
        assert self._client is not None
        body = self._body(job, job.sampling.max_tokens - job.generated)
        if job.sampling.prompt_logprobs >= 0:
            # vLLM gives prompt logprobs only unstreamed: the whole answer in one message.
            resp = await self._client.complete(body, request_id=job.request_id, timeout_s=job.deadline_s)
            choice = _only_choice(resp)
            self._emit_tokens(
                job.request_id,
                list(choice.get("token_ids") or []),
                _finish_reason(choice.get("finish_reason")),
                token_logprobs(choice, job.sampling.logprobs),
                prompt_logprobs(choice, job.prompt_token_ids, job.sampling.prompt_logprobs),
            )
            return
        async for event in self._client.stream(body, request_id=job.request_id, timeout_s=job.deadline_s):
            tokens, finish, logprobs = _event_tokens(event, job.sampling.logprobs)
            if tokens or finish is not None:
                self._emit_tokens(job.request_id, tokens, finish, logprobs)
            if finish is not None:
                return
        raise PdorchError(ErrorCode.JOB_FAILED, f"vLLM stream for {job.request_id} ended without a finish")


def _event_tokens(
    event: dict[str, Any], top: int
) -> tuple[list[int], FinishReason | None, list[TokenLogprobs]]:
    """Token ids, finish reason and logprobs of one streamed completion event (the usage event
    has none of them)."""
    choices = event.get("choices") or []
    if not choices:
        return [], None, []
    choice = choices[0]
    tokens = list(choice.get("token_ids") or [])
    return tokens, _finish_reason(choice.get("finish_reason")), token_logprobs(choice, top)


def _only_choice(resp: dict[str, Any]) -> dict[str, Any]:
    choices = resp.get("choices") or []
    if len(choices) != 1 or not isinstance(choices[0], dict):
        raise PdorchError(ErrorCode.JOB_FAILED, f"vLLM answered with {len(choices)} choices, expected 1")
    return choices[0]


def _cache_config_labels(metrics_text: str) -> dict[str, str]:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == "vllm:cache_config_info":
                return dict(sample.labels)
    return {}
