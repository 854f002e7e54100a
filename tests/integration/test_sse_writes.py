"""A streamed response goes out in as few writes as its tokens allow: each write is a send on the
client's socket, the dearest step of a short stream. The scheduler runs in this process, so its
writes can be counted; the prefill and decode agents are real processes on the zero-cost
simulated engine, whose first token comes from the prefill worker and the rest, with the finish,
in one message from the decode worker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_writer import StreamWriter
from aiohttp.web_protocol import RequestHandler

from pdorch.launcher import free_port
from scheduler.app import build_app
from scheduler.app_keys import CLUSTER
from scheduler.config import SchedulerConfig
from tests.e2e.helpers import eventually
from transport.security import SecurityConfig

MODEL = "zero"


@pytest.fixture
async def scheduler() -> AsyncIterator[tuple[str, str, web.Application]]:
    control = f"tcp://127.0.0.1:{free_port()}"
    app = build_app(SchedulerConfig(control_bind=control, security=SecurityConfig(insecure=True)))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", control, app
    finally:
        await asyncio.wait_for(runner.cleanup(), 10)


@pytest.fixture
def agents(scheduler: tuple[str, str, web.Application]) -> Iterator[None]:
    _, control, _ = scheduler
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pdorch",
                "worker",
                "--scheduler",
                control,
                "--role",
                role,
                "--worker-id",
                f"{role}-0",
                "--engine",
                "sim",
                "--sim-time-scale",
                "0",
                "--model",
                MODEL,
                "--insecure",
                "--log-level",
                "WARNING",
            ],
            env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
        )
        for role in ("prefill", "decode")
    ]
    try:
        yield
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(10)


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every write of the server's responses (not the client's requests), as it reaches the socket."""
    sent: list[bytes] = []
    write, writelines = StreamWriter._write, StreamWriter._writelines

    def _write(self: StreamWriter, chunk: Any) -> None:
        if isinstance(self.protocol, RequestHandler):
            sent.append(bytes(chunk))
        write(self, chunk)

    def _writelines(self: StreamWriter, chunks: Any) -> None:
        chunks = list(chunks)
        if isinstance(self.protocol, RequestHandler):
            sent.append(b"".join(bytes(c) for c in chunks))
        writelines(self, chunks)

    monkeypatch.setattr(StreamWriter, "_write", _write)
    monkeypatch.setattr(StreamWriter, "_writelines", _writelines)
    return sent


@pytest.mark.usefixtures("agents")
@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
async def test_a_stream_is_two_writes_its_first_token_and_the_rest_with_its_end(
    scheduler: tuple[str, str, web.Application], writes: list[bytes], chat: bool
) -> None:
    url, _, app = scheduler
    await eventually(lambda: len(app[CLUSTER].workers()) == 2, what="both agents registered")
    path, body = (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]})
        if chat
        else ("/v1/completions", {"prompt": "Hello"})
    )
    # Seeded: the first token's text is then known to be whole (a random one can be a byte of a
    # longer UTF-8 sequence, whose text is held back, so the head goes without it).
    body |= {"model": MODEL, "max_tokens": 16, "stream": True, "ignore_eos": True, "seed": 7}
    async with aiohttp.ClientSession() as session:
        for _ in range(3):  # the first requests also teach placement; any request must do this
            writes.clear()
            async with session.post(url + path, json=body) as resp:
                assert resp.status == 200
                events = [line async for line in resp.content if line.startswith(b"data: ")]
            # The head with the first token (and, for chat, the role); the other 15 tokens, the
            # finish chunk, [DONE] and the end of the body in one more (or all in one, if the
            # first token was late enough to come with the rest).
            assert 1 <= len(writes) <= 2
            head, last = writes[0], writes[-1]
            assert head.startswith(b"HTTP/1.1 200") and head.count(b"data: ") >= (2 if chat else 1)
            assert b'"finish_reason":"length"' in last
            assert last.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
            assert len(events) == (5 if chat else 4)
