"""The scheduler's end of the control plane: one ROUTER socket, every agent a DEALER peer.

It registers workers (Hello -> Welcome, version checked), treats any message as a heartbeat,
sends heartbeats, expires silent workers, and hands job-scoped messages to the inbox.
Malformed frames are counted and dropped (and logged at most once per interval); the loop never
dies on a peer's mistake.

Who may register as what: the ROUTER names each connection itself, and a worker id belongs to the
connection that registered it. With authentication, the connection's key must be allowed to claim
the id (``claims`` of its key file), and a key removed from the trusted set loses its workers.
Another connection claiming a registered id is refused (``identity_in_use``) while the first is
alive; it gets the id once the first connection is gone (a restarted worker: its old connection
closed when its process died).

The socket is a plain one driven by the event loop (:class:`LoopSocket`), so a send fails at once
when its peer is gone (``EHOSTUNREACH``: the ROUTER no longer has a connection with that identity,
e.g. the agent's process died) or stuck (``EAGAIN``: its queue is full). Such a worker is dropped
then, its requests told at once, instead of at the next heartbeat expiry. A connection closing
(an agent's process died: the kernel closed its socket) brings the next heartbeat forward, so
that send finds the worker gone within milliseconds rather than up to a heartbeat interval later.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Callable

import msgspec
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
    AdapterAck,
    Disconnect,
    Draining,
    FromWorker,
    Goodbye,
    Heartbeat,
    Hello,
    JobMessage,
    JobMessages,
    TokenizerFiles,
    ToWorker,
    Welcome,
    WorkerFatal,
)
from transport.rate_limited_log import RateLimitedLog
from transport.routed import cancel_and_wait, receive_routed
from transport.security import Plane, Security, peer_name
from transport.socket_watch import CLOSED, SocketWatch

log = logging.getLogger("pdorch.control")

# The soonest a heartbeat follows the one before when connections close (however often they
# close: each early beat is a send to every worker).
MIN_BEAT_GAP_S = 0.05
# After a connection closed, beat again this long after the early beat: the monitor reports the
# close from libzmq's I/O thread, and the ROUTER lets go of the connection a moment later (when
# this thread next takes the I/O thread's commands), so a send at once may still be taken.
CLOSED_RECHECK_S = 0.25


class ControlServer:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        *,
        bind: str,
        security: Security,
        cluster: Cluster,
        inbox: Inbox,
        heartbeat_interval_s: float,
        heartbeat_liveness: int,
        on_capacity: Callable[[], None] = lambda: None,
        on_tokenizer: Callable[[str, dict[str, bytes]], None] = lambda spec, files: None,
        on_joined: Callable[[str], None] = lambda worker_id: None,
        on_adapter_ack: Callable[[str, AdapterAck], None] = lambda worker_id, ack: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._security = security
        auth = security.server(ctx, Plane.CONTROL)
        self._sock = LoopSocket(sockets.router(sockets.plain_context(ctx), bind, auth=auth))
        self.endpoint = sockets.bound_endpoint(self._sock.raw)
        # Set when a connection closes: the heartbeat loop then beats early (see the module's doc).
        self._closed = asyncio.Event()
        self._watch = SocketWatch(self._sock.raw, CLOSED, lambda _: self._closed.set())
        self._cluster = cluster
        self._inbox = inbox
        self._interval = heartbeat_interval_s
        self._liveness = heartbeat_liveness
        # Called when a worker joins or reports load: requests waiting for room may fit now.
        self._on_capacity = on_capacity
        self._on_tokenizer = on_tokenizer
        # A worker registered (the LoRA registry brings its adapters in line); an adapter
        # operation was answered (the worker's served adapters, and the result, for the waiter).
        self._on_joined = on_joined
        self._on_adapter_ack = on_adapter_ack
        self._clock = clock
        self._enc = Encoder()
        self._dec: Decoder[FromWorker] = Decoder(FromWorker)
        self._tasks: list[asyncio.Task[None]] = []
        self.bad_messages = 0
        # Registrations refused, by the Disconnect code they got.
        self.refused: Counter[str] = Counter()
        self._bad_log = RateLimitedLog(log)
        self._refusal_log = RateLimitedLog(log)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._receive_loop(), name="control-recv"),
            asyncio.create_task(self._heartbeat_loop(), name="control-heartbeat"),
        ]

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        await self._watch.close()
        self._sock.close()

    # ------------------------------------------------------------------ sending

    def send(self, worker_id: str, msg: ToWorker) -> bool:
        """Send to a registered worker. False (and the worker is dropped) if it is unreachable."""
        worker = self._cluster.get(worker_id)
        if worker is None:
            return False
        error = self._send(worker.identity, msg)
        if error is None:
            return True
        log.warning("worker %s dropped: cannot send it %s (%s)", worker_id, type(msg).__name__, error)
        self._cluster.drop_worker(worker_id, "control connection lost")
        return False

    def _send_to(self, identity: bytes, msg: ToWorker) -> None:
        """To a connection that may have no worker (refusals, the Welcome)."""
        error = self._send(identity, msg)
        if error is not None:
            log.warning("cannot send %s to %r: %s", type(msg).__name__, identity[:64], error)

    def _send(self, identity: bytes, msg: ToWorker) -> zmq.ZMQError | None:
        """None once queued; else why not: ``EHOSTUNREACH``, the peer is gone (ROUTER_MANDATORY), or
        ``EAGAIN``, its queue is full (a stuck peer)."""
        try:
            self._sock.send_now([identity, *self._enc.encode(msg)])
        except zmq.ZMQError as e:
            return e
        return None

    # ------------------------------------------------------------------ receiving

    def _drop(self, identity: bytes, why: str) -> None:
        self.bad_messages += 1
        self._bad_log("dropping a malformed control message from %r: %s", identity[:64], why)

    async def _receive_loop(self) -> None:
        async for identity, msg, frame in receive_routed(self._sock, self._dec, self._drop):
            try:
                self._handle(identity, msg, frame)
            except Exception:  # a bug must not take the control plane down with it
                log.exception("error handling a control message")

    def _handle(self, identity: bytes, msg: FromWorker, frame: zmq.Frame) -> None:
        now = self._clock()
        if isinstance(msg, Hello):
            self._hello(identity, peer_name(frame), msg, now)
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
        elif isinstance(msg, JobMessage):
            self._inbox.deliver(wid, msg.request_id, msg)  # request_id: the job's (attempt's) id
        elif isinstance(msg, JobMessages):
            for job_msg in msg.messages:
                self._inbox.deliver(wid, job_msg.request_id, job_msg)
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
        elif isinstance(msg, AdapterAck):
            # Placement reads the served adapters from the Hello: keep it current.
            worker.hello = msgspec.structs.replace(worker.hello, adapters=msg.adapters)
            self._on_adapter_ack(wid, msg)
        elif isinstance(msg, Goodbye):
            log.info("worker %s left: %s", wid, msg.reason)
            self._cluster.drop_worker(wid, f"worker left: {msg.reason}")

    def _hello(self, identity: bytes, key_name: str, hello: Hello, now: float) -> None:
        if hello.protocol_version != PROTOCOL_VERSION:
            self._send_to(
                identity,
                Disconnect(
                    f"protocol version {hello.protocol_version} unsupported; "
                    f"scheduler speaks {PROTOCOL_VERSION}"
                ),
            )
            return
        refusal = self._claim_problem(identity, key_name, hello.worker_id)
        if refusal is not None:
            code, reason = refusal
            self.refused[code] += 1
            self._refusal_log("refused a worker registering as %r: %s", hello.worker_id[:64], reason)
            self._send_to(identity, Disconnect(reason, code=code))
            return
        key = self._security.trusted(key_name)
        self._cluster.register(identity, hello, now, key_name=key_name, public_key=key.public if key else "")
        self._send_to(identity, Welcome(PROTOCOL_VERSION, hello.worker_id, self._interval, self._liveness))
        log.info(
            "worker %s registered: role=%s model=%s engine=%s",
            hello.worker_id,
            hello.role,
            hello.model,
            hello.engine,
        )
        self._on_joined(hello.worker_id)
        self._on_capacity()

    def _claim_problem(self, identity: bytes, key_name: str, worker_id: str) -> tuple[str, str] | None:
        """Why this connection may not register as ``worker_id`` (code, reason), or None."""
        if self._security.enabled:
            key = self._security.trusted(key_name)
            if key is None or not key.may_claim(worker_id):
                return "unauthorized", f"key {key_name!r} may not register as worker {worker_id!r}"
        mine = self._cluster.by_identity(identity)
        if mine is not None and mine.worker_id != worker_id:
            return "bad_identity", f"this connection is registered as {mine.worker_id!r}"
        holder = self._cluster.get(worker_id)
        if holder is not None and holder.identity != identity:
            if self._connected(holder.identity):
                return "identity_in_use", f"worker {worker_id!r} is registered on another live connection"
            self._cluster.drop_worker(worker_id, "its connection is gone (it registered again)")
        return None

    def _connected(self, identity: bytes) -> bool:
        """Does the ROUTER still have a connection under ``identity``? (A heartbeat is harmless.)"""
        try:
            self._sock.send_now([identity, *self._enc.encode(Heartbeat())])
        except zmq.ZMQError as e:
            return e.errno != zmq.EHOSTUNREACH  # EAGAIN: there, but not reading
        return True

    def _revoked(self) -> list[str]:
        """Workers whose key is no longer trusted (removed, or replaced by another)."""
        if not self._security.enabled:
            return []
        gone = []
        for worker in self._cluster.workers():
            key = self._security.trusted(worker.key_name)
            if key is None or key.public != worker.public_key:
                gone.append(worker.worker_id)
        return gone

    async def _heartbeat_loop(self) -> None:
        beat = Heartbeat()
        loop = asyncio.get_running_loop()
        last = loop.time()
        recheck_at = math.inf  # a beat to come soon after one a closed connection brought
        while True:
            try:
                async with asyncio.timeout_at(min(last + self._interval, recheck_at)):
                    await self._closed.wait()
                await asyncio.sleep(last + MIN_BEAT_GAP_S - loop.time())  # a connection closed
                closed = True
            except TimeoutError:
                closed = False
            self._closed.clear()
            last = loop.time()
            recheck_at = last + CLOSED_RECHECK_S if closed else math.inf
            for wid in self._revoked():
                worker = self._cluster.get(wid)
                if worker is not None:
                    log.warning("worker %s dropped: its key %r is no longer trusted", wid, worker.key_name)
                    self._send_to(worker.identity, Disconnect("key no longer trusted", code="unauthorized"))
                    self._cluster.drop_worker(wid, "its key is no longer trusted")
            for worker in self._cluster.workers():
                self.send(worker.worker_id, beat)
            for wid in self._cluster.expire(self._clock()):
                log.warning("worker %s dropped: no heartbeat for %.1fs", wid, self._interval * self._liveness)
