"""The worker agent: registers with the scheduler, heartbeats, runs jobs on its engine.

One DEALER socket to the scheduler's ROUTER, authenticated with the worker's key and pinning the
scheduler's (re-read from the trusted keys at every connection, so a rotated scheduler key is
picked up). The agent says Hello, waits for Welcome, then every message either way counts as a
heartbeat. If the scheduler goes silent for ``liveness`` intervals, or tells us it does not know
us (or refuses us), we cancel everything we run for it (it has failed those requests already) and
register again with jittered back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from pathlib import Path
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from transport import sockets
from transport.codec import Decoder, Encoder
from transport.errors import ErrorCode, PdorchError
from transport.kv import KvReceiver
from transport.liveness import Backoff, PeerLiveness
from transport.loop_socket import LoopSocket
from transport.messages import (
    MAX_JOB_MESSAGES,
    PROTOCOL_VERSION,
    TOKENIZER_FILES,
    AdapterLoad,
    AdapterUnload,
    Cancel,
    DecodeJob,
    Disconnect,
    Draining,
    FromWorker,
    GenerateJob,
    Goodbye,
    Heartbeat,
    Hello,
    JobError,
    JobMessage,
    JobMessages,
    Load,
    PrefillJob,
    Role,
    TokenizerFiles,
    TokenOutput,
    ToWorker,
    Welcome,
    WorkerFatal,
)
from transport.rate_limited_log import RateLimitedLog
from transport.routed import cancel_and_wait
from transport.security import KeyKind, Plane, Security
from workers.adapter_ops import AdapterOps
from workers.engines.base import Engine

log = logging.getLogger("pdorch.agent")

# Messages that may wait for room in the queues to the scheduler before the session is given up.
MAX_BACKLOG = 100_000
# How long an agent that has drained may still wait for its last messages (those behind a backlog,
# and Goodbye) to leave, and then for what is queued in the socket, before it closes it.
GOODBYE_FLUSH_S = 5.0
GOODBYE_LINGER_MS = 1000
# A control message is one frame, capped at 16 MiB by the sockets; leave room for the envelope.
_MAX_TOKENIZER_BYTES = 15 * 1024 * 1024


class AgentConfig(msgspec.Struct, kw_only=True):
    scheduler: str
    worker_id: str
    role: Role
    accelerator: str = "cpu"
    kv_endpoint: str = ""
    labels: dict[str, str] = {}
    # Until the scheduler's Welcome tells us its own values.
    heartbeat_interval_s: float = 0.5
    heartbeat_liveness: int = 4
    hello_timeout_s: float = 5.0
    drain_timeout_s: float = 60.0
    health_interval_s: float = 2.0
    # Directories LoRA adapters may be loaded from at run time (none: run-time loading is off).
    lora_roots: list[str] = []


class _Reconnect(Exception):
    """The session with the scheduler is over; register again."""


class Agent:
    def __init__(
        self,
        cfg: AgentConfig,
        engine: Engine,
        ctx: zmq.asyncio.Context,
        *,
        security: Security,
        kv_receiver: KvReceiver | None = None,
    ) -> None:
        """``kv_receiver``: this worker's KV endpoint, if it moves KV in this process: whether it
        turns transfers away for lack of room now goes in every heartbeat's load, and if it stops,
        the worker is dead as with an engine that is (it could take no handoff)."""
        self._cfg = cfg
        self._engine = engine
        self._ctx = ctx
        self._security = security
        self._kv_receiver = kv_receiver
        self._enc = Encoder()
        self._dec: Decoder[ToWorker] = Decoder(ToWorker)
        self._sock: LoopSocket | None = None
        self._jobs: dict[str, asyncio.Task[None]] = {}
        # Prefill and generate jobs whose first token (a prefill's, not a decoded one) is still to
        # come (a resumed generate job's first is a decoded one: counted one short, once).
        self._first_pending: set[str] = set()
        self._next_index: dict[str, int] = {}  # job id -> output index of its next token
        # Job messages made in this turn of the event loop, sent together at its end (see _send).
        self._outbox: list[JobMessage] = []
        # Messages waiting for room in the socket's queue, in order (_send_now); bounded (_beat).
        self._backlog: deque[FromWorker] = deque()
        self._drainer: asyncio.Task[None] | None = None
        self._linger_ms = 0  # how long the socket's last queued messages may take to leave at close
        self._decoded_tokens = 0
        self._interval = cfg.heartbeat_interval_s
        self._liveness = cfg.heartbeat_liveness
        self._draining = False
        self.registered = asyncio.Event()
        self.bad_messages = 0
        self._bad_log = RateLimitedLog(log)
        self._adapters = AdapterOps(engine, cfg.lora_roots, self._send)

    # ------------------------------------------------------------------ lifecycle

    async def run(self, stop: asyncio.Event) -> int:
        """Serve until ``stop`` is set (then drain) or the engine dies. Returns an exit code."""
        await self._engine.start(self._send)
        backoff = Backoff()
        session = asyncio.create_task(self._sessions(backoff))
        health = asyncio.create_task(self._watch_health())
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({session, health, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if health in done and not health.cancelled() and health.result() is False:
                self._send(WorkerFatal("engine or KV endpoint is not healthy"))
                return 1
            if stopper in done:
                await self._drain()
            return 0
        finally:
            await cancel_and_wait([session, health, stopper])
            await self._adapters.close()
            await self._cancel_all()
            await self._engine.close()
            self._drop_backlog()
            if self._sock is not None:
                self._sock.close(self._linger_ms)

    async def _drain(self) -> None:
        """Stop taking jobs, let in-flight ones finish (bounded), then say Goodbye."""
        self._draining = True
        self._send(Draining("shutting down"))
        log.info("draining %d in-flight jobs", len(self._jobs))
        deadline = time.monotonic() + self._cfg.drain_timeout_s
        while self._jobs and time.monotonic() < deadline:
            await asyncio.wait(list(self._jobs.values()), timeout=max(0.0, deadline - time.monotonic()))
        self._send(Goodbye("drained" if not self._jobs else "drain timeout"))
        # What waits for room in the socket's queue (the scheduler behind), Goodbye last, leaves
        # before the socket closes, and what is queued then has a moment more: a Goodbye lost
        # leaves the scheduler to find the worker gone by its silence.
        if self._drainer is not None and not self._drainer.done():
            await asyncio.wait({self._drainer}, timeout=GOODBYE_FLUSH_S)
        self._linger_ms = GOODBYE_LINGER_MS

    async def _watch_health(self) -> bool:
        while True:
            await asyncio.sleep(self._cfg.health_interval_s)
            if not await self._engine.healthy():
                log.error("engine is not healthy; reporting the worker dead")
                return False
            if self._kv_receiver is not None and not self._kv_receiver.alive:
                log.error("the KV endpoint has stopped (see above); reporting the worker dead")
                return False

    # ------------------------------------------------------------------ sessions with the scheduler

    async def _sessions(self, backoff: Backoff) -> None:
        while True:
            try:
                await self._session(backoff)
            except _Reconnect as e:
                log.warning("re-registering with the scheduler: %s", e)
            except PdorchError as e:  # e.g. no scheduler key among the trusted ones (yet)
                log.error("cannot connect to the scheduler: %s", e.message)
            self.registered.clear()
            await self._cancel_all()
            await asyncio.sleep(backoff.next_delay())

    def _connect(self) -> LoopSocket:
        self._drop_backlog()  # the last session's: its jobs were cancelled, its scheduler told
        if self._sock is not None:
            self._sock.close()
        auth = self._security.client(Plane.CONTROL, self._security.server_key(KeyKind.SCHEDULER))
        # No fixed routing id: the scheduler names the connection; Hello says which worker it is.
        self._sock = LoopSocket(
            sockets.dealer(sockets.plain_context(self._ctx), self._cfg.scheduler, auth=auth)
        )
        return self._sock

    def _hello(self) -> Hello:
        info = self._engine.info()
        return Hello(
            protocol_version=PROTOCOL_VERSION,
            worker_id=self._cfg.worker_id,
            role=self._cfg.role,
            engine=info.engine,
            model=info.model,
            kv_bytes_per_token=info.kv_bytes_per_token,
            block_size=info.block_size,
            capacity_blocks=info.capacity_blocks,
            accelerator=self._cfg.accelerator,
            # An explicit advertised address wins over what the engine bound (e.g. the pod IP).
            kv_endpoint=self._cfg.kv_endpoint or info.kv_endpoint,
            max_model_len=info.max_model_len,
            tokenizer=info.tokenizer,
            eos_token_id=info.eos_token_id,
            vocab_size=info.vocab_size,
            labels=self._cfg.labels,
            adapters=list(info.adapters),
            adapter_paths=dict(self._adapters.paths),
        )

    async def _session(self, backoff: Backoff) -> None:
        sock = self._connect()
        self._send(self._hello())
        welcome = await self._await_welcome(sock)
        self._interval, self._liveness = welcome.heartbeat_interval_s, welcome.heartbeat_liveness
        backoff.reset()
        self._send_tokenizer()
        self.registered.set()
        if self._draining:
            self._send(Draining("shutting down"))
        log.info("registered with %s as %s (%s)", self._cfg.scheduler, self._cfg.worker_id, self._cfg.role)
        peer = PeerLiveness(self._interval, self._liveness, time.monotonic())
        # Receiving and beating are two tasks, so a message costs one wake-up, not a poll too.
        tasks = {
            asyncio.create_task(self._receive(sock, peer), name="agent-recv"),
            asyncio.create_task(self._beat(peer), name="agent-heartbeat"),
        }
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises the _Reconnect that ended the session
        finally:
            await cancel_and_wait(tasks)

    async def _receive(self, sock: LoopSocket, peer: PeerLiveness) -> None:
        while True:
            frames = await sock.recv_multipart()
            peer.seen(time.monotonic())
            self._handle(frames)

    async def _beat(self, peer: PeerLiveness) -> None:
        while True:
            self._send(Heartbeat(self._load()))
            await asyncio.sleep(self._interval)
            if peer.expired(time.monotonic()):
                raise _Reconnect(f"scheduler silent for {peer.expiry_s:.1f}s")
            if len(self._backlog) > MAX_BACKLOG:
                # Its jobs are cancelled with the session; the scheduler moves their requests.
                waiting = len(self._backlog)
                raise _Reconnect(f"the scheduler takes messages slower than they come ({waiting} wait)")

    def _load(self) -> Load:
        return msgspec.structs.replace(
            self._engine.load(),
            kv_refusing=self._kv_receiver is not None and self._kv_receiver.refusing,
            decoded_tokens=self._decoded_tokens,
        )

    def _send_tokenizer(self) -> None:
        """Ship the tokenizer's files: the scheduler may run where the model directory is not."""
        spec = self._engine.info().tokenizer
        folder = Path(spec)
        if spec == "byte" or not folder.is_dir():
            return
        files = {name: (folder / name).read_bytes() for name in TOKENIZER_FILES if (folder / name).is_file()}
        if sum(len(b) for b in files.values()) > _MAX_TOKENIZER_BYTES:
            log.warning(
                "tokenizer files in %s exceed %d bytes; the scheduler must read them itself",
                folder,
                _MAX_TOKENIZER_BYTES,
            )
            return
        self._send(TokenizerFiles(files))

    async def _await_welcome(self, sock: LoopSocket) -> Welcome:
        deadline = time.monotonic() + self._cfg.hello_timeout_s
        while (left := deadline - time.monotonic()) > 0:
            try:
                # Not wait_for: on Python 3.11 it drops a cancellation that comes with a message.
                async with asyncio.timeout(left):
                    frames = await sock.recv_multipart()
            except TimeoutError:
                break
            msg = self._decode(frames)
            if isinstance(msg, Welcome):
                return msg
            if isinstance(msg, Disconnect):
                raise _Reconnect(f"scheduler refused registration: {msg.reason}")
        raise _Reconnect(f"no Welcome from {self._cfg.scheduler} within {self._cfg.hello_timeout_s:.0f}s")

    def _decode(self, frames: list[Any]) -> ToWorker | None:
        try:
            return self._dec.decode(frames)
        except PdorchError as e:
            self.bad_messages += 1
            self._bad_log("dropping a malformed message from the scheduler: %s", e.message)
            return None

    def _handle(self, frames: list[Any]) -> None:
        msg = self._decode(frames)
        if isinstance(msg, PrefillJob | DecodeJob | GenerateJob):
            self._start_job(msg)
        elif isinstance(msg, Cancel):
            self._cancel(msg.request_id)
        elif isinstance(msg, AdapterLoad | AdapterUnload):
            self._adapters.handle(msg)
        elif isinstance(msg, Disconnect):
            raise _Reconnect(f"scheduler says: {msg.reason}")

    # ------------------------------------------------------------------ jobs

    def _start_job(self, job: PrefillJob | DecodeJob | GenerateJob) -> None:
        rid = job.request_id
        if self._draining:
            self._send(JobError(rid, ErrorCode.NO_WORKER, "worker is draining"))
            return
        if rid in self._jobs:
            self._send(JobError(rid, ErrorCode.INVALID_REQUEST, "duplicate request id"))
            return
        if job.adapter and job.adapter not in self._engine.info().adapters:
            self._send(
                JobError(rid, ErrorCode.MODEL_NOT_FOUND, f"adapter {job.adapter!r} is not served here")
            )
            return
        if not isinstance(job, DecodeJob):
            self._first_pending.add(rid)
        # Where the job's first token is in the request's output (a decode job's come after the
        # prefill's token 0).
        self._next_index[rid] = job.generated + isinstance(job, DecodeJob)
        if isinstance(job, PrefillJob):
            coro = self._engine.prefill(job)
        elif isinstance(job, DecodeJob):
            coro = self._engine.decode(job)
        else:
            coro = self._engine.generate(job)
        task = asyncio.create_task(self._run_job(rid, coro), name=f"job-{rid}")
        self._jobs[rid] = task

    async def _run_job(self, rid: str, coro: Any) -> None:
        try:
            await coro
        except PdorchError as e:
            log.info("job %s failed: %s", rid, e)
            self._send(JobError(rid, e.code, e.message))
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("job %s crashed", rid)
            self._send(JobError(rid, ErrorCode.INTERNAL, f"{type(e).__name__}: {e}"))
        finally:
            self._jobs.pop(rid, None)
            self._first_pending.discard(rid)
            self._next_index.pop(rid, None)

    def _cancel(self, rid: str) -> None:
        # The job's own ``finally`` frees what it holds in the engine.
        task = self._jobs.pop(rid, None)
        if task is not None:
            task.cancel()

    async def _cancel_all(self) -> None:
        tasks = list(self._jobs.values())
        for rid in list(self._jobs):
            self._cancel(rid)
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    def _send(self, msg: FromWorker) -> None:
        """Job messages wait for the end of this turn of the event loop and leave with the others
        made in it (JobMessages); a request's first token leaves at once (its time to first token),
        and so does everything else, after what waits (the order is kept)."""
        first = False
        if isinstance(msg, TokenOutput):
            rid = msg.request_id
            if (at := self._next_index.get(rid)) is not None:
                msg.index = at
                self._next_index[rid] = at + len(msg.token_ids)
            if msg.token_ids:  # counted sent or not: it was decoded
                first = rid in self._first_pending
                self._first_pending.discard(rid)
                self._decoded_tokens += len(msg.token_ids) - first
        if isinstance(msg, JobMessage) and not first:
            self._outbox.append(msg)
            if len(self._outbox) == 1:
                asyncio.get_running_loop().call_soon(self._flush)
            return
        self._flush()
        self._send_now(msg)

    def _flush(self) -> None:
        out, self._outbox = self._outbox, []
        for start in range(0, len(out), MAX_JOB_MESSAGES):
            part = out[start : start + MAX_JOB_MESSAGES]
            self._send_now(part[0] if len(part) == 1 else JobMessages(part))

    def _send_now(self, msg: FromWorker) -> None:
        """Send, or queue behind what waits for room: a message is never dropped while the session
        lasts (a dropped token left a gap in its request's output, or stalled it until its token
        timeout, when the scheduler fell behind)."""
        sock = self._sock
        if sock is None:
            return
        if self._backlog:  # the socket's queue is full: after what waits, in order
            self._backlog.append(msg)
            return
        try:
            sock.send_now(self._enc.encode(msg))
        except zmq.Again:  # the scheduler is behind (the queues to it are full): wait for room
            self._backlog.append(msg)
            backlog = self._send_backlog(sock)
            self._drainer = asyncio.get_running_loop().create_task(backlog, name="agent-backlog")
        except zmq.ZMQError as e:  # the socket is gone: the session is over, its jobs with it
            log.debug("dropping %s: %s", type(msg).__name__, e)

    async def _send_backlog(self, sock: LoopSocket) -> None:
        # A new session cancels this first (_connect); a closed socket ends it with its session.
        with contextlib.suppress(zmq.ZMQError):
            while self._backlog:
                await sock.send(self._enc.encode(self._backlog[0]))
                self._backlog.popleft()

    def _drop_backlog(self) -> None:
        self._backlog.clear()
        if self._drainer is not None:
            self._drainer.cancel()
            self._drainer = None
