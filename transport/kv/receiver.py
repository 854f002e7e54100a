"""The decode side of the KV plane: receives transfers on its own endpoint (p2p) or fetches them
from the broker (centralized).

p2p: a transfer is accepted only once the decode agent expects it (:meth:`KvReceiver.receive`)
and fewer than ``max_active`` transfers are in progress. Until then its begin message is parked
without credit, so the sender sends nothing more; a begin nobody expects within ``park_s`` is
refused (``KV_REJECTED``), as are begins beyond ``max_parked``. The memory a receiver can be made
to hold is thus bounded by ``max_active * window_bytes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict

import msgspec
import zmq
import zmq.asyncio

from transport.codec import Decoder, Encoder
from transport.errors import ErrorCode, PdorchError
from transport.kv.deadline import Deadline
from transport.kv.dealer_link import DealerLink
from transport.kv.fetch_transfer import FetchTransfer
from transport.kv.in_transfer import InTransfer, KvSink, ReplyFn, validate_begin
from transport.kv.messages import (
    KV_PROTOCOL_VERSION,
    KvAbort,
    KvBegin,
    KvChunk,
    KvEnd,
    KvFetch,
    KvMessage,
    KvNack,
)
from transport.kv.receive_buffers import keep_receive_buffers
from transport.loop_socket import LoopSocket
from transport.routed import cancel_and_wait, receive_routed
from transport.sockets import bound_endpoint, plain_context, router

log = logging.getLogger(__name__)

DEFAULT_RECEIVER_WINDOW_BYTES = 32 * 1024 * 1024
HOUSEKEEPING_INTERVAL_S = 0.25


class KvReceiverStats(msgspec.Struct, gc=False):
    completed: int = 0
    failed: int = 0
    dropped_messages: int = 0
    refused_begins: int = 0
    parked: int = 0
    active: int = 0


class _Parked(msgspec.Struct, gc=False):
    identity: bytes
    begin: KvBegin
    expires_at: float


class _Expected:
    def __init__(self, sink: KvSink) -> None:
        self.sink = sink
        self.transfer: InTransfer | None = None
        self.identity = b""
        self.activated = asyncio.Event()  # accepted, or ended before it was (see ``error``)
        self.error: PdorchError | None = None


class KvReceiver:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        *,
        bind: str | None,
        window_bytes: int = DEFAULT_RECEIVER_WINDOW_BYTES,
        max_active: int = 8,
        max_parked: int = 256,
        park_s: float = 30.0,
        idle_s: float = 10.0,
    ) -> None:
        """``bind=None``: no p2p endpoint (fetch only). ``window_bytes``: credit per transfer."""
        self._ctx = ctx
        self._bind = bind
        self._window_bytes = window_bytes
        self._max_active = max_active
        self._max_parked = max_parked
        self._park_s = park_s
        self._idle_s = idle_s
        self.endpoint = ""
        self._router: LoopSocket | None = None
        self._encoder = Encoder()
        self._decoder: Decoder[KvMessage] = Decoder(KvMessage)
        self._expected: dict[str, _Expected] = {}
        self._parked: OrderedDict[str, _Parked] = OrderedDict()
        self._links: dict[str, DealerLink] = {}
        self._fetches: set[FetchTransfer] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._stats = KvReceiverStats()

    @property
    def stats(self) -> KvReceiverStats:
        s = self._stats
        active = sum(1 for e in self._expected.values() if e.transfer is not None)
        dropped = s.dropped_messages + sum(link.dropped_messages for link in self._links.values())
        return msgspec.structs.replace(s, parked=len(self._parked), active=active, dropped_messages=dropped)

    async def start(self) -> None:
        keep_receive_buffers()
        if self._bind is None:
            return
        self._router = LoopSocket(router(plain_context(self._ctx), self._bind))
        self.endpoint = bound_endpoint(self._router.raw)
        self._tasks = [
            asyncio.create_task(self._recv_loop(self._router), name="kv-receiver"),
            asyncio.create_task(self._housekeeping(), name="kv-receiver-housekeeping"),
        ]

    async def close(self) -> None:
        await cancel_and_wait(self._tasks)
        for expected in self._expected.values():
            if expected.transfer is not None:
                expected.transfer.fail(ErrorCode.CANCELLED, "receiver closed")
            expected.activated.set()  # a receive() still waiting for a sender ends now
        self._parked.clear()
        for fetch in list(self._fetches):
            # Tell the broker at once (best effort); it keeps the transfer for another fetch.
            fetch.fail(PdorchError(ErrorCode.CANCELLED, "KV receiver closed"))
        for link in self._links.values():
            await link.close()
        self._links.clear()
        if self._router is not None:
            self._router.close()
            self._router = None

    # ----------------------------------------------------------------- p2p

    async def receive(self, transfer_id: str, sink: KvSink, *, deadline_s: float) -> dict[str, int | str]:
        """Wait for the sender of ``transfer_id`` and write its verified rows to ``sink``; return the
        trailer. Raises PdorchError: KV_TIMEOUT (nothing or not all in time), KV_CORRUPT, KV_TRUNCATED."""
        if self._router is None:
            raise PdorchError(ErrorCode.CONFIG, "this KV receiver has no p2p endpoint")
        if transfer_id in self._expected:
            raise PdorchError(ErrorCode.INTERNAL, f"transfer {transfer_id} is already expected")
        deadline = Deadline(deadline_s)
        expected = self._expected[transfer_id] = _Expected(sink)
        try:
            await self._promote()
            try:
                await deadline.wait(expected.activated.wait(), f"a sender to begin transfer {transfer_id}")
            except PdorchError as e:
                return self._outcome(e, {})
            transfer = expected.transfer
            if transfer is None:
                return self._outcome(
                    expected.error or PdorchError(ErrorCode.CANCELLED, "receiver closed"), {}
                )
            try:
                await deadline.wait(transfer.done.wait(), f"the rest of transfer {transfer_id}")
            except PdorchError as e:
                transfer.fail(e.code, e.message)
            return self._outcome(transfer.error, transfer.trailer)
        finally:
            del self._expected[transfer_id]
            parked = self._parked.pop(transfer_id, None)
            if parked is not None:  # it waited for a slot in vain: tell its sender now
                await self._refuse(
                    parked.identity, transfer_id, ErrorCode.KV_TIMEOUT, "no receive slot in time"
                )
            await self._promote()

    def _outcome(self, error: PdorchError | None, trailer: dict[str, int | str]) -> dict[str, int | str]:
        if error is not None:
            self._stats.failed += 1
            raise error
        self._stats.completed += 1
        return trailer

    def _drop(self, identity: bytes, why: str) -> None:
        self._stats.dropped_messages += 1

    async def _recv_loop(self, sock: LoopSocket) -> None:
        async for identity, msg in receive_routed(sock, self._decoder, self._drop):
            try:
                await self._dispatch(identity, msg)
            except Exception:  # one transfer's bug must not stop the receiver
                log.exception("KV receiver failed on a message for %s", msg.transfer_id)

    async def _dispatch(self, identity: bytes, msg: KvMessage) -> None:
        if isinstance(msg, KvBegin):
            await self._on_begin(identity, msg)
            return
        expected = self._expected.get(msg.transfer_id)
        if (
            isinstance(msg, KvChunk | KvEnd)
            and expected is not None
            and expected.transfer is not None
            and expected.identity != identity
        ):
            # The sender's connection dropped and came back under a new routing id: whatever was
            # in flight on the old one is lost, so the stream can no longer be complete.
            expected.transfer.fail(
                ErrorCode.KV_TRUNCATED, "the sender's connection changed mid-transfer; chunks were lost"
            )
            return
        if (
            isinstance(msg, KvChunk | KvEnd | KvAbort)
            and expected is not None
            and expected.transfer is not None
            and expected.identity == identity
        ):
            expected.transfer.handle(msg)
        elif isinstance(msg, KvAbort) and msg.transfer_id in self._parked:
            del self._parked[msg.transfer_id]
            if expected is not None:  # expected but still waiting for a slot
                expected.error = PdorchError(ErrorCode.KV_TRUNCATED, f"sender aborted: {msg.reason}")
                expected.activated.set()
        else:
            self._stats.dropped_messages += 1

    async def _on_begin(self, identity: bytes, begin: KvBegin) -> None:
        tid = begin.transfer_id
        if begin.version != KV_PROTOCOL_VERSION:
            await self._refuse(identity, tid, ErrorCode.PROTOCOL_MISMATCH, f"KV protocol {begin.version}")
            return
        try:
            validate_begin(begin)
        except PdorchError as e:
            await self._refuse(identity, tid, e.code, e.message)
            return
        expected = self._expected.get(tid)
        if tid in self._parked or (expected is not None and expected.transfer is not None):
            await self._refuse(identity, tid, ErrorCode.KV_REJECTED, "duplicate begin")
            return
        if len(self._parked) >= self._max_parked:
            await self._refuse(identity, tid, ErrorCode.KV_REJECTED, "too many transfers waiting")
            return
        loop = asyncio.get_running_loop()
        self._parked[tid] = _Parked(identity=identity, begin=begin, expires_at=loop.time() + self._park_s)
        await self._promote()

    async def _promote(self) -> None:
        """Accept parked transfers that are expected, while there is room."""
        active = sum(1 for e in self._expected.values() if e.transfer is not None)
        for tid in list(self._parked):
            if active >= self._max_active:
                return
            expected = self._expected.get(tid)
            if expected is None or expected.transfer is not None:
                continue
            parked = self._parked.pop(tid)
            reply_to = parked.identity
            transfer = InTransfer(parked.begin, expected.sink, self._window_bytes, self._replier(reply_to))
            expected.transfer, expected.identity = transfer, reply_to
            expected.activated.set()
            active += 1
            transfer.accept()

    def _replier(self, identity: bytes) -> ReplyFn:
        def reply(msg: KvMessage) -> None:
            self._send_to(identity, msg)

        return reply

    def _send_to(self, identity: bytes, msg: KvMessage) -> None:
        # Replies never wait: a peer that is gone or not reading loses them and times out.
        if self._router is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._router.send_now([identity, *self._encoder.encode(msg)])

    async def _refuse(self, identity: bytes, tid: str, code: ErrorCode, message: str) -> None:
        self._stats.refused_begins += 1
        self._send_to(identity, KvNack(transfer_id=tid, code=str(code), message=message))

    async def _housekeeping(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(HOUSEKEEPING_INTERVAL_S, self._park_s / 4))
            now = loop.time()
            for expected in list(self._expected.values()):
                transfer = expected.transfer
                if (
                    transfer is not None
                    and transfer.last_activity is not None
                    and now - transfer.last_activity > self._idle_s
                ):
                    transfer.fail(
                        ErrorCode.KV_TRUNCATED, f"the sender went quiet for {self._idle_s:.0f}s mid-transfer"
                    )
            for tid, parked in list(self._parked.items()):
                if tid not in self._expected and parked.expires_at <= now:
                    del self._parked[tid]
                    await self._refuse(
                        parked.identity, tid, ErrorCode.KV_REJECTED, "no decode job expects it"
                    )

    # ----------------------------------------------------------------- centralized

    async def fetch(
        self, broker: str, transfer_id: str, sink: KvSink, *, deadline_s: float
    ) -> dict[str, int | str]:
        """Ask the broker at ``broker`` for ``transfer_id`` and write its verified rows to ``sink``;
        return the trailer. The broker deletes its copy only after this side acknowledged it."""
        link = self._links.get(broker)
        if link is None:
            link = self._links[broker] = DealerLink(self._ctx, broker)
        if link.has(transfer_id):
            raise PdorchError(ErrorCode.INTERNAL, f"transfer {transfer_id} is already being fetched")
        deadline = Deadline(deadline_s)
        state = FetchTransfer(transfer_id, sink, self._window_bytes, link)
        link.register(transfer_id, state.handle)
        self._fetches.add(state)
        try:
            wait_ms = max(1, int(deadline.remaining() * 1000))
            await link.send(KvFetch(version=KV_PROTOCOL_VERSION, transfer_id=transfer_id, wait_ms=wait_ms))
            try:
                await deadline.wait(state.done.wait(), f"the broker to deliver transfer {transfer_id}")
            except PdorchError as e:
                state.fail(e)
            return self._outcome(state.error, state.trailer)
        finally:
            link.unregister(transfer_id)
            self._fetches.discard(state)
