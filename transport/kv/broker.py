"""The KV broker (centralized mode): stores transfers from prefill agents, streams them to decode
agents on request, and forgets them only once a decode agent confirmed it has the whole transfer.

Toward prefill agents it is a receiver like a decode agent's (same messages, same checks); toward
decode agents it is a sender like a prefill agent's, started by a :class:`KvFetch`. A fetch may
come before the transfer began (it waits, up to its ``wait_ms``) or while it is arriving: chunks
are forwarded as they come (cut-through), so the two hops overlap; if the inbound transfer then
fails, the fetch is aborted (the decode side sees ``KV_TRUNCATED``). Several fetches of one
transfer may run (e.g. a retry on another decode agent after the first died): each gets the whole
transfer; the first to acknowledge deletes it.

Every peer's share is bounded (a peer is one connection; with authentication, only holders of a
trusted key get one): a sender may hold ``max_sender_bytes`` of the store, a transfer it began must
bring its first chunk within ``first_chunk_s`` and never go quiet for ``idle_s`` (else it is failed
and its bytes freed at once, not at the TTL), a fetch takes at most ``max_fetch_wait_s`` (waiting and
streaming) whatever it asks, and a peer may have ``max_fetches_per_peer`` fetches waiting or running
(``max_waiting_fetches`` waiting in all). With authentication a sender may only begin transfers in
its own scope (``<its key name>/...``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from transport.codec import Decoder, Encoder
from transport.errors import ErrorCode, PdorchError
from transport.kv.deadline import Deadline
from transport.kv.in_transfer import InTransfer, ReplyFn, validate_begin
from transport.kv.messages import (
    KV_PROTOCOL_VERSION,
    KvAbort,
    KvAccept,
    KvAck,
    KvBegin,
    KvChunk,
    KvCredit,
    KvEnd,
    KvFetch,
    KvMessage,
    KvNack,
    KvPing,
    KvPong,
)
from transport.kv.out_stream import KvOutStream, SendFn
from transport.kv.receive_buffers import keep_receive_buffers
from transport.kv.receiver import DEFAULT_RECEIVER_WINDOW_BYTES
from transport.kv.sender import DEFAULT_MAX_CHUNK_BYTES
from transport.kv.store import KvEntry, KvStore
from transport.loop_socket import LoopSocket
from transport.routed import cancel_and_wait, receive_routed
from transport.security import Plane, Security, peer_name
from transport.sockets import bound_endpoint, plain_context, router

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL_S = 0.25


class KvBrokerStats(msgspec.Struct, gc=False):
    entries: int = 0
    bytes: int = 0
    capacity_bytes: int = 0
    accepted: int = 0
    rejected: int = 0
    evicted: int = 0
    delivered: int = 0
    failed_inbound: int = 0
    failed_fetches: int = 0
    dropped_messages: int = 0
    active_fetches: int = 0
    waiting_fetches: int = 0
    # Inbound transfers failed for sending nothing (first chunk) or going quiet.
    stalled_inbound: int = 0
    refused_fetches: int = 0
    # Connections admitted and refused: none admitted means no peer got through its handshake.
    admitted_handshakes: int = 0
    refused_handshakes: int = 0


class _Inbound(msgspec.Struct, gc=False):
    identity: bytes
    transfer: InTransfer
    entry: KvEntry


class KvBroker:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        *,
        bind: str,
        security: Security,
        capacity_bytes: int,
        ttl_s: float,
        window_bytes: int = DEFAULT_RECEIVER_WINDOW_BYTES,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_sender_bytes: int = 0,
        first_chunk_s: float = 5.0,
        idle_s: float = 10.0,
        max_fetch_wait_s: float = 60.0,
        max_fetches_per_peer: int = 64,
        max_waiting_fetches: int = 4096,
    ) -> None:
        """``max_sender_bytes``: 0 is half of ``capacity_bytes``."""
        self._ctx = ctx
        self._bind = bind
        self._security = security
        self._window_bytes = window_bytes
        self._max_chunk_bytes = max_chunk_bytes
        self._first_chunk_s = first_chunk_s
        self._idle_s = idle_s
        self._max_fetch_wait_s = max_fetch_wait_s
        self._max_fetches_per_peer = max_fetches_per_peer
        self._max_waiting_fetches = max_waiting_fetches
        self._store = KvStore(
            capacity_bytes,
            ttl_s,
            clock=lambda: asyncio.get_running_loop().time(),
            max_owner_bytes=max_sender_bytes or capacity_bytes // 2,
        )
        self.endpoint = ""
        self._router: LoopSocket | None = None
        self._encoder = Encoder()
        self._decoder: Decoder[KvMessage] = Decoder(KvMessage)
        self._inbound: dict[str, _Inbound] = {}
        self._fetches: dict[tuple[bytes, str], KvOutStream] = {}
        self._waiting: dict[str, dict[bytes, Deadline]] = {}
        self._waiting_count = 0
        self._fetches_by_peer: Counter[bytes] = Counter()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stats = KvBrokerStats()
        # Answers every ping: a peer that sees it change knows the broker restarted (empty).
        self.instance = uuid.uuid4().hex

    @property
    def stats(self) -> KvBrokerStats:
        return msgspec.structs.replace(
            self._stats,
            entries=len(self._store),
            bytes=self._store.used_bytes,
            capacity_bytes=self._store.capacity_bytes,
            active_fetches=len(self._fetches),
            waiting_fetches=self._waiting_count,
            admitted_handshakes=self._security.admitted_handshakes,
            refused_handshakes=self._security.refused_handshakes,
        )

    async def start(self) -> None:
        keep_receive_buffers()
        auth = self._security.server(self._ctx, Plane.KV)
        self._router = LoopSocket(router(plain_context(self._ctx), self._bind, auth=auth))
        self.endpoint = bound_endpoint(self._router.raw)
        self._spawn(self._recv_loop(self._router), "kv-broker")
        self._spawn(self._housekeeping(), "kv-broker-housekeeping")

    async def close(self) -> None:
        tasks, self._tasks = list(self._tasks), set()
        await cancel_and_wait(tasks)
        if self._router is not None:
            self._router.close()
            self._router = None

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ----------------------------------------------------------------- wire

    def _drop(self, identity: bytes, why: str) -> None:
        self._stats.dropped_messages += 1

    async def _recv_loop(self, sock: LoopSocket) -> None:
        async for identity, msg, frame in receive_routed(sock, self._decoder, self._drop):
            try:
                await self._dispatch(identity, msg, frame)
            except Exception:  # one transfer's bug must not stop the broker
                log.exception("KV broker failed on a message for %s", msg.transfer_id)

    def _reply(self, identity: bytes, msg: KvMessage) -> None:
        """A control reply: never waits; a peer that is gone or not reading loses it."""
        if self._router is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._router.send_now([identity, *self._encoder.encode(msg)])

    def _replier(self, identity: bytes) -> ReplyFn:
        return functools.partial(self._reply, identity)

    def _data_sender(self, identity: bytes) -> SendFn:
        async def send(msg: KvMessage) -> None:
            assert self._router is not None
            try:
                await self._router.send([identity, *self._encoder.encode(msg)])
            except zmq.ZMQError as e:  # EHOSTUNREACH: the fetcher disconnected
                raise PdorchError(ErrorCode.WORKER_LOST, f"fetcher is gone: {e}") from None

        return send

    async def _nack(self, identity: bytes, tid: str, code: ErrorCode, message: str) -> None:
        self._reply(identity, KvNack(transfer_id=tid, code=str(code), message=message))

    async def _dispatch(self, identity: bytes, msg: KvMessage, frame: zmq.Frame) -> None:
        tid = msg.transfer_id
        if isinstance(msg, KvPing):
            self._reply(identity, KvPong(nonce=msg.nonce, instance=self.instance))
        elif isinstance(msg, KvBegin):
            await self._on_begin(identity, peer_name(frame), msg)
        elif isinstance(msg, KvFetch):
            await self._on_fetch(identity, msg)
        elif isinstance(msg, KvChunk | KvEnd | KvAbort) and self._is_inbound_from(identity, tid):
            inbound = self._inbound[tid]
            inbound.transfer.handle(msg)
            if inbound.transfer.finished:
                await self._settle_inbound(tid)
        elif isinstance(msg, KvAccept | KvCredit | KvAck | KvNack) and (identity, tid) in self._fetches:
            self._fetches[(identity, tid)].handle(msg)
        elif isinstance(msg, KvNack | KvAbort) and identity in self._waiting.get(tid, {}):
            self._drop_waiter(tid, identity)
        else:
            self._stats.dropped_messages += 1

    def _is_inbound_from(self, identity: bytes, tid: str) -> bool:
        inbound = self._inbound.get(tid)
        return inbound is not None and inbound.identity == identity

    # ----------------------------------------------------------------- from prefill agents

    async def _on_begin(self, identity: bytes, scope: str, begin: KvBegin) -> None:
        tid = begin.transfer_id
        if begin.version != KV_PROTOCOL_VERSION:
            await self._nack(identity, tid, ErrorCode.PROTOCOL_MISMATCH, f"KV protocol {begin.version}")
            return
        if scope and not tid.startswith(scope + "/"):
            # Not remembered: the transfer's real sender may still begin it.
            self._stats.rejected += 1
            await self._nack(
                identity, tid, ErrorCode.KV_REJECTED, f"transfer {tid} is not in the scope of {scope}"
            )
            return
        try:
            row_bytes = validate_begin(begin)
            size = row_bytes * begin.rows_per_layer * begin.num_layers
            entry = self._store.reserve(begin, size, owner=identity)
        except PdorchError as e:
            if e.code is ErrorCode.KV_REJECTED:
                self._stats.rejected += 1
            if self._store.get(tid) is None:  # never held: a fetch for it learns why
                self._store.remember(tid, e.code, e.message)
                await self._refuse_waiters(tid, e.code, e.message)
            await self._nack(identity, tid, e.code, e.message)
            return
        transfer = InTransfer(begin, entry, self._window_bytes, self._replier(identity))
        self._inbound[tid] = _Inbound(identity, transfer, entry)
        self._stats.accepted += 1
        transfer.accept()
        for waiter, deadline in self._pop_waiters(tid).items():
            self._start_serving(waiter, entry, deadline)

    async def _settle_inbound(self, tid: str) -> None:
        inbound = self._inbound.pop(tid)
        error = inbound.transfer.error
        if error is not None:
            self._stats.failed_inbound += 1
            inbound.entry.fail(error)
            self._store.remove(tid, error.code, f"the prefill side's transfer failed: {error.message}")
            return
        inbound.entry.finish(inbound.transfer.trailer)

    # ----------------------------------------------------------------- to decode agents

    async def _on_fetch(self, identity: bytes, fetch: KvFetch) -> None:
        tid = fetch.transfer_id
        if fetch.version != KV_PROTOCOL_VERSION:
            await self._nack(identity, tid, ErrorCode.PROTOCOL_MISMATCH, f"KV protocol {fetch.version}")
            return
        if (identity, tid) in self._fetches or identity in self._waiting.get(tid, {}):
            self._stats.dropped_messages += 1  # a duplicate fetch from the same peer
            return
        # However long it asks to wait: a fetch is a decode job's, which has a deadline of its own.
        deadline = Deadline(max(0.0, min(fetch.wait_ms / 1000, self._max_fetch_wait_s)))
        entry = self._store.get(tid)
        tombstone = self._store.tombstone(tid)
        if tombstone is not None and entry is None:
            await self._nack(identity, tid, tombstone.code, tombstone.message)
            return
        if self._fetches_by_peer[identity] >= self._max_fetches_per_peer:
            await self._refuse_fetch(identity, tid, "too many fetches from this peer")
        elif entry is not None:  # complete, or still arriving: forwarded as it comes
            self._start_serving(identity, entry, deadline)
        elif self._waiting_count >= self._max_waiting_fetches:
            await self._refuse_fetch(identity, tid, "too many fetches waiting")
        else:  # not begun yet
            self._waiting.setdefault(tid, {})[identity] = deadline
            self._waiting_count += 1
            self._fetches_by_peer[identity] += 1

    async def _refuse_fetch(self, identity: bytes, tid: str, why: str) -> None:
        self._stats.refused_fetches += 1
        await self._nack(identity, tid, ErrorCode.KV_REJECTED, why)

    def _start_serving(self, identity: bytes, entry: KvEntry, deadline: Deadline) -> None:
        begin = entry.begin
        stream = KvOutStream(
            transfer_id=begin.transfer_id,
            num_layers=begin.num_layers,
            rows_per_layer=begin.rows_per_layer,
            row_shape=tuple(begin.row_shape),
            dtype=begin.dtype,
            deadline=deadline,
            send=self._data_sender(identity),
            max_chunk_bytes=self._max_chunk_bytes,
            max_in_flight_bytes=self._window_bytes,
            checksum_rows=begin.checksum_rows,
        )
        self._fetches[(identity, begin.transfer_id)] = stream
        self._fetches_by_peer[identity] += 1
        entry.active_fetches += 1
        self._spawn(self._serve(identity, entry, stream, deadline), f"kv-broker fetch {begin.transfer_id}")

    async def _serve(self, identity: bytes, entry: KvEntry, stream: KvOutStream, deadline: Deadline) -> None:
        tid = entry.transfer_id
        try:
            await stream.begin()
            sent = 0
            while not (entry.complete and sent == len(entry.chunks)):
                if sent < len(entry.chunks):
                    chunk = entry.chunks[sent]
                    await stream.send_rows(chunk.layer, chunk.row_offset, chunk.rows, chunk.checksums)
                    sent += 1
                elif entry.error is not None:
                    await stream.abort(f"the prefill side's transfer failed: {entry.error.message}")
                    raise entry.error
                else:
                    await entry.wait_for_change(deadline)
            await stream.finish(entry.trailer)
        except PdorchError as e:
            # The entry stays: another decode agent (or a retry) may fetch it. The fetcher is told
            # (a no-op if the stream already ended): the fetch's own wait may have run out (at most
            # max_fetch_wait_s) long before the fetcher's deadline.
            await stream.abort(e.message)
            self._stats.failed_fetches += 1
            log.info("fetch of %s failed, keeping it: %s", tid, e)
        else:
            self._stats.delivered += 1
            self._store.remove(tid, ErrorCode.KV_REJECTED, "already delivered to a decode agent")
        finally:
            entry.active_fetches -= 1
            self._fetches.pop((identity, tid), None)
            self._peer_fetch_done(identity)

    def _peer_fetch_done(self, identity: bytes) -> None:
        self._fetches_by_peer[identity] -= 1
        if self._fetches_by_peer[identity] <= 0:
            del self._fetches_by_peer[identity]

    def _drop_waiter(self, tid: str, identity: bytes) -> None:
        waiters = self._waiting.get(tid, {})
        if waiters.pop(identity, None) is not None:
            self._waiting_count -= 1
            self._peer_fetch_done(identity)
        if not waiters:
            self._waiting.pop(tid, None)

    def _pop_waiters(self, tid: str) -> dict[bytes, Deadline]:
        """Every fetch waiting for ``tid``, no longer waiting (their peers' counts drop with them)."""
        waiters = self._waiting.pop(tid, {})
        self._waiting_count -= len(waiters)
        for identity in waiters:
            self._peer_fetch_done(identity)
        return waiters

    async def _refuse_waiters(self, tid: str, code: ErrorCode, message: str) -> None:
        for identity in self._pop_waiters(tid):
            await self._nack(identity, tid, code, message)

    # ----------------------------------------------------------------- time

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL_S)
            await self._fail_stalled_inbound()
            await self._evict_expired()
            for tid, waiters in list(self._waiting.items()):
                for identity, deadline in list(waiters.items()):
                    if deadline.expired():
                        self._drop_waiter(tid, identity)
                        await self._nack(identity, tid, ErrorCode.KV_TIMEOUT, "transfer not complete in time")

    async def _fail_stalled_inbound(self) -> None:
        """A sender opens a transfer when its first rows exist: one that sends nothing, or stops,
        is gone or hostile, and its reservation is freed now rather than at the TTL."""
        now = time.monotonic()
        for tid, inbound in list(self._inbound.items()):
            transfer = inbound.transfer
            if transfer.chunks_received == 0 and transfer.accepted_at is not None:
                if now - transfer.accepted_at > self._first_chunk_s:
                    transfer.fail(ErrorCode.KV_TIMEOUT, f"no chunk within {self._first_chunk_s:g}s of accept")
            elif transfer.last_activity is not None and now - transfer.last_activity > self._idle_s:
                transfer.fail(ErrorCode.KV_TIMEOUT, f"the sender went quiet for {self._idle_s:g}s")
            if transfer.finished:
                self._stats.stalled_inbound += 1
                await self._settle_inbound(tid)

    async def _evict_expired(self) -> None:
        for entry in self._store.expired():
            tid = entry.transfer_id
            message = f"evicted after {self._store.ttl_s:g} s unclaimed"
            inbound = self._inbound.pop(tid, None)
            if inbound is not None:
                inbound.transfer.fail(ErrorCode.KV_TIMEOUT, message)
            entry.fail(PdorchError(ErrorCode.KV_TIMEOUT, message))
            self._store.remove(tid, ErrorCode.KV_TIMEOUT, message)
            self._stats.evicted += 1
            await self._refuse_waiters(tid, ErrorCode.KV_TIMEOUT, message)
