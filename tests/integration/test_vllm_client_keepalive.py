"""The vLLM client never sends a request on a connection the server is about to drop.

vLLM's HTTP server closes a connection after 5 s idle. A request written on it at that moment is
lost ("Server disconnected") although vLLM is healthy. The server here makes that race certain: a
request that arrives on a connection idle for longer than its keep-alive is answered by closing
the connection, as a server that timed it out while the request was on its way would.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from transport.errors import PdorchError
from workers.engines.vllm.client import KEEPALIVE_S, VllmClient

# VLLM_HTTP_TIMEOUT_KEEP_ALIVE's default in vLLM.
VLLM_KEEPALIVE_S = 5.0
SSE = b'data: {"choices": [{"index": 0, "text": "", "token_ids": [7]}]}\n\ndata: [DONE]\n\n'


class IdleClosingServer:
    def __init__(self, keepalive_s: float) -> None:
        self.keepalive_s = keepalive_s
        self.connections = 0
        self.dropped = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        idle_since = time.monotonic()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if time.monotonic() - idle_since > self.keepalive_s:
                    self.dropped += 1
                    return  # timed out just as the request came: closed unanswered
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(SSE), SSE)
                )
                await writer.drain()
                idle_since = time.monotonic()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def _one(client: VllmClient, rid: str) -> list[dict]:
    return [event async for event in client.stream({"prompt": [1, 2]}, request_id=rid, timeout_s=10)]


async def test_an_idle_connection_past_the_servers_keepalive_is_not_reused() -> None:
    server = IdleClosingServer(keepalive_s=0.5)
    client = VllmClient(await server.start(), keepalive_s=0.3)
    try:
        assert len(await _one(client, "a")) == 1
        await asyncio.sleep(0.8)  # idle longer than both keep-alives
        assert len(await _one(client, "b")) == 1
        assert server.dropped == 0 and server.connections == 2
    finally:
        await client.close()
        await server.close()


async def test_the_race_is_real_with_a_keepalive_longer_than_the_servers() -> None:
    """The same sequence with the client keeping connections longer than the server fails: the
    test above would fail without the client's shorter keep-alive."""
    server = IdleClosingServer(keepalive_s=0.5)
    client = VllmClient(await server.start(), keepalive_s=15.0)
    try:
        await _one(client, "a")
        await asyncio.sleep(0.8)
        with pytest.raises(PdorchError, match="disconnected"):
            await _one(client, "b")
    finally:
        await client.close()
        await server.close()


def test_the_default_keepalive_is_below_vllms() -> None:
    assert KEEPALIVE_S < VLLM_KEEPALIVE_S
