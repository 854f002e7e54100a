"""Centralized mode: the KV survives a decode worker that dies before taking it.

A hand-driven decode worker registers with a large free capacity, so placement picks it; it takes
the decode job and then goes silent without ever fetching the KV. The scheduler drops it and
re-places the decode job on the real decode worker, which fetches the same transfer from the
broker. The client sees no error and the right tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import aiohttp
import pytest

from pdorch.launcher import LocalCluster
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import complete, eventually, stream_tokens
from tests.support.fake_worker import FakeWorker
from transport.messages import DecodeJob

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path) -> Iterator[LocalCluster]:
    # The default placement: among decode nodes predicted alike, the one with fewer requests.
    c = start_cluster(tmp_path, kv_mode="centralized")
    yield c
    c.stop()


async def test_decode_retried_when_decode_worker_dies_before_fetching(cluster: LocalCluster) -> None:
    body = {"prompt": "survive me", "max_tokens": 12, "temperature": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        want = await complete(s, cluster.url, **body)
        # Keep the real decode worker busy, so placement prefers the idle, roomy newcomer (on an
        # exact tie of the predictions, by the scorer configured above).
        busy = {"prompt": "keep decode-0 busy", "max_tokens": 1500, "ignore_eos": True, "temperature": 0}
        hold = asyncio.create_task(stream_tokens(s, cluster.url, **busy))
        await eventually(lambda: _inflight(cluster, "decode-0") >= 1, 20)
        flaky = FakeWorker(cluster, "flaky-decode", capacity_blocks=10**6)
        flaky.register()
        try:
            request = asyncio.create_task(complete(s, cluster.url, **body))
            job = await asyncio.to_thread(flaky.recv_until, DecodeJob)
            assert job.kv.mode == "centralized"
        finally:
            flaky.close()  # dies silently: no fetch, no heartbeats
        got = await request
        hold.cancel()
        with contextlib.suppress(BaseException):
            await hold
    assert got["choices"][0]["token_ids"] == want["choices"][0]["token_ids"]
    assert "flaky-decode" not in {w["worker_id"] for w in cluster.cluster_state()["workers"]}
    async with aiohttp.ClientSession() as s, s.get(cluster.url + "/metrics") as r:
        text = await r.text()
    assert 'pdorch_migrations_total{cause="lost",phase="prefill",recovery="new_decode"} 1.0' in text or (
        'pdorch_migrations_total{cause="lost",phase="handoff",recovery="new_decode"} 1.0' in text
    ), text


def _inflight(cluster: LocalCluster, worker_id: str) -> int:
    workers = {w["worker_id"]: w for w in cluster.cluster_state()["workers"]}
    return workers.get(worker_id, {}).get("inflight_requests", 0)
