"""The scheduler's end of the control plane: one ROUTER socket, every agent a DEALER peer.

It registers workers (Hello -> Welcome, version checked), treats any message as a heartbeat,
sends heartbeats, expires silent workers, and hands job-scoped messages to the inbox.
Malformed frames are counted and dropped; the loop never dies on a peer's mistake.

The socket is a plain one driven by the event loop (:class:`LoopSocket`), so a send fails at once
when its peer is gone (``EHOSTUNREACH``: the ROUTER no longer has a connection with that identity,
e.g. the agent's process died) or stuck (``EAGAIN``: its queue is full). Such a worker is dropped
then, its requests told at once, instead of at the next heartbeat expiry.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Callable

import zmq
import zmq.asyncio

from scheduler.cluster import Cluster, WorkerState
from scheduler.inbox import Inbox
from transport import sockets
from transport.codec import Decoder, Encoder
from transport.errors import PdorchError
from transport.loop_socket import LoopSocket
from transport.messages import (
    PROTOCOL_VERSION,
    Disconnect,
    Draining,
    FromWorker,
    Goodbye,
    Heartbeat,
    Hello,
    JobError,
    KvLoaded,
    TokenizerFiles,
    TokenOutput,
    ToWorker,
    Welcome,
    WorkerFatal,
)
from transport.routed import cancel_and_wait, receive_routed

log = logging.getLogger("pdorch.control")


class ControlServer:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        *,
        bind: str,
        cluster: Cluster,
        inbox: Inbox,
        heartbeat_interval_s: float,
        heartbeat_liveness: int,
        on_capacity: Callable[[], None] = lambda: None,
        on_tokenizer: Callable[[str, dict[str, bytes]], None] = lambda spec, files: None,
        clock: Callable[[], float] = time.monotonic,
        token: str = "",
    ) -> None:
        """``token``: when set, a Hello must carry it to register."""
        self._sock = LoopSocket(sockets.router(sockets.plain_context(ctx), bind, handover=True))
        self.endpoint = sockets.bound_endpoint(self._sock.raw)
        self._cluster = cluster
        self._inbox = inbox
        self._interval = heartbeat_interval_s
        self._liveness = heartbeat_liveness
        # Called when a worker joins or reports load: requests waiting for room may fit now.
        self._on_capacity = on_capacity
        self._on_tokenizer = on_tokenizer
        self._clock = clock
        self._token = token.encode()
        self._enc = Encoder()
        self._dec: Decoder[FromWorker] = Decoder(FromWorker)
        self._tasks: list[asyncio.Task[None]] = []
        self.bad_messages = 0

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="control-recv"),
            asyncio.create_task(self._heartbeat_loop(), name="control-heartbeat"),
        ]

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        self._sock.close()

    # ------------------------------------------------------------------ sending

    def send(self, worker_id: str, msg: ToWorker) -> bool:
        """Send to a registered worker. False (and the worker is dropped) if it is unreachable."""
        worker = self._cluster.get(worker_id)
        if worker is None:
            return False
        if self._send_to(worker.identity, msg):
            return True
        self._cluster.drop_worker(worker_id, "control connection lost")
        return False

    def _send_to(self, identity: bytes, msg: ToWorker) -> bool:
        try:
            self._sock.send_now([identity, *self._enc.encode(msg)])
            return True
        except zmq.ZMQError as e:
            # EHOSTUNREACH: the peer is gone (ROUTER_MANDATORY); EAGAIN: its queue is full (stuck peer).
            log.warning("cannot send %s to %r: %s", type(msg).__name__, identity[:64], e)
            return False

    # ------------------------------------------------------------------ receiving

    def _drop(self, identity: bytes, why: str) -> None:
        self.bad_messages += 1
        log.warning("dropping a malformed control message from %r: %s", identity[:64], why)

    async def _receive_loop(self) -> None:
        async for identity, msg in receive_routed(self._sock, self._dec, self._drop):
            try:
                self._handle(identity, msg)
            except Exception:  # a bug must not take the control plane down with it
                log.exception("error handling a control message")

    def _handle(self, identity: bytes, msg: FromWorker) -> None:
        now = self._clock()
        if isinstance(msg, Hello):
            self._hello(identity, msg, now)
            return
        worker = self._cluster.by_identity(identity)
        if worker is None:
            # Not registered (e.g. we expired it, or we restarted): ask it to say Hello again.
            self._send_to(identity, Disconnect("unknown worker; send Hello", code="unknown_worker"))
            return
        worker.liveness.seen(now)
        wid = worker.worker_id
        if isinstance(msg, Heartbeat):
            if msg.load is not None:
                worker.load = msg.load
                self._on_capacity()
        elif isinstance(msg, TokenOutput | KvLoaded | JobError):
            self._inbox.deliver(wid, msg.request_id, msg)  # request_id: the job's (attempt's) id
        elif isinstance(msg, TokenizerFiles):
            try:
                self._on_tokenizer(worker.hello.tokenizer, msg.files)
            except PdorchError as e:
                log.warning("worker %s sent an unusable tokenizer: %s", wid, e.message)
        elif isinstance(msg, Draining):
            worker.state = WorkerState.DRAINING
            log.info("worker %s is draining: %s", wid, msg.reason)
        elif isinstance(msg, WorkerFatal):
            log.error("worker %s reported fatal error: %s", wid, msg.message)
            self._cluster.drop_worker(wid, f"worker failed: {msg.message}")
        elif isinstance(msg, Goodbye):
            log.info("worker %s left: %s", wid, msg.reason)
            self._cluster.drop_worker(wid, f"worker left: {msg.reason}")

    def _hello(self, identity: bytes, hello: Hello, now: float) -> None:
        if hello.protocol_version != PROTOCOL_VERSION:
            self._send_to(
                identity,
                Disconnect(
                    f"protocol version {hello.protocol_version} unsupported; "
                    f"scheduler speaks {PROTOCOL_VERSION}"
                ),
            )
            return
        if self._token and not hmac.compare_digest(hello.token.encode(), self._token):
            log.warning("refused worker %r: wrong or missing control token", hello.worker_id)
            self._send_to(identity, Disconnect("wrong or missing control token", code="unauthorized"))
            return
        if identity != hello.worker_id.encode():
            self._send_to(identity, Disconnect("socket identity must equal worker_id", code="bad_identity"))
            return
        self._cluster.register(identity, hello, now)
        self._send_to(identity, Welcome(PROTOCOL_VERSION, hello.worker_id, self._interval, self._liveness))
        log.info(
            "worker %s registered: role=%s model=%s engine=%s",
            hello.worker_id,
            hello.role,
            hello.model,
            hello.engine,
        )
        self._on_capacity()

    async def _heartbeat_loop(self) -> None:
        beat = Heartbeat()
        while True:
            await asyncio.sleep(self._interval)
            for worker in self._cluster.workers():
                self.send(worker.worker_id, beat)
            for wid in self._cluster.expire(self._clock()):
                log.warning("worker %s dropped: no heartbeat for %.1fs", wid, self._interval * self._liveness)
