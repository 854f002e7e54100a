"""Bad input gets a clear error and loses nothing: HTTP bodies and garbage ZeroMQ frames."""

from __future__ import annotations

import gzip
import json

import aiohttp
import pytest
import zmq

from tests.e2e.helpers import MODEL, complete

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (b"{not json", 400, "not valid JSON"),
        (b"", 400, "empty"),
        (b'{"model": "pdorch-reference", "prompt": 42}', 400, "prompt"),
        (b'{"model": "pdorch-reference", "prompt": "x", "max_tokens": "many"}', 400, "max_tokens"),
        (b'{"model": "pdorch-reference", "prompt": "x", "max_tokens": -3}', 400, "max_tokens"),
        (b'{"model": "pdorch-reference", "prompt": "x", "max_tokens": 100000000}', 400, "max_tokens"),
        (b'{"model": "pdorch-reference", "prompt": ""}', 400, "empty"),
        (b'{"model": "pdorch-reference", "prompt": [1, 999999]}', 400, "vocab"),
        (b'{"model": "pdorch-reference", "prompt": [1, -5]}', 400, "token id -5"),
        (b'{"model": "pdorch-reference", "prompt": [1, 1099511627776]}', 400, "token id 1099511627776"),
        (b'{"model": "pdorch-reference", "prompt": [1, 123456789012345678901234567890]}', 400, "[0, 2**31)"),
        (b'{"model": "gpt-17", "prompt": "x"}', 404, "gpt-17"),
        (b'{"model": "' + b"g" * 100_000 + b'", "prompt": "x"}', 404, "g" * 256 + "...' does not exist"),
        (b'{"model": "pdorch-reference", "prompt": "x", "temperature": -1}', 400, "temperature"),
    ],
)
async def test_bad_completion_bodies(p2p, body: bytes, status: int, needle: str) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(p2p.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}) as r,
    ):
        data = await r.json()
    assert r.status == status, data
    assert needle in data["error"]["message"]
    assert set(data["error"]) >= {"message", "type", "code"}


async def test_huge_prompt_is_refused(p2p) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(p2p.url + "/v1/completions", json={"model": MODEL, "prompt": "a" * 5000}) as r:
            data = await r.json()
        assert r.status == 400 and data["error"]["code"] == "prompt_too_long"
        async with s.post(p2p.url + "/v1/completions", data=b"x" * (9 * 1024 * 1024)) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "request_too_large"
        # Still serving.
        ok = await complete(s, p2p.url, prompt="after", max_tokens=3)
    assert len(ok["choices"][0]["token_ids"]) >= 1


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_cannot_be_decoded_is_a_400_and_its_connection_goes_on(p2p, encoding: str) -> None:
    """The body is read whole as sent and decoded after, so a broken coding leaves the connection
    where the next request starts (a proxy's pooled connection may carry someone else's)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        async with s.post(
            p2p.url + "/v1/completions",
            data=b'{"model": "pdorch-reference", "prompt": "x"}',
            headers={"Content-Type": "application/json", "Content-Encoding": encoding},
        ) as r:
            data = await r.json()
            assert r.status == 400 and f"not valid {encoding} data" in data["error"]["message"]
        for i in range(3):  # over the one connection the pool allows
            ok = await complete(s, p2p.url, prompt=f"after {i}", max_tokens=2)
            assert ok["choices"][0]["token_ids"]


async def test_compressed_bodies(p2p) -> None:
    """gzip is read; a coding that is not is a 415 in OpenAI's shape naming the ones that are; a
    small body that would inflate past the limit is a 413, found without inflating it."""
    body = json.dumps({"model": MODEL, "prompt": "zipped", "max_tokens": 2}).encode()
    url = p2p.url + "/v1/completions"
    json_type = {"Content-Type": "application/json"}
    gzipped = {**json_type, "Content-Encoding": "gzip"}
    async with aiohttp.ClientSession() as s:
        async with s.post(url, data=gzip.compress(body), headers=gzipped) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["choices"][0]["text"] is not None
        for coding in ("br", "zstd"):
            async with s.post(url, data=body, headers={**json_type, "Content-Encoding": coding}) as r:
                error = (await r.json())["error"]
                assert r.status == 415 and error["code"] == "unsupported_encoding", error
                assert "gzip, deflate or identity" in error["message"]
        bomb = gzip.compress(body[:-1] + b', "pad": "' + b"a" * (64 << 20) + b'"}', compresslevel=9)
        async with s.post(url, data=bomb, headers=gzipped) as r:
            assert r.status == 413 and (await r.json())["error"]["code"] == "request_too_large"
        ok = await complete(s, p2p.url, prompt="after", max_tokens=2)
    assert ok["choices"][0]["token_ids"]


async def test_bad_chat_bodies(p2p) -> None:
    async with aiohttp.ClientSession() as s:
        for body in (
            {"model": MODEL, "messages": []},
            {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
            {"model": MODEL},
        ):
            async with s.post(p2p.url + "/v1/chat/completions", json=body) as r:
                assert r.status == 400, await r.text()


def _garbage(endpoint: str) -> None:
    ctx = zmq.Context.instance()
    for frames in ([b"\x00\xff garbage"], [b""], [b"a", b"b", b"c" * 10000], [b"\x93\xa5hello\x01\x02"]):
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 500)
        sock.connect(endpoint)
        sock.send_multipart(frames)
        sock.close()
    raw = ctx.socket(zmq.STREAM)  # not even ZMTP: raw bytes on the TCP port
    raw.setsockopt(zmq.LINGER, 500)
    raw.connect(endpoint)
    raw.close()


async def test_garbage_zmq_frames_to_scheduler_and_agent(p2p) -> None:
    _garbage(p2p.control)
    state = p2p.cluster_state()
    decode = next(w for w in state["workers"] if w["role"] == "decode")
    _garbage(decode["kv_endpoint"])
    async with aiohttp.ClientSession() as s:
        for i in range(3):
            r = await complete(s, p2p.url, prompt=f"still alive {i}", max_tokens=5)
            assert r["choices"][0]["token_ids"]
    assert all(p.poll() is None for p in p2p.procs.values())
    assert len(p2p.cluster_state()["workers"]) == 2
    async with aiohttp.ClientSession() as s, s.get(p2p.url + "/metrics") as r:
        text = await r.text()
    assert "pdorch_control_bad_messages" in text
