"""One DEALER connection to a KV peer, carrying many transfers, each dispatched by its id.

A prefill agent holds one link per destination (decode agent or broker); a decode agent holds one
per broker it fetches from. Replies that do not decode, or that name a transfer nobody waits for,
are dropped and counted; they never disturb the other transfers on the link.

A link whose handshake the server refused is *broken*: libzmq never retries it, so every transfer
on it fails at once (``KV_REJECTED``, saying why) and its owner opens a new link for the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import zmq

from transport.codec import Decoder, Encoder
from transport.errors import ErrorCode, PdorchError
from transport.kv.messages import KvMessage, KvNack
from transport.loop_socket import LoopSocket
from transport.rate_limited_log import RateLimitedLog
from transport.routed import cancel_and_wait
from transport.security import ClientAuth
from transport.socket_watch import REFUSED, SocketWatch
from transport.sockets import dealer, plain_context

log = logging.getLogger(__name__)

Handler = Callable[[KvMessage], None]
_refusal_log = RateLimitedLog(log)


class DealerLink:
    def __init__(self, ctx: zmq.Context, endpoint: str, auth: ClientAuth) -> None:
        self.endpoint = endpoint
        self._encoder = Encoder()
        self._decoder: Decoder[KvMessage] = Decoder(KvMessage)
        self._handlers: dict[str, Handler] = {}
        self.dropped_messages = 0
        self.broken = ""  # why the server refused the handshake ("" while it has not)
        sock = dealer(plain_context(ctx), "", auth=auth)  # watched before it connects
        self._watch = SocketWatch(sock, REFUSED, self._refused)
        sock.connect(endpoint)
        self._sock = LoopSocket(sock)
        self._task = asyncio.create_task(self._recv_loop(), name=f"kv-link {endpoint}")

    @property
    def idle(self) -> bool:
        return not self._handlers

    def register(self, transfer_id: str, handler: Handler) -> None:
        self._handlers[transfer_id] = handler

    def unregister(self, transfer_id: str) -> None:
        self._handlers.pop(transfer_id, None)

    def has(self, transfer_id: str) -> bool:
        return transfer_id in self._handlers

    async def send(self, msg: KvMessage) -> None:
        """Send, waiting while the socket cannot take it (not connected yet, high-water mark)."""
        await self._sock.send(self._encoder.encode(msg))

    def reply(self, msg: KvMessage) -> None:
        """Send a reply (accept, credit, ack, nack) without waiting; lost if the socket cannot take it
        now (the transfer's deadline deals with a peer that is gone)."""
        with contextlib.suppress(zmq.ZMQError):
            self._sock.send_now(self._encoder.encode(msg))

    async def _recv_loop(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                msg = self._decoder.decode(frames)
            except PdorchError as e:
                self.dropped_messages += 1
                log.debug("dropped a malformed KV message from %s: %s", self.endpoint, e)
                continue
            handler = self._handlers.get(msg.transfer_id)
            if handler is None:
                self.dropped_messages += 1
                continue
            try:
                handler(msg)
            except Exception:  # a bug in one transfer must not stop the link for the others
                log.exception("KV handler for %s failed", msg.transfer_id)

    def _refused(self, why: str) -> None:
        self.broken = why
        _refusal_log("KV connection to %s refused: %s", self.endpoint, why)
        for tid, handler in list(self._handlers.items()):
            with contextlib.suppress(Exception):
                handler(KvNack(tid, str(ErrorCode.KV_REJECTED), f"KV server {self.endpoint}: {why}"))

    async def close(self, linger_ms: int = 0) -> None:
        """``linger_ms``: how long what was just sent (aborts) may still take to go out."""
        await cancel_and_wait([self._task])
        await self._watch.close()
        self._sock.close(linger_ms)
