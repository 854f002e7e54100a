"""A TCP proxy for the KV path that can flip bytes in bulk data, to prove damage is detected."""

from __future__ import annotations

import asyncio
import contextlib

# Chunks at least this big are KV payload (block rows), not protocol headers.
BULK_CHUNK_BYTES = 4096


class DamagingProxy:
    """Forwards TCP both ways between ``listen_port`` and ``target_port``. With ``corrupt`` set, the
    middle byte of every bulk chunk flowing towards the target is flipped."""

    def __init__(self, listen_port: int, target_port: int) -> None:
        self.listen_port = listen_port
        self.target_port = target_port
        self.corrupt = False
        self.flipped = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.listen_port}"

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
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(self._pipe(reader, up_writer, True), self._pipe(up_reader, writer, False))
        finally:
            self._tasks.discard(task)
            for w in (writer, up_writer):
                w.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, towards_target: bool
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while data := await reader.read(1 << 20):
                if towards_target and self.corrupt and len(data) >= BULK_CHUNK_BYTES:
                    buf = bytearray(data)
                    buf[len(buf) // 2] ^= 0x5A
                    data = bytes(buf)
                    self.flipped += 1
                writer.write(data)
                await writer.drain()
        writer.close()
