"""The reference engine as an :class:`Engine`: the pure core on its own thread, KV over pdorch's plane.

The core steps on a dedicated thread (numpy releases the GIL in its kernels, so the agent's event
loop keeps heartbeating and moving KV while a step computes). Step outputs come back to the loop
with ``call_soon_threadsafe``. Prefill streams each layer's KV to the route as soon as the core
produces it; decode reserves blocks, lets the KV plane scatter verified rows straight into them,
then starts the sequence from the handed-off first token.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Mapping

import numpy as np

from transport.errors import ErrorCode, PdorchError
from transport.kv import KvOutStream, KvReceiver, KvSender
from transport.messages import DecodeJob, GenerateJob, KvArriving, KvLoaded, Load, PrefillJob, TokenOutput
from workers.engines.base import Emit, EngineInfo
from workers.engines.reference.config import ModelConfig
from workers.engines.reference.core import EngineCore
from workers.engines.reference.step_output import StepOutput
from workers.engines.reference.weights import ModelWeights

# How long the engine thread sleeps when idle before looking again (it is woken on new work).
_IDLE_WAIT_S = 0.05


class _BlockSink:
    """Writes verified KV rows of a handed-off prompt into the blocks reserved for it."""

    def __init__(self, core: EngineCore, blocks: list[int], num_layers: int, rows: int) -> None:
        self._core = core
        self._blocks = blocks
        self._num_layers = num_layers
        self._rows = rows

    def write(self, layer: int, row_offset: int, rows: np.ndarray) -> None:
        if not 0 <= layer < self._num_layers or row_offset < 0 or row_offset + len(rows) > self._rows:
            raise PdorchError(
                ErrorCode.KV_CORRUPT, f"KV rows out of range: layer {layer} rows {row_offset}+{len(rows)}"
            )
        self._core.cache.scatter(layer, self._blocks, row_offset, rows)


def _token_output(rid: str, out: StepOutput) -> TokenOutput:
    logprobs = [out.logprobs] if out.logprobs is not None else []
    return TokenOutput(
        rid, [out.token_id], out.finish_reason, out.cached_tokens, logprobs, out.prompt_logprobs or []
    )


class ReferenceEngine:
    def __init__(
        self,
        cfg: ModelConfig,
        *,
        weights: ModelWeights | None = None,
        tokenizer: str = "byte",
        model_name: str = "pdorch-reference",
        num_blocks: int = 4096,
        block_size: int = 16,
        max_batch: int = 64,
        max_prefill_tokens_per_step: int = 512,
        enable_prefix_caching: bool = True,
        kv_sender: KvSender | None = None,
        kv_receiver: KvReceiver | None = None,
        job_timeout_s: float = 600.0,
        adapters: Mapping[str, str] | None = None,
        max_loras: int = 4,
    ) -> None:
        """``adapters``: LoRA adapters to serve, name -> PEFT directory (read and checked now)."""
        self._cfg = cfg
        self._tokenizer = tokenizer
        self._model_name = model_name
        self._core = EngineCore(
            cfg,
            num_blocks,
            block_size,
            max_batch=max_batch,
            max_prefill_tokens_per_step=max_prefill_tokens_per_step,
            enable_prefix_caching=enable_prefix_caching,
            weights=weights,
            max_loras=max_loras,
        )
        for name, path in (adapters or {}).items():
            self._core.adapters.register(name, path)
        self._sender = kv_sender
        self._receiver = kv_receiver
        self._job_timeout_s = job_timeout_s
        self._handlers: dict[str, Callable[[StepOutput], None]] = {}
        self._emit: Emit = lambda msg: None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._thread_error: BaseException | None = None

    # ------------------------------------------------------------------ Engine protocol

    def info(self) -> EngineInfo:
        return EngineInfo(
            engine="reference",
            model=self._model_name,
            kv_bytes_per_token=self._cfg.kv_bytes_per_token,
            block_size=self._core.block_size,
            capacity_blocks=self._core.allocator.num_total,
            max_model_len=self._cfg.max_model_len,
            tokenizer=self._tokenizer,
            eos_token_id=self._cfg.eos_token_id,
            vocab_size=self._cfg.vocab_size,
            adapters=tuple(self._core.adapters.known()),
        )

    def load(self) -> Load:
        return self._core.load()

    async def load_adapter(self, name: str, path: str) -> None:
        # Reading and checking the files takes a while: not on the event loop.
        await asyncio.to_thread(self._core.adapters.register, name, path)

    async def unload_adapter(self, name: str) -> None:
        self._core.adapters.unregister(name)

    async def start(self, emit: Emit) -> None:
        self._emit = emit
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="reference-engine", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5.0)

    async def healthy(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._thread_error is None

    async def prefill(self, job: PrefillJob) -> None:
        rid = job.request_id
        loop = asyncio.get_running_loop()
        first: asyncio.Future[StepOutput] = loop.create_future()
        self._handlers[rid] = lambda out: first.done() or first.set_result(out)
        layers: asyncio.Queue[tuple[int, np.ndarray]] = asyncio.Queue()
        on_layer = None
        if job.kv is not None:
            on_layer = lambda i, rows: loop.call_soon_threadsafe(layers.put_nowait, (i, rows))  # noqa: E731
        stream_task = asyncio.create_task(self._stream_kv(job, layers)) if job.kv is not None else None
        try:
            self._core.add_prefill(
                rid,
                job.prompt_token_ids,
                job.sampling,
                on_layer,
                generated=job.generated,
                adapter=job.adapter,
            )
            self._wake.set()
            async with asyncio.timeout(job.deadline_s):
                out = await first
            if out.failed:
                raise out.as_error()
            # The first token goes out at once, while the KV may still be on the wire.
            self._emit(_token_output(rid, out))
            if stream_task is not None:
                if out.finish_reason is not None:
                    stream_task.cancel()
                else:
                    stream = await stream_task
                    # The decode side checks it runs the adapter this KV was computed with.
                    await stream.finish(
                        {"first_token": out.token_id, "adapter": self._adapter_id(job.adapter)}
                    )
        except TimeoutError:
            raise PdorchError(
                ErrorCode.DEADLINE_EXCEEDED, f"prefill of {rid} did not finish in time"
            ) from None
        finally:
            self._handlers.pop(rid, None)
            if stream_task is not None and not stream_task.done():
                stream_task.cancel()
            if stream_task is not None:
                with contextlib.suppress(BaseException):
                    await stream_task
            self._release(rid)

    async def _stream_kv(self, job: PrefillJob, layers: asyncio.Queue[tuple[int, np.ndarray]]) -> KvOutStream:
        assert job.kv is not None and self._sender is not None
        # Open when the first rows exist (the receiver treats an open transfer that goes quiet as
        # dead); prefill may wait in the engine's queue for a long time before that.
        first = await layers.get()
        stream = await self._sender.open(
            job.kv,
            num_layers=self._cfg.layers,
            rows_per_layer=len(job.prompt_token_ids),
            row_shape=self._cfg.kv_row_shape,
            dtype=self._cfg.dtype,
            deadline_s=job.deadline_s,
        )
        try:
            await stream.send_layer(*first)
            for _ in range(self._cfg.layers - 1):
                layer, rows = await layers.get()
                await stream.send_layer(layer, rows)
        except BaseException:
            with contextlib.suppress(Exception):
                await stream.abort("prefill stopped")
            raise
        return stream

    async def decode(self, job: DecodeJob) -> None:
        if self._receiver is None:
            raise PdorchError(ErrorCode.JOB_FAILED, "this worker cannot receive KV (no KV receiver)")
        rid = job.request_id
        prompt_len = len(job.prompt_token_ids)
        blocks = self._core.reserve_decode(rid, prompt_len)
        try:
            sink = _BlockSink(self._core, blocks, self._cfg.layers, prompt_len)
            trailer = await self._receiver.receive(
                job.kv, sink, deadline_s=job.deadline_s, on_arriving=lambda: self._emit(KvArriving(rid))
            )
            first = trailer.get("first_token")
            if not isinstance(first, int):
                raise PdorchError(ErrorCode.KV_CORRUPT, "KV trailer carries no first token")
            if trailer.get("adapter", "") != self._adapter_id(job.adapter):
                raise PdorchError(
                    ErrorCode.KV_REJECTED,
                    f"the KV was computed with another adapter than {job.adapter or 'none'!r} here",
                )
            self._emit(KvLoaded(rid, first))
            await self._run_until_finished(
                rid,
                lambda: self._core.add_decode(
                    rid,
                    prompt_len,
                    first,
                    job.sampling,
                    prompt_token_ids=job.prompt_token_ids,
                    generated=job.generated,
                    adapter=job.adapter,
                ),
            )
        finally:
            self._release(rid)

    async def generate(self, job: GenerateJob) -> None:
        rid = job.request_id
        try:
            await self._run_until_finished(
                rid,
                lambda: self._core.add_generate(
                    rid, job.prompt_token_ids, job.sampling, generated=job.generated, adapter=job.adapter
                ),
            )
        finally:
            self._release(rid)

    # ------------------------------------------------------------------ internals

    def _adapter_id(self, name: str) -> str:
        """What names an adapter's exact weights across workers ("" for the base model)."""
        return self._core.adapters.salt(name).hex() if name else ""

    async def _run_until_finished(self, rid: str, submit: Callable[[], None]) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def on_output(out: StepOutput) -> None:
            if done.done():
                return
            if out.failed:
                done.set_exception(out.as_error())
                return
            self._emit(_token_output(rid, out))
            if out.finish_reason is not None:
                done.set_result(None)

        self._handlers[rid] = on_output
        try:
            submit()
            self._wake.set()
            async with asyncio.timeout(self._job_timeout_s):
                await done
        except TimeoutError:
            raise PdorchError(
                ErrorCode.DEADLINE_EXCEEDED, f"{rid} did not finish in {self._job_timeout_s}s"
            ) from None
        finally:
            self._handlers.pop(rid, None)

    def _release(self, rid: str) -> None:
        """The job is over: the core frees its blocks (woken, so it does so now)."""
        self._core.cancel(rid)
        self._wake.set()

    def _dispatch(self, outputs: list[StepOutput]) -> None:
        for out in outputs:
            handler = self._handlers.get(out.request_id)
            if handler is not None:
                handler(out)

    def _run(self) -> None:
        assert self._loop is not None
        try:
            while not self._stop.is_set():
                if not self._core.has_work():
                    self._wake.wait(_IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                outputs = self._core.step()
                if outputs:
                    self._loop.call_soon_threadsafe(self._dispatch, outputs)
                elif self._core.last_step_computed_tokens == 0:
                    # Work that cannot progress (prompts waiting for blocks): wait, do not spin.
                    self._wake.wait(_IDLE_WAIT_S)
                    self._wake.clear()
        except BaseException as e:  # the agent sees it through healthy() and reports the worker dead
            self._thread_error = e
            raise
