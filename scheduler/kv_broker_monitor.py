"""The scheduler's watch on the KV broker (centralized mode): is it there, and is it the same one?

It pings the broker every heartbeat interval over a DEALER of its own (authenticated with the
scheduler's key, pinning the broker's). Its connection closing (the broker's process died, or its
socket closed) or no answer for ``liveness`` intervals (cut off, or hung) means the broker is
gone; an answer from another ``instance`` means it restarted, empty. Either way the handoffs that
were going through it are lost, and ``on_lost`` says so at once, so their requests move on at once
(a broker that died) or within the liveness (one gone silent) instead of waiting for their handoff
deadline.
``reachable`` tells placement whether to send new handoffs through the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import zmq
import zmq.asyncio

from transport import sockets
from transport.codec import Decoder, Encoder
from transport.errors import PdorchError
from transport.kv.messages import KV_PROTOCOL_VERSION, KvMessage, KvPing, KvPong
from transport.loop_socket import LoopSocket
from transport.routed import cancel_and_wait
from transport.security import ClientAuth
from transport.socket_watch import CLOSED, SocketWatch

log = logging.getLogger("pdorch.kv_broker_monitor")


class KvBrokerMonitor:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        endpoint: str,
        *,
        auth: ClientAuth,
        interval_s: float,
        liveness: int,
        on_lost: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ctx = ctx
        self._endpoint = endpoint
        self._auth = auth
        self._interval_s = interval_s
        self._liveness = liveness
        self._on_lost = on_lost
        self._clock = clock
        self._enc = Encoder()
        self._dec: Decoder[KvMessage] = Decoder(KvMessage)
        self._task: asyncio.Task[None] | None = None
        self.reachable = False
        self.instance = ""
        self.losses = 0
        self._last_pong = 0.0

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="kv-broker-monitor")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task])

    async def _run(self) -> None:
        raw = sockets.dealer(sockets.plain_context(self._ctx), "", auth=self._auth)
        sock = LoopSocket(raw)
        watch = SocketWatch(raw, CLOSED, self._closed)  # before it connects: nothing is missed
        nonce = 0
        self._last_pong = self._clock()
        try:
            raw.connect(self._endpoint)
            while True:
                nonce += 1
                # A full queue while the broker is away: the silence speaks for itself.
                with contextlib.suppress(zmq.ZMQError):
                    sock.send_now(self._enc.encode(KvPing(KV_PROTOCOL_VERSION, nonce)))
                await self._listen(sock, self._clock() + self._interval_s)
                if self.reachable and self._clock() - self._last_pong > self._interval_s * self._liveness:
                    self._lost(f"silent for {self._interval_s * self._liveness:g}s")
        finally:
            await watch.close()
            sock.close()

    def _closed(self, why: str) -> None:
        if self.reachable:  # (a connection that never answered tells nothing new)
            self._lost(why)

    async def _listen(self, sock: LoopSocket, until: float) -> None:
        """Take the broker's answers until ``until`` (on the monitor's clock)."""
        while (left := until - self._clock()) > 0:
            try:
                # Not wait_for: on Python 3.11 it returns a message that arrives as the task is
                # cancelled and drops the cancellation, and close() would then wait forever.
                async with asyncio.timeout(left):
                    frames = await sock.recv_multipart()
            except TimeoutError:
                return
            pong = self._pong(frames)
            if pong is not None:
                self._last_pong = self._clock()
                self._answered(pong)

    def _pong(self, frames: list[zmq.Frame]) -> KvPong | None:
        try:
            msg = self._dec.decode(frames)
        except PdorchError:
            return None
        return msg if isinstance(msg, KvPong) else None

    def _answered(self, pong: KvPong) -> None:
        if self.instance and pong.instance != self.instance:
            # Handoffs sent through it while it was away are lost too; but a restart noticed after
            # its going away was is the same loss, counted once.
            self._lost("restarted (its transfers are gone)", outage=self.reachable)
        if not self.reachable:
            log.info("KV broker %s is reachable (instance %s)", self._endpoint, pong.instance[:8])
        self.instance = pong.instance
        self.reachable = True

    def _lost(self, why: str, outage: bool = True) -> None:
        """``outage``: a new one, counted in ``losses`` (else one counted already)."""
        self.losses += int(outage)
        self.reachable = False
        log.warning("KV broker %s %s", self._endpoint, why)
        self._on_lost(why)
