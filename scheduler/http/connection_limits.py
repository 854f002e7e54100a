"""How many HTTP connections one client address, and all clients, may hold open at once, and how
long one may take over a request's head or sit idle.

Each accepted connection passes through :class:`_Guarded`, which counts it against its client's
address and the total before handing it to aiohttp. Over either limit the client gets a complete
HTTP answer in OpenAI's error shape (429 for its own excess, 503 for the server's) and the
connection is closed: after at most ``_REFUSED_LINGER_S`` (closing at once, with the client's
request still unread, would reset the connection and lose the answer), or at once while
``_MAX_LINGERING`` refused connections already wait so (a flood gets resets). So a client that opens
connections and never uses them cannot take the server's file descriptors. Refusals are counted for
``/metrics``; none is logged.

Two timers, so that the defence against slow clients does not cut keep-alive short: a request's
head must arrive whole within ``header_timeout_s`` of its first byte (of the connection's opening,
for its first request), else the connection is closed; a connection idle between requests is
closed by aiohttp after its keep-alive timeout (``http.idle_timeout_s``), which a proxy in front
needs to be longer than its own idle timeout for upstream connections (else it may send a request
on a connection the server is closing). :func:`request_heads` tells a connection when its
request's head has been parsed and when the request is done.

A third bounds a client that stops reading its answer (nginx's ``send_timeout``): once the
connection's send buffers are full its writes pause, and if the client then takes less than
``_MIN_TAKEN`` bytes in ``write_stall_timeout_s`` (nothing, or a trickle meant to hold the
connection) the connection is aborted (what is buffered for it is dropped), so the request ends as
if the client had hung up and gives back what it holds, rather than holding them for as long as
the client keeps the connection open.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import cast

import msgspec
from aiohttp import web

_PER_CLIENT = "per_client"
_TOTAL = "total"
_REFUSED_LINGER_S = 0.25
# What a client whose answer waits for it must take per stall timeout (16 KiB a minute at the
# default: ~270 bytes/s, far below any real link, far above a trickle of a byte now and then).
_MIN_TAKEN = 16 << 10
_MAX_LINGERING = 64


def _answer(status: str, message: str, kind: str) -> bytes:
    body = msgspec.json.encode(
        {"error": {"message": message, "type": kind, "code": "too_many_connections", "param": None}}
    )
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Retry-After: 1\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


_ANSWERS = {
    _PER_CLIENT: _answer(
        "429 Too Many Requests", "too many open connections from your address", "rate_limit_error"
    ),
    _TOTAL: _answer(
        "503 Service Unavailable", "the server has too many open connections", "service_unavailable"
    ),
}


class ConnectionLimits:
    def __init__(
        self, per_client: int, total: int, header_timeout_s: float, write_stall_timeout_s: float
    ) -> None:
        """``per_client`` 0: no limit per address."""
        self.header_timeout_s = header_timeout_s
        self.write_stall_timeout_s = write_stall_timeout_s
        self.stalled = 0  # connections aborted because their client stopped reading
        self._per_client = per_client
        self._total = total
        self._by_client: Counter[str] = Counter()
        self.open = 0
        self.lingering = 0
        self.refused: Counter[str] = Counter()

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` that admits connections within the limits."""
        return lambda: _Guarded(self, factory)

    def _admit(self, client: str) -> str:
        """Count the connection in, or say which limit refuses it."""
        if self._per_client and self._by_client[client] >= self._per_client:
            return _PER_CLIENT
        if self.open >= self._total:
            return _TOTAL
        self._by_client[client] += 1
        self.open += 1
        return ""

    def _release(self, client: str) -> None:
        self.open -= 1
        self._by_client[client] -= 1
        if self._by_client[client] <= 0:
            del self._by_client[client]


class _Guarded(asyncio.Protocol):
    """One connection: refused at once, or aiohttp's protocol for it, to which everything goes."""

    def __init__(self, limits: ConnectionLimits, factory: Callable[[], asyncio.Protocol]) -> None:
        self._limits = limits
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._client = ""
        self._refused: asyncio.Transport | None = None
        self._transport: asyncio.BaseTransport | None = None
        # When the first byte of a head not yet parsed came (None: none pending); in a request (its
        # head parsed, its answer not yet done), bytes are its body. One timer at most, checked
        # lazily: a head that completes in time does not touch it.
        self._head_since: float | None = None
        self._in_request = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._stall_timer: asyncio.TimerHandle | None = None  # set while writing is paused
        self._stall_mark = 0  # what the client had taken (``_delivered``) when the stall timer was set

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        refused = self._limits._admit(client)
        if refused:
            self._limits.refused[refused] += 1
            # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
            transport = cast(asyncio.Transport, transport)
            transport.write(_ANSWERS[refused])
            if self._limits.lingering >= _MAX_LINGERING or not transport.can_write_eof():
                transport.close()
                return
            self._refused = transport
            self._limits.lingering += 1
            transport.write_eof()
            asyncio.get_running_loop().call_later(_REFUSED_LINGER_S, transport.close)
            return
        self._client = client
        self._transport = transport
        self._head_began()
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused is not None:
            self._limits.lingering -= 1
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._stop_stall_watch()
        if self._inner is not None:
            self._limits._release(self._client)
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            if self._head_since is None and not self._in_request:
                self._head_began()
            self._inner.data_received(data)
        # A refused connection's request is read and dropped until it closes.

    def request_began(self) -> None:
        """The request's head has been parsed: what follows is its body, until it is done."""
        self._head_since = None
        self._in_request = True

    def request_done(self) -> None:
        self._in_request = False

    def _head_began(self) -> None:
        loop = asyncio.get_running_loop()
        self._head_since = loop.time()
        if self._head_timer is None:
            self._head_timer = loop.call_at(self._head_since + self._limits.header_timeout_s, self._head_late)

    def _head_late(self) -> None:
        self._head_timer = None
        if self._head_since is None or self._transport is None:
            return
        loop = asyncio.get_running_loop()
        due = self._head_since + self._limits.header_timeout_s
        if loop.time() < due:  # this head began after the timer was set, for an earlier one
            self._head_timer = loop.call_at(due, self._head_late)
            return
        self._transport.close()

    def eof_received(self) -> bool | None:
        if self._refused is not None:
            self._refused.close()
            return None
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            if self._stall_timer is None:
                self._watch_stall()
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._stop_stall_watch()
        if self._inner is not None:
            self._inner.resume_writing()

    def _stop_stall_watch(self) -> None:
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None

    def _watch_stall(self) -> None:
        """Look again after the stall timeout at how much the client has taken."""
        self._stall_mark = _delivered(cast(asyncio.Transport, self._transport))
        loop = asyncio.get_running_loop()
        self._stall_timer = loop.call_later(self._limits.write_stall_timeout_s, self._stall_check)

    def _stall_check(self) -> None:
        self._stall_timer = None
        if self._transport is None or self._transport.is_closing():
            return
        transport = cast(asyncio.Transport, self._transport)
        if _delivered(transport) >= self._stall_mark + _MIN_TAKEN:
            self._watch_stall()  # slow, but reading
            return
        # A close would wait for the buffered bytes to go out, which they never will.
        self._limits.stalled += 1
        transport.abort()


# struct tcp_info (linux/tcp.h): tcpi_bytes_acked, a u64 at this offset (Linux >= 4.1).
_TCP_INFO_BYTES_ACKED = 120


def _delivered(transport: asyncio.Transport) -> int:
    """A count that grows when the client takes bytes of its answer: the bytes its TCP stack
    acknowledged (the kernel's own buffers fill long before a stalled client shows in what is
    still queued here; a zero-window probe's answer acknowledges nothing), else, where that is not
    to be had, what is still queued here, negated (nothing is added to it while writing is paused)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and hasattr(socket, "TCP_INFO"):
        try:
            info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_BYTES_ACKED + 8)
            if len(info) >= _TCP_INFO_BYTES_ACKED + 8:
                return int(struct.unpack_from("=Q", info, _TCP_INFO_BYTES_ACKED)[0])
        except OSError:
            pass
    return -transport.get_write_buffer_size()


@web.middleware
async def request_heads(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Tell the request's connection that its head has arrived, and when the request is done."""
    transport = request.transport
    guard = transport.get_protocol() if transport is not None else None
    if not isinstance(guard, _Guarded):  # served without the limits (an app under test)
        return await handler(request)
    guard.request_began()
    try:
        return await handler(request)
    finally:
        guard.request_done()
