"""A corrupted or truncated KV transfer between real worker processes is detected, never decoded.

A byte-level TCP proxy sits between the prefill worker and the decode worker's KV endpoint (the
decode worker advertises the proxy's address). It flips bytes or cuts connections in the KV
stream; the client must get an error, not tokens decoded from damaged KV. On an encrypted KV
plane CURVE authenticates every message, so a changed byte breaks the connection before any
checksum sees it; with ``kv_payload: plaintext`` the chunk checksums catch it. With the default
placement the scheduler then runs the request whole on the prefill worker, and the client gets the
tokens of undamaged KV.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from pdorch.launcher import LocalCluster, free_port
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import MODEL, complete, metric
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.e2e


@pytest.fixture
def kv_payload() -> str:
    return "encrypted"


@pytest.fixture
def prefill_nodes_decode() -> bool:
    """The default placement: a prefill node may run a request whole (where a failed one recovers)."""
    return True


@pytest.fixture
def proxied_cluster(
    tmp_path, monkeypatch, kv_payload: str, prefill_nodes_decode: bool
) -> Iterator[tuple[LocalCluster, int, int]]:
    kv_port, proxy_port = free_port(), free_port()
    # A cut connection loses the transfer's first message; the scheduler's handoff deadline
    # (counted from prefill's answer) is what notices. Keep it short for the test.
    monkeypatch.setenv("PDORCH_KV_HANDOFF_TIMEOUT_S", "3")
    config = tmp_path / "scheduler.yaml"
    # No other way for a request: neither the prefill node nor the decode node runs one whole (a
    # handoff that failed backs its pair off, and the decode node would prefill the retry itself).
    config.write_text(
        "placement: {fallback_to_prefill_node: false, handler: {type: slo, params: {colocate: false}}}\n"
    )
    cluster = start_cluster(
        tmp_path,
        kv_mode="p2p",
        per_worker_args={
            "decode-0": [
                "--kv-bind",
                f"tcp://127.0.0.1:{kv_port}",
                "--kv-advertise",
                f"tcp://127.0.0.1:{proxy_port}",
            ]
        },
        scheduler_args=[] if prefill_nodes_decode else ["--config", str(config)],
        kv_payload=kv_payload,
        # The proxy damages the TCP stream: keep the KV on it although both workers share this host.
        worker_args=["--kv-same-host", "off"],
    )
    yield cluster, kv_port, proxy_port
    cluster.stop()


@pytest.fixture
async def proxy(proxied_cluster) -> AsyncIterator[TcpProxy]:
    _, kv_port, proxy_port = proxied_cluster
    p = TcpProxy(proxy_port, kv_port)
    await p.start()
    yield p
    await p.close()


async def _attempt(url: str, prompt: list[int]) -> tuple[int, dict]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
        async with s.post(url + "/v1/completions", json=body) as r:
            return r.status, await r.json()


@pytest.mark.parametrize("prefill_nodes_decode", [False])  # no other node: the client sees the error
@pytest.mark.parametrize(
    "mode, kv_payload, codes",
    [
        ("corrupt", "plaintext", {"kv_corrupt"}),
        # The message fails CURVE's authentication: the connection drops, the handoff never lands.
        ("corrupt", "encrypted", {"kv_timeout", "kv_truncated"}),
        ("truncate", "encrypted", {"kv_truncated", "kv_timeout"}),
    ],
)
async def test_damaged_kv_is_detected(proxied_cluster, proxy: TcpProxy, mode: str, codes: set[str]) -> None:
    cluster, _, _ = proxied_cluster
    prompt = [(i * 7) % 256 for i in range(400)]  # 400 tokens: ~1.6 MB of KV, several damaged spots
    status, good = await _attempt(cluster.url, prompt)
    assert status == 200, good  # the proxy itself is transparent
    proxy.mode = mode
    status, body = await _attempt(cluster.url, prompt)
    assert proxy.damaged >= 1
    assert status != 200, f"damaged KV was decoded: {body}"
    assert body["error"]["code"] in codes, body
    # Nothing leaked: the decode worker holds no blocks for the failed request and still serves.
    proxy.mode = "pass"
    status, again = await _attempt(cluster.url, prompt)
    assert status == 200 and again["choices"][0]["token_ids"] == good["choices"][0]["token_ids"]
    async with aiohttp.ClientSession() as s:
        assert (await complete(s, cluster.url, prompt="fine", max_tokens=3))["choices"][0]["token_ids"]


@pytest.mark.parametrize("kv_payload", ["plaintext"])
async def test_damaged_kv_is_recomputed_on_the_prefill_worker(proxied_cluster, proxy: TcpProxy) -> None:
    cluster, _, _ = proxied_cluster
    prompt = [(i * 3) % 256 for i in range(400)]
    status, good = await _attempt(cluster.url, prompt)
    assert status == 200, good
    proxy.mode = "corrupt"
    status, body = await _attempt(cluster.url, prompt)
    assert proxy.damaged >= 1
    async with aiohttp.ClientSession() as s:
        assert await metric(s, cluster.url, "pdorch_kv_handoffs_total", outcome="kv_corrupt") >= 1
        assert await metric(s, cluster.url, "pdorch_migrations_total", cause="error") >= 1
    assert status == 200, body
    assert body["choices"][0]["token_ids"] == good["choices"][0]["token_ids"]
