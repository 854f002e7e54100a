"""How many HTTP connections one client address, and all clients, may hold open at once.

Each accepted connection passes through :class:`_Guarded`, which counts it against its client's
address and the total before handing it to aiohttp. Over either limit the client gets a complete
HTTP answer in OpenAI's error shape (429 for its own excess, 503 for the server's) and the
connection is closed: after at most ``_REFUSED_LINGER_S`` (closing at once, with the client's
request still unread, would reset the connection and lose the answer), or at once while
``_MAX_LINGERING`` refused connections already wait so (a flood gets resets). So a client that opens
connections and never uses them (or never finishes its headers, which aiohttp's keep-alive timeout
then closes) cannot take the server's file descriptors. Refusals are counted for ``/metrics``;
none is logged.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import cast

import msgspec

_PER_CLIENT = "per_client"
_TOTAL = "total"
_REFUSED_LINGER_S = 0.25
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
    def __init__(self, per_client: int, total: int) -> None:
        """``per_client`` 0: no limit per address."""
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
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._refused is not None:
            self._limits.lingering -= 1
        if self._inner is not None:
            self._limits._release(self._client)
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)
        # A refused connection's request is read and dropped until it closes.

    def eof_received(self) -> bool | None:
        if self._refused is not None:
            self._refused.close()
            return None
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
