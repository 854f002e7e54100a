"""Hostile HTTP clients, replayed against a real cluster while legitimate clients keep being served.

- JSON nested 1,000 deep (even in a field nobody reads): a 400 in OpenAI's shape, not a 500.
- 500 connections that never finish their headers, from one address: at most its share is held,
  and only for the header timeout; the rest are answered at once. Everyone else is served.
- A body that never finishes arriving: 408 after the body timeout.
- A kept-alive connection: idle past the header timeout it still serves (a proxy's pooled
  connection is not closed under it), until the idle timeout; a head that stalls on it is cut at
  the header timeout all the same.
- Malformed control frames from a worker: counted, logged at most once per interval.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import aiohttp
import pytest
import zmq

from pdorch.launcher import LocalCluster
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import MODEL, complete, metric
from tests.support.security import party
from transport import sockets
from transport.security import KeyKind, Plane

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT_S = 2.0
IDLE_TIMEOUT_S = 8.0
PER_CLIENT = 64
ATTACKER = "127.0.0.2"  # loopback too, but another address than the legitimate clients'


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    tmp = tmp_path_factory.mktemp("guarded")
    config = tmp / "scheduler.yaml"
    config.write_text(
        f"http: {{header_timeout_s: {HEADER_TIMEOUT_S}, idle_timeout_s: {IDLE_TIMEOUT_S}, body_timeout_s: 2, "
        f"max_connections_per_client: {PER_CLIENT}}}\n"
    )
    cluster = start_cluster(tmp / "logs", kv_mode="p2p", scheduler_args=["--config", str(config)])
    yield cluster
    cluster.stop()


async def _legitimate(cluster: LocalCluster, count: int) -> list[dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        return await asyncio.gather(
            *(
                complete(s, cluster.url, prompt=f"hello {i}", max_tokens=6, temperature=0)
                for i in range(count)
            )
        )


@pytest.mark.parametrize("where", ["an unknown field", "logprobs"])
async def test_json_nested_a_thousand_deep_is_a_400(guarded: LocalCluster, where: str) -> None:
    field = "x_unknown" if where == "an unknown field" else "logprobs"
    deep = "[" * 1000 + "]" * 1000
    body = f'{{"model": "{MODEL}", "prompt": "hi", "{field}": {deep}}}'.encode()
    before = await _errors(guarded, "invalid_request")
    async with (
        aiohttp.ClientSession() as s,
        s.post(guarded.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}) as r,
    ):
        data = await r.json()
    assert r.status == 400, data
    assert data["error"]["type"] == "invalid_request_error" and "deeper than 32" in data["error"]["message"]
    assert await _errors(guarded, "invalid_request") == before + 1
    assert len(await _legitimate(guarded, 2)) == 2


async def _errors(cluster: LocalCluster, code: str) -> float:
    async with aiohttp.ClientSession() as s:
        return await metric(s, cluster.url, "pdorch_http_errors_total", code=code)


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_connections_that_never_finish_their_headers(guarded: LocalCluster) -> None:
    """500 connections from one address that never finish their headers: its share is held (until
    the header timeout, then closed by the server), the rest refused at once; everyone else is
    served meanwhile."""
    port = int(guarded.url.rsplit(":", 1)[1])
    scheduler = guarded.procs["scheduler"].pid
    baseline = _open_fds(scheduler)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(500):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(ATTACKER, 0))
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: pdorch\r\nContent-Type: application/json\r\n")
        held.append((reader, writer))

    async def outcome(reader: asyncio.StreamReader) -> bytes:
        """What the server did: answered (refused), reset, or closed without a word (b"")."""
        try:
            return await asyncio.wait_for(reader.read(), HEADER_TIMEOUT_S + 60)
        except ConnectionResetError:
            return b"reset"  # refused while many refusals were already waiting to be read

    # Everyone else is served while the attacker's connections are open.
    outcomes, results = await asyncio.gather(
        asyncio.gather(*(outcome(reader) for reader, _ in held)), _legitimate(guarded, 12)
    )
    assert all(r["choices"][0]["token_ids"] for r in results)
    refused = [a for a in outcomes if a.startswith(b"HTTP/1.1 429")]
    assert refused and all(b'"code":"too_many_connections"' in a for a in refused)
    assert len(refused) + outcomes.count(b"reset") == 500 - PER_CLIENT
    # Its share was held, and closed by the server at the header timeout (not kept).
    assert outcomes.count(b"") == PER_CLIENT
    for _, writer in held:
        writer.close()
    deadline = time.monotonic() + 30
    while _open_fds(scheduler) > baseline + 4:
        assert time.monotonic() < deadline, "the scheduler kept the attacker's descriptors"
        await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as s:
        count = await metric(s, guarded.url, "pdorch_http_connections_refused_total", limit="per_client")
    assert count >= 500 - PER_CLIENT


async def test_a_body_that_never_arrives_is_a_408(guarded: LocalCluster) -> None:
    port = int(guarded.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: pdorch\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n" + b'{"model": "pdorch-reference",'
    )
    answer = await asyncio.wait_for(reader.read(4096), 15)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b'"timeout_error"' in answer and b"request_timeout" in answer


_HEALTH = b"GET /health HTTP/1.1\r\nHost: pdorch\r\n\r\n"


async def _answer(reader: asyncio.StreamReader) -> bytes:
    """One whole answer (status line, headers and body) off a kept-alive connection."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return head + await asyncio.wait_for(reader.readexactly(length), 15)


async def _kept_alive(cluster: LocalCluster) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that served a request, sat idle past the header timeout (as a proxy's pooled
    connection does; past the timer of its first head too) and served another."""
    port = int(cluster.url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(_HEALTH)
    assert (await _answer(reader)).startswith(b"HTTP/1.1 200")
    await asyncio.sleep(HEADER_TIMEOUT_S * 2)
    writer.write(_HEALTH)
    assert (await _answer(reader)).startswith(b"HTTP/1.1 200")
    return reader, writer


async def test_a_kept_alive_connection_outlives_the_header_timeout_until_the_idle_timeout(
    guarded: LocalCluster,
) -> None:
    reader, writer = await _kept_alive(guarded)
    idle_since = time.monotonic()
    assert await asyncio.wait_for(reader.read(), IDLE_TIMEOUT_S + 30) == b""  # closed by the server
    assert time.monotonic() - idle_since > IDLE_TIMEOUT_S - 1
    writer.close()


async def test_a_head_that_stalls_on_a_kept_alive_connection_is_cut_at_the_header_timeout(
    guarded: LocalCluster,
) -> None:
    reader, writer = await _kept_alive(guarded)  # its idle timer starts again at the second answer
    began = time.monotonic()
    writer.write(b"GET /health HTTP/1.1\r\nHost: pd")
    assert await asyncio.wait_for(reader.read(), IDLE_TIMEOUT_S + 30) == b""
    assert time.monotonic() - began < IDLE_TIMEOUT_S - 2  # the header timeout, not the idle one
    writer.close()


async def test_malformed_control_frames_are_counted_not_logged_one_by_one(guarded: LocalCluster) -> None:
    """Even from a worker holding a trusted key (garbage from others never gets past the handshake)."""
    keys = party(guarded, "garbler")
    sock = sockets.dealer(
        zmq.Context.instance(),
        guarded.control,
        auth=keys.client(Plane.CONTROL, keys.server_key(KeyKind.SCHEDULER)),
    )
    frames = 2000
    try:
        for i in range(frames):
            sock.send_multipart([b"\x93\xa5junk" + i.to_bytes(4, "big")])
        async with aiohttp.ClientSession() as s:
            deadline = time.monotonic() + 20
            while await metric(s, guarded.url, "pdorch_control_bad_messages") < frames:
                assert time.monotonic() < deadline, "the malformed frames were not all counted"
                await asyncio.sleep(0.1)
    finally:
        sock.close(linger=0)
    log = (guarded.log_dir / "scheduler.log").read_text()
    assert log.count("dropping a malformed control message") <= 3
    assert len(await _legitimate(guarded, 2)) == 2
