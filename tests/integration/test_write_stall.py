"""A client that stops reading its answer: once its connection's buffers are full and it has read
nothing (or a mere trickle) for ``http.write_stall_timeout_s``, the connection is aborted and the
handler's pending write fails as if the client had hung up (so a stream's request ends and gives
back what it holds). A slow client that keeps reading is not cut. The connection limits in front are the
scheduler's own (``ConnectionLimits``), serving a small aiohttp app in this process, on the
scheduler's event loop (uvloop) and on asyncio's."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import uvloop
from aiohttp import web

from scheduler.http.connection_limits import ConnectionLimits

STALL_S = 1.0
CHUNK = b"x" * (1 << 20)
LOOPS = {"uvloop": uvloop.run, "asyncio": asyncio.run}


@dataclass
class Served:
    port: int
    limits: ConnectionLimits
    written: list[int] = field(default_factory=list)  # MiB written, per answer that ended
    outcomes: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def _served() -> AsyncIterator[Served]:
    limits = ConnectionLimits(8, 64, header_timeout_s=10.0, write_stall_timeout_s=STALL_S)
    state = Served(0, limits)

    async def stream(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        mib = int(request.query["mib"])
        sent = 0
        try:
            while sent < mib:
                await resp.write(CHUNK)
                sent += 1
            await resp.write_eof()
            state.outcomes.append("done")
        except ConnectionResetError:
            state.outcomes.append("reset")
        state.written.append(sent)
        return resp

    app = web.Application()
    app.router.add_get("/stream", stream)
    runner = web.AppRunner(app)
    await runner.setup()
    assert runner.server is not None
    server = await asyncio.get_running_loop().create_server(limits.wrap(runner.server), "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await runner.cleanup()


def _client(port: int, mib: int) -> socket.socket:
    """A request for ``mib`` MiB through a small receive window."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET /stream?mib={mib} HTTP/1.1\r\nHost: pdorch\r\n\r\n".encode())
    sock.setblocking(False)
    return sock


async def _until(predicate: Callable[[], object], timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)


async def _is_cut(trickle: int) -> None:
    """A client that reads ``trickle`` bytes every 0.1 s (0: nothing; 1,024: ~10 KB/s, reading
    but less than the 16 KiB per stall timeout a client must take) is cut after the timeout."""
    async with _served() as served:
        sock = _client(served.port, mib=256)
        loop = asyncio.get_running_loop()
        began = loop.time()
        try:
            while not served.outcomes:
                assert loop.time() < began + STALL_S * 10 + 10, "the client was not cut"
                if trickle:
                    with contextlib.suppress(BlockingIOError, ConnectionResetError):
                        sock.recv(trickle)
                await asyncio.sleep(0.1)
            assert served.outcomes == ["reset"] and served.limits.stalled == 1
            assert served.written[0] < 64  # what the buffers took before writing paused
            assert loop.time() - began >= STALL_S
            await _until(lambda: served.limits.open == 0, 5)
        finally:
            sock.close()


async def _reads_slowly() -> None:
    # ~400 KB/s through the small window: each 1 MiB write keeps writing paused for ~2.5 s, longer
    # than the stall timeout, while the client reads all along.
    async with _served() as served:
        sock = _client(served.port, mib=3)
        loop = asyncio.get_running_loop()
        received = 0
        try:
            while True:
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 30)
                if not data:
                    break
                received += len(data)
                if served.outcomes and received > 3 << 20:
                    break
                await asyncio.sleep(0.01)
            assert served.outcomes == ["done"] and served.limits.stalled == 0
            assert received > 3 << 20  # the head and chunk framing besides
        finally:
            sock.close()


@pytest.mark.parametrize("trickle", [0, 1024], ids=["reads nothing", "reads a trickle"])
@pytest.mark.parametrize("loop", LOOPS)
def test_a_client_that_stops_reading_is_cut_at_the_stall_timeout(loop: str, trickle: int) -> None:
    run: Callable[[Awaitable[None]], None] = LOOPS[loop]
    run(_is_cut(trickle))


@pytest.mark.parametrize("loop", LOOPS)
def test_a_slow_client_that_keeps_reading_gets_everything(loop: str) -> None:
    run: Callable[[Awaitable[None]], None] = LOOPS[loop]
    run(_reads_slowly())
