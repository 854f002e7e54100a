"""A client that stops reading its stream: the scheduler aborts its connection once it has read
nothing for ``http.write_stall_timeout_s`` with the connection's buffers full, and the request
ends as if the client had hung up (its choices stop, its admission slot and KV bookings are given
back), while others are served. On simulated workers at real speed, whose tokens come a decode
step at a time, as a real engine's do."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Iterator

import aiohttp
import pytest

from pdorch.launcher import LocalCluster
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import MODEL, complete, metric

pytestmark = pytest.mark.e2e

SIM_ARGS = ["--engine", "sim", "--sim-accelerator", "h100", "--sim-tp", "2"]
STALL_S = 1.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("stalled")
    config = tmp / "scheduler.yaml"
    config.write_text(f"http: {{write_stall_timeout_s: {STALL_S}}}\n")
    cluster = start_cluster(tmp / "logs", worker_args=SIM_ARGS, scheduler_args=["--config", str(config)])
    yield cluster
    cluster.stop()


async def test_a_stream_whose_client_stops_reading_is_cut_and_its_request_ends(cluster: LocalCluster) -> None:
    host, port = cluster.url.rsplit("//", 1)[1].split(":")
    # 16 choices of 2,000 tokens, an event per choice per step: ~200 KB/s for ~30 s, far more than
    # the connection's buffers hold for a client that reads nothing.
    body = json.dumps(
        {"model": MODEL, "prompt": "hello", "n": 16, "max_tokens": 2000, "stream": True, "ignore_eos": True}
    ).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: pdorch\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    try:
        async with aiohttp.ClientSession() as s:

            async def until(name: str, ok: Callable[[float], bool], timeout_s: float) -> None:
                deadline = asyncio.get_running_loop().time() + timeout_s
                while not ok(value := await metric(s, cluster.url, name)):
                    assert asyncio.get_running_loop().time() < deadline, f"{name} = {value}"
                    await asyncio.sleep(0.1)

            await until("pdorch_requests_running", lambda v: v > 0, 30)  # the stream started
            await until("pdorch_http_stalled_connections", lambda v: v == 1, 60)
            await until("pdorch_requests_running", lambda v: v == 0, 30)  # and its request ended
            # Nothing else was held up meanwhile, nor after.
            result = await complete(s, cluster.url, prompt="still here?", max_tokens=4)
            assert result["choices"][0]["finish_reason"] is not None
    finally:
        sock.close()
