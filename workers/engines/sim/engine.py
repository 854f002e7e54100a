"""The simulated engine as an :class:`Engine`, in real time: a worker that behaves like a GPU serving a
real model, for load tests of the real processes (``pdorch worker --engine sim``).

A :class:`SimBatcher` holds the requests and decides each iteration; its clock is
``time.monotonic()`` divided by ``time_scale``, so an iteration takes the cost model's time (scaled).
One asyncio task advances it to the clock, hands new tokens to the waiting jobs, and sleeps until
the iteration in flight ends (at most ``_MAX_WAIT_S``; new work wakes it at once; with no modeled
time, until new work). Nothing computes, so no thread is needed: the agent's event loop keeps
heartbeating and moving KV.

Tokens are a pure function of the prompt and position (``tokens.py``), so disaggregated output
equals colocated output. The KV handoff moves a small stand-in through the real KV plane and takes
the modeled transfer time of the real KV (``kv_handoff.py``). ``load()`` reports the modeled KV pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from transport.errors import ErrorCode, PdorchError
from transport.kv import KvReceiver, KvSender
from transport.kv.deadline import Deadline
from transport.messages import DecodeJob, GenerateJob, KvArriving, KvLoaded, Load, PrefillJob, TokenOutput
from transport.prefix_hash import prefix_block_hashes
from workers.engines.base import Emit, EngineInfo
from workers.engines.sim.batcher import BatcherParams, BatcherStats, SimBatcher, SimOutput
from workers.engines.sim.config import SimEngineConfig, model_context_lengths, shape_of
from workers.engines.sim.cost import CostModel
from workers.engines.sim.kv_handoff import KvLink, receive_standin, send_standin
from workers.engines.sim.tokens import (
    EOS_TOKEN_ID,
    VOCAB_SIZE,
    SimTokenStream,
    check_prompt,
    check_sampling,
)

# Longest sleep of the stepping task: a bound, so a missed wake-up costs at most this much.
_MAX_WAIT_S = 0.25


class SimulatedEngine:
    def __init__(
        self,
        config: SimEngineConfig | None = None,
        *,
        kv_sender: KvSender | None = None,
        kv_receiver: KvReceiver | None = None,
    ) -> None:
        self.config = cfg = config or SimEngineConfig()
        self._shape = shape_of(cfg.model)
        self.cost = CostModel(cfg.accelerator, cfg.tp, self._shape, slowdown=cfg.slowdown)
        num_blocks = cfg.num_blocks or self.cost.kv_capacity_tokens // cfg.block_size
        context = cfg.max_model_len or model_context_lengths()[cfg.model]
        self.max_model_len = min(context, num_blocks * cfg.block_size)
        params = BatcherParams(
            num_blocks=num_blocks,
            block_size=cfg.block_size,
            max_batch=cfg.max_batch,
            chunk_tokens=cfg.chunk_tokens,
            enable_prefix_caching=cfg.enable_prefix_caching,
            max_loras=cfg.max_loras if cfg.adapters else 0,
            adapter_load_s=cfg.adapter_load_s,
            decode_at_once=cfg.time_scale == 0,
        )
        self._core = SimBatcher(self.cost, params)
        self.link = KvLink(cfg.kv_link_gbytes_per_s, cfg.time_scale)
        self._sender = kv_sender
        self._receiver = kv_receiver
        self._t0 = time.monotonic()
        self._zero_cost = cfg.time_scale == 0
        # The stand-in KV has a layer per modeled layer, paced over the modeled transfer time;
        # with no modeled time, one layer: the KV plane's whole handshake, nothing more.
        self._standin_layers = 1 if self._zero_cost else self._shape.layers
        self._virtual_now = 0.0
        self._emit: Emit = lambda msg: None
        self._handlers: dict[str, Callable[[SimOutput], None]] = {}
        self._wake = asyncio.Event()
        self._stepper: asyncio.Task[None] | None = None
        self._error: BaseException | None = None
        self._adapters = tuple(cfg.adapters)  # served now (adapters load and unload at run time)

    # ------------------------------------------------------------------ Engine protocol

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="sim",
            model=self.config.served_name,
            kv_bytes_per_token=self._shape.kv_bytes_per_token,
            block_size=self.config.block_size,
            capacity_blocks=self._core.pool.total,
            max_model_len=self.max_model_len,
            tokenizer="byte",
            eos_token_id=EOS_TOKEN_ID,
            vocab_size=VOCAB_SIZE,
            adapters=self._adapters,
        )

    def load(self) -> Load:
        return self._core.load()

    async def load_adapter(self, name: str, path: str) -> None:
        """Serve ``name`` (a simulated adapter has no weights: ``path`` is not read)."""
        if not self._core.params.max_loras:
            raise PdorchError(
                ErrorCode.CONFIG, "this simulated engine has no adapter slots (start it with --sim-lora)"
            )
        self._adapters = (*(a for a in self._adapters if a != name), name)

    async def unload_adapter(self, name: str) -> None:
        if name not in self._adapters:
            raise PdorchError(ErrorCode.MODEL_NOT_FOUND, f"adapter {name!r} is not loaded")
        self._adapters = tuple(a for a in self._adapters if a != name)

    @property
    def stats(self) -> BatcherStats:
        return self._core.stats

    async def start(self, emit: Emit) -> None:
        self._emit = emit
        self._stepper = asyncio.create_task(self._step_loop(), name="sim-engine")

    async def close(self) -> None:
        if self._stepper is not None:
            self._stepper.cancel()
            with contextlib.suppress(BaseException):
                await self._stepper

    async def healthy(self) -> bool:
        return self._stepper is not None and not self._stepper.done() and self._error is None

    # ------------------------------------------------------------------ jobs (each frees what it holds)

    async def prefill(self, job: PrefillJob) -> None:
        if job.kv is not None and self._sender is None:
            raise PdorchError(ErrorCode.JOB_FAILED, "this worker cannot send KV (no KV sender)")
        rid = job.request_id
        stream, hashes, prompt = self._request(job)
        first: asyncio.Future[SimOutput] = asyncio.get_running_loop().create_future()
        self._handlers[rid] = lambda out: first.done() or first.set_result(out)
        try:
            self._core.add_prefill(self._now(), rid, stream, hashes, decode_here=False, adapter=job.adapter)
            self._wake.set()
            out = await self._within(first, job.deadline_s, f"prefill of {rid}")
            token = out.token_ids[0]
            # The first token goes out at once; the KV follows over the modeled link time.
            self._emit(TokenOutput(rid, [token], out.finish_reason, out.cached_tokens))
            if job.kv is not None and out.finish_reason is None:
                assert self._sender is not None
                await send_standin(
                    self._sender,
                    job.kv,
                    prompt,
                    token,
                    num_layers=self._standin_layers,
                    block_size=self.config.block_size,
                    modeled_bytes=len(prompt) * self._shape.kv_bytes_per_token,
                    link=self.link,
                    deadline_s=job.deadline_s,
                )
        finally:
            self._forget(rid)

    async def decode(self, job: DecodeJob) -> None:
        if self._receiver is None:
            raise PdorchError(ErrorCode.JOB_FAILED, "this worker cannot receive KV (no KV receiver)")
        rid = job.request_id
        stream, hashes, prompt = self._request(job)
        self._core.reserve_decode(self._now(), rid, stream, hashes, job.adapter)
        try:
            first = await receive_standin(
                self._receiver,
                job.kv,
                prompt,
                num_layers=self._standin_layers,
                block_size=self.config.block_size,
                modeled_bytes=len(prompt) * self._shape.kv_bytes_per_token,
                link=self.link,
                deadline_s=job.deadline_s,
                on_arriving=lambda: self._emit(KvArriving(rid)),
            )
            self._emit(KvLoaded(rid, first))
            await self._until_finished(rid, lambda: self._core.start_decode(self._now(), rid, first))
        finally:
            self._forget(rid)

    async def generate(self, job: GenerateJob) -> None:
        rid = job.request_id
        stream, hashes, _ = self._request(job)
        try:
            await self._until_finished(
                rid,
                lambda: self._core.add_prefill(
                    self._now(), rid, stream, hashes, decode_here=True, adapter=job.adapter
                ),
            )
        finally:
            self._forget(rid)

    async def _until_finished(self, rid: str, submit: Callable[[], None]) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_output(out: SimOutput) -> None:
            if done.done():
                return
            self._emit(TokenOutput(rid, out.token_ids, out.finish_reason, out.cached_tokens))
            if out.finish_reason is not None:
                done.set_result(None)

        self._handlers[rid] = on_output
        submit()
        self._wake.set()
        await self._within(done, self.config.job_timeout_s, rid)

    def _request(
        self, job: PrefillJob | DecodeJob | GenerateJob
    ) -> tuple[SimTokenStream, list[int], np.ndarray]:
        """The job's token stream, its prompt's prefix hashes, and the prompt as an array."""
        sampling = job.sampling
        check_sampling(sampling)
        prompt = check_prompt(job.prompt_token_ids, self.max_model_len, job.generated)
        stream = SimTokenStream(
            self.config.seed,
            prompt,
            sampling,
            mean_output_tokens=self.config.mean_output_tokens,
            max_model_len=self.max_model_len,
            generated=job.generated,
        )
        # An adapter's KV is its own: its prefix keys are salted with its name (any per-adapter salt
        # keeps them apart; the reference engine salts with the weights' identity).
        salt = f"lora:{job.adapter}".encode() if job.adapter else b""
        hashes = (
            prefix_block_hashes(prompt, self.config.block_size, salt)
            if self.config.enable_prefix_caching
            else []
        )
        return stream, hashes, prompt

    async def _within(self, waiting: asyncio.Future[Any], timeout_s: float, what: str) -> Any:
        late = f"{what} did not finish in {timeout_s:g}s"
        timer = Deadline(timeout_s).fail_at(waiting, ErrorCode.DEADLINE_EXCEEDED, late)  # not a scope
        try:
            return await waiting
        finally:
            timer.cancel()

    def _forget(self, rid: str) -> None:
        self._handlers.pop(rid, None)
        self._core.release(self._now(), rid)
        self._wake.set()

    # ------------------------------------------------------------------ stepping

    def _now(self) -> float:
        """The cost model's clock: real seconds since start, divided by ``time_scale``; with no
        modeled time (``time_scale`` 0), the end of the last iteration run."""
        if self._zero_cost:
            return self._virtual_now
        return (time.monotonic() - self._t0) / self.config.time_scale

    def _advance(self) -> list[SimOutput]:
        if not self._zero_cost:
            return self._core.advance(self._now())
        # No modeled time: run every iteration there is work for, at once, one output a request.
        # The first call collects what needed no iteration (a sequence decoded to its end on
        # joining the batch).
        merged: dict[str, SimOutput] = {}
        end = self._virtual_now
        while end != math.inf:
            self._virtual_now = end
            for out in self._core.advance(end):
                seen = merged.setdefault(out.request_id, out)
                if seen is not out:
                    seen.token_ids.extend(out.token_ids)
                    seen.finish_reason = out.finish_reason
            end = self._core.next_event_time()
        return list(merged.values())

    async def _step_loop(self) -> None:
        try:
            while True:
                self._wake.clear()
                for out in self._advance():
                    handler = self._handlers.get(out.request_id)
                    if handler is not None:
                        handler(out)
                if self._zero_cost:  # nothing to wait for but new work: no timer to arm
                    await self._wake.wait()
                    continue
                wait_s = (self._core.next_event_time() - self._now()) * self.config.time_scale
                wait_s = min(max(wait_s, 0.0), _MAX_WAIT_S)
                if wait_s <= 0.0:
                    await asyncio.sleep(0)
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait_s):
                        await self._wake.wait()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the agent sees it through healthy() and reports the worker dead
            self._error = e
            raise
