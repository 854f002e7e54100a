"""Centralized mode survives the KV broker's death: handoffs caught in it are redone peer to peer,
and the broker, restarted empty, is used again.

Real processes: 2 prefill + 2 decode workers and the broker. The broker is killed with SIGKILL
under load and started again a moment later; every client must get the output a colocated worker
produces, token for token, greedy and seeded, streaming and not.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterator

import aiohttp
import pytest

from pdorch.launcher import LocalCluster
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import eventually, gather_limited, generate, metric
from tests.e2e.test_migration import _bodies

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path, prefill=2, decode=2, kv_mode="centralized")
    yield c
    c.stop()


async def _handoffs(url: str, outcome: str) -> float:
    async with aiohttp.ClientSession() as s:
        return await metric(s, url, "pdorch_kv_handoffs_total", mode="centralized", outcome=outcome)


async def test_kv_broker_killed_under_load(cluster: LocalCluster, colocated: LocalCluster) -> None:
    bodies = _bodies(seed=5, count=24, prompt_len=200, max_tokens=40)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as s:
        want = await gather_limited([generate(s, colocated.url, b) for b in bodies], limit=6)
        running = asyncio.create_task(gather_limited([generate(s, cluster.url, b) for b in bodies], limit=6))
        await eventually(lambda: _sync_handoffs(cluster) >= 4, 60, "handoffs through the broker")
        cluster.kill("kv-broker")
        await asyncio.sleep(0.5)
        cluster.restart("kv-broker")
        assert await running == want
        # The broker, back and empty, carries handoffs again once its back-off (1 s) is over.
        before = await _handoffs(cluster.url, "ok")
        deadline = asyncio.get_running_loop().time() + 20
        for body, expected in itertools.cycle(zip(bodies, want, strict=True)):
            assert await generate(s, cluster.url, body) == expected
            if await _handoffs(cluster.url, "ok") > before:
                break
            assert asyncio.get_running_loop().time() < deadline, "the restarted broker is not used"


def _sync_handoffs(cluster: LocalCluster) -> float:
    return asyncio.run(_handoffs(cluster.url, "ok"))
