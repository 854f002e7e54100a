"""A TCP proxy on 127.0.0.1 for the KV path: transparent, or it damages, cuts or holds the stream.

Put it between a KV sender and a receiver (the receiver advertises the proxy's address). Modes,
applied to the bytes flowing towards the target:

- ``pass``: forwards both ways untouched;
- ``corrupt``: flips one byte per 256 KiB;
- ``truncate``: closes a connection after 300 KB;
- ``hold``: forwards nothing more until the mode changes (the bytes wait here), so a transfer
  stays in flight for as long as a test needs;
- ``slow``: forwards at about :data:`SLOW_BYTES_PER_S`, as a slow link would.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CORRUPT_EVERY_BYTES = 262_144
TRUNCATE_AFTER_BYTES = 300_000
SLOW_BYTES_PER_S = 50_000
_SLOW_PIECE = 8192


class TcpProxy:
    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self._mode = "pass"
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.damaged = 0
        self.connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.listen_port}"

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        assert mode in ("pass", "corrupt", "truncate", "hold", "slow"), mode
        self._mode = mode
        if mode == "hold":
            self._flowing.clear()
        else:
            self._flowing.set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._client, "127.0.0.1", self.listen_port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, towards_target=True),
                self._pipe(up_reader, writer, towards_target=False),
                return_exceptions=True,
            )
        finally:
            self._tasks.discard(task)

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, towards_target: bool
    ) -> None:
        seen = 0
        try:
            while data := await reader.read(65536):
                if towards_target:
                    await self._flowing.wait()
                    if self._mode == "corrupt":
                        buf = bytearray(data)
                        for pos in range(len(buf)):
                            if (seen + pos) % CORRUPT_EVERY_BYTES == CORRUPT_EVERY_BYTES // 2:
                                buf[pos] ^= 0x5A
                                self.damaged += 1
                        data = bytes(buf)
                    elif self._mode == "truncate" and seen + len(data) > TRUNCATE_AFTER_BYTES:
                        writer.write(data[: max(0, TRUNCATE_AFTER_BYTES - seen)])
                        self.damaged += 1
                        break
                    elif self._mode == "slow":
                        for i in range(0, len(data), _SLOW_PIECE):
                            piece = data[i : i + _SLOW_PIECE]
                            writer.write(piece)
                            await writer.drain()
                            await asyncio.sleep(len(piece) / SLOW_BYTES_PER_S)
                        seen += len(data)
                        continue
                seen += len(data)
                writer.write(data)
                await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                writer.close()


class ProxyThread:
    """Proxies served by an event loop on a thread of their own, for fixtures that outlive a
    test's event loop. Modes are set from any thread."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxies", daemon=True)
        self._thread.start()
        self._proxies: list[TcpProxy] = []

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def add(self, listen_port: int, target_port: int) -> TcpProxy:
        async def start() -> TcpProxy:
            proxy = TcpProxy(listen_port, target_port)
            await proxy.start()
            return proxy

        proxy = self._call(start())
        self._proxies.append(proxy)
        return proxy

    def set_mode(self, mode: str, proxies: list[TcpProxy] | None = None) -> None:
        async def apply() -> None:
            for proxy in self._proxies if proxies is None else proxies:
                proxy.mode = mode

        self._call(apply())

    def close(self) -> None:
        async def stop() -> None:
            for proxy in self._proxies:
                await proxy.close()

        self._call(stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
