"""pdorch's KV plane (asyncio + zmq) on a background thread inside a vLLM worker process.

vLLM calls the connector synchronously from its forward pass; the KV plane is asyncio. This owns
an event loop on a daemon thread: the connector hands work over with ``call_soon_threadsafe`` and
collects finished transfers under a lock, so the forward pass never waits on the network.

Every transfer ends in bounded time: sends are cut off at their lease, loads at their deadline.

In a tensor-parallel instance each worker process (rank) has its own: it binds rank r's endpoint
and moves rank r's part of each request's KV (``PdorchKvParams.route_for``); vLLM counts a
request's transfer over once every rank has said so.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading

import numpy as np

from transport import sockets
from transport.errors import ErrorCode, PdorchError
from transport.kv import KvReceiver, KvSender
from transport.kv.receiver import DEFAULT_LIMITS, ReceiverLimits
from transport.kv.same_host import SameHostMode
from transport.messages import KvRoute
from transport.security import Security, SecurityConfig
from workers.engines.vllm.block_io import BlockSink
from workers.engines.vllm.connector_metadata import RecvSpec, SendSpec
from workers.engines.vllm.kv_arrivals import ArrivalReporter
from workers.engines.vllm.transfer_params import PdorchKvParams, rank_endpoint

log = logging.getLogger("pdorch.vllm.kv")

MAX_KEPT_ERRORS = 256


class _Send:
    def __init__(self, spec: SendSpec) -> None:
        self.spec = spec
        self.layers: asyncio.Queue[tuple[int, np.ndarray] | None] = asyncio.Queue()
        self.step_ended = False


class KvPlaneThread:
    """Sends and loads of one vLLM worker. All public methods are safe to call from any thread."""

    def __init__(
        self,
        *,
        bind: str | None,
        num_layers: int,
        row_shape: tuple[int, ...],
        dtype: np.dtype,
        security: SecurityConfig,
        same_host: SameHostMode = SameHostMode.AUTO,
        limits: ReceiverLimits = DEFAULT_LIMITS,
        arrival_notes: str = "",
        rank: int = 0,
    ) -> None:
        """``same_host``: whether KV to and from vLLM instances on this host goes through shared
        memory (vLLM's CPU KV cache is plain memory, so its blocks are copied in and out of the
        ring like any sink's). ``arrival_notes``: the agent's endpoint for notes that a load's KV
        is arriving (kv_arrivals.py); "" sends none. ``rank``: the worker's tensor-parallel rank;
        ``bind`` is rank 0's endpoint."""
        self.rank = rank
        self._same_host = same_host
        self._arrival_notes = arrival_notes
        self._reporter: ArrivalReporter | None = None
        self._limits = limits
        self.num_layers = num_layers
        self.row_shape = row_shape
        self.dtype = dtype
        self._lock = threading.Lock()
        self._sends_done: set[str] = set()
        self._recvs_done: set[str] = set()
        self._recvs_failed: set[str] = set()
        # The last transfer errors by request id, for logs and tests (bounded).
        self.errors: dict[str, str] = {}
        self._sends: dict[str, _Send] = {}
        # Sends that ended before their step's end_send arrived (a fast transfer can).
        self._ended_early: set[str] = set()
        self._recv_tasks: dict[str, asyncio.Task[None]] = {}
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.endpoint = ""
        self._security_cfg = security
        bind = rank_endpoint(bind, rank) if bind else bind
        self._thread = threading.Thread(target=self._main, args=(bind,), name="pdorch-kv-plane", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise PdorchError(ErrorCode.CONFIG, f"KV plane did not start: {self._startup_error!r}")

    # ------------------------------------------------------------------ the loop thread

    def _main(self, bind: str | None) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._open(bind))
        except BaseException as e:
            self._startup_error = e
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _open(self, bind: str | None) -> None:
        self._security = Security.load(self._security_cfg)
        self._ctx = sockets.new_context()
        self._sender = KvSender(self._ctx, security=self._security, same_host=self._same_host)
        self._receiver: KvReceiver | None = None
        if bind:
            self._receiver = KvReceiver(
                self._ctx,
                bind=bind,
                security=self._security,
                same_host=self._same_host,
                **self._limits.kwargs(),
            )
            await self._receiver.start()
            self.endpoint = self._receiver.endpoint
            if self._arrival_notes:
                plain = sockets.plain_context(self._ctx)
                self._reporter = ArrivalReporter(plain, self._arrival_notes, self._security)

    def close(self) -> None:
        async def _shutdown() -> None:
            for task in [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]:
                task.cancel()
            for part in (self._receiver, self._sender):
                if part is not None:
                    with contextlib.suppress(Exception):
                        await part.close()
            if self._reporter is not None:
                self._reporter.close()
            self._security.close()
            self._ctx.destroy(linger=0)
            self._loop.stop()

        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.create_task, _shutdown())
            self._thread.join(timeout=5)

    # ------------------------------------------------------------------ sends (prefill side)

    def send_layer(self, spec: SendSpec, layer: int, rows: np.ndarray) -> None:
        """Queue one layer's rows of a send; the first layer opens the transfer."""
        self._loop.call_soon_threadsafe(self._on_layer, spec, layer, rows)

    def end_send(self, spec: SendSpec) -> None:
        """The step that should have produced the send is over: a send missing layers is aborted."""
        self._loop.call_soon_threadsafe(self._on_step_end, spec)

    def _on_layer(self, spec: SendSpec, layer: int, rows: np.ndarray) -> None:
        if spec.req_id in self._ended_early:
            return  # the send already failed; late layers of its step go nowhere
        send = self._sends.get(spec.req_id)
        if send is None:
            send = self._sends[spec.req_id] = _Send(spec)
            self._loop.create_task(self._run_send(send))
        send.layers.put_nowait((layer, rows))

    def _on_step_end(self, spec: SendSpec) -> None:
        send = self._sends.get(spec.req_id)
        if send is not None:
            send.step_ended = True
            send.layers.put_nowait(None)
        elif spec.req_id in self._ended_early:
            self._ended_early.discard(spec.req_id)
        else:
            # Never saw a layer (the step did not run it): nothing reads the blocks; release them.
            self._finish_send(spec.req_id, "no layer was saved")

    async def _run_send(self, send: _Send) -> None:
        spec = send.spec
        error = ""
        try:
            async with asyncio.timeout(spec.lease_s):
                await self._stream(send)
        except TimeoutError:
            error = f"KV send {spec.params.transfer_id} not confirmed within its {spec.lease_s:.0f}s lease"
        except PdorchError as e:
            error = str(e)
        except Exception as e:  # the lease must end whatever went wrong
            error = f"KV send {spec.params.transfer_id} failed: {e!r}"
        self._sends.pop(spec.req_id, None)
        if not send.step_ended:
            self._ended_early.add(spec.req_id)
        self._finish_send(spec.req_id, error)

    async def _stream(self, send: _Send) -> None:
        spec = send.spec
        stream = await self._sender.open(
            self._route(spec.params),
            num_layers=self.num_layers,
            rows_per_layer=len(spec.block_ids),
            row_shape=self.row_shape,
            dtype=self.dtype.name,
            deadline_s=spec.lease_s,
        )
        try:
            for _ in range(self.num_layers):
                item = await send.layers.get()
                if item is None:
                    raise PdorchError(ErrorCode.JOB_FAILED, "the forward pass did not save every layer")
                await stream.send_layer(*item)
            await stream.finish({"num_tokens": spec.num_tokens, "num_layers": self.num_layers})
        except BaseException as e:
            with contextlib.suppress(Exception):
                await stream.abort(str(e) or type(e).__name__)
            raise

    def _finish_send(self, req_id: str, error: str) -> None:
        if error:
            log.warning("KV send for %s ended: %s", req_id, error)
        with self._lock:
            self._sends_done.add(req_id)
            if error:
                self._note_error(req_id, error)

    # ------------------------------------------------------------------ loads (decode side)

    def start_recv(self, spec: RecvSpec, sink: BlockSink) -> None:
        def _start() -> None:
            task = self._loop.create_task(self._run_recv(spec, sink))
            # A task cancelled before it ever ran skips its body: report it here instead.
            task.add_done_callback(
                lambda t: (
                    self._report_recv(spec.req_id, "load cancelled (request aborted)")
                    if t.cancelled()
                    else None
                )
            )
            self._recv_tasks[spec.req_id] = task

        self._loop.call_soon_threadsafe(_start)

    # The routes are worked out on the loop thread: a request's bad route must not raise into
    # vLLM's forward pass (which would take the server down), only fail that request's load.

    def announce_recv(self, params: PdorchKvParams) -> None:
        """A decode request arrived: its sender's begin may wait for it until its deadline."""
        receiver = self._receiver
        if receiver is not None:
            self._loop.call_soon_threadsafe(
                lambda: receiver.announce(self._route(params), wait_s=params.deadline_s)
            )

    def withdraw_recv(self, params: PdorchKvParams) -> None:
        """It ended (or needs no load) before its load started: let its sender go now."""
        receiver = self._receiver
        if receiver is not None:
            self._loop.call_soon_threadsafe(lambda: receiver.withdraw(self._route(params)))

    def cancel_recv(self, req_id: str) -> None:
        def _cancel() -> None:
            task = self._recv_tasks.get(req_id)
            if task is not None:
                task.cancel()

        self._loop.call_soon_threadsafe(_cancel)

    async def _run_recv(self, spec: RecvSpec, sink: BlockSink) -> None:
        params = spec.params
        error = ""
        try:
            receiver = self._receiver_for(spec)
            reporter = self._reporter
            on_arriving = functools.partial(reporter.arriving, params.transfer_id) if reporter else None
            trailer = await receiver.receive(
                self._route(params), sink, deadline_s=params.deadline_s, on_arriving=on_arriving
            )
            if not sink.complete():
                error = f"KV {params.transfer_id} incomplete: rows per layer {sink.rows_written}"
            elif int((trailer or {}).get("num_tokens", -1)) != spec.num_tokens:
                got = (trailer or {}).get("num_tokens")
                error = f"KV {params.transfer_id} holds {got} tokens, expected {spec.num_tokens}"
        except asyncio.CancelledError:
            error = "load cancelled (request aborted)"
        except PdorchError as e:
            error = str(e)
        except Exception as e:  # a load must always be reported finished
            error = f"KV load {params.transfer_id} failed: {e!r}"
        self._report_recv(spec.req_id, error)

    def _report_recv(self, req_id: str, error: str) -> None:
        self._recv_tasks.pop(req_id, None)
        if error:
            log.warning("KV load for %s failed: %s", req_id, error)
        with self._lock:
            self._recvs_done.add(req_id)
            if error:
                self._recvs_failed.add(req_id)
                self._note_error(req_id, error)

    def _note_error(self, req_id: str, error: str) -> None:
        self.errors[req_id] = error
        while len(self.errors) > MAX_KEPT_ERRORS:
            del self.errors[next(iter(self.errors))]

    def _route(self, params: PdorchKvParams) -> KvRoute:
        return params.route_for(self.rank)

    def _receiver_for(self, spec: RecvSpec) -> KvReceiver:
        if self._receiver is None:
            raise PdorchError(
                ErrorCode.CONFIG, "this vLLM instance is not a KV consumer (no KV endpoint bound)"
            )
        return self._receiver

    # ------------------------------------------------------------------ results

    def take_finished(self) -> tuple[set[str], set[str], set[str]]:
        """(sends over, loads over, loads failed) since the last call."""
        with self._lock:
            sends, recvs, failed = self._sends_done, self._recvs_done, self._recvs_failed
            self._sends_done, self._recvs_done, self._recvs_failed = set(), set(), set()
        return sends, recvs, failed
