"""A decode worker cut off from the network mid-stream is as dead as a killed one.

The worker runs in a network namespace of its own, joined to the host by a veth pair the test
makes; the test takes the link down while the worker streams tokens. No connection is closed (no
RST, no FIN): the scheduler notices only that the worker went silent, drops it after its heartbeat
liveness, and the requests move on to the other decode worker. Every client gets the colocated
output, token for token. Needs root and iproute2; skipped, saying so, where those are missing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from pdorch.launcher import LocalCluster
from tests.e2e.helpers import eventually, generate, metric
from tests.e2e.test_migration import _bodies
from tests.support.netns import Namespace, make_namespace, namespaced_cluster

pytestmark = pytest.mark.e2e


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    yield from make_namespace()


@pytest.fixture
def cluster(tmp_path: Path, namespace: Namespace) -> Iterator[LocalCluster]:
    yield from namespaced_cluster(tmp_path, namespace, decode=1)


async def test_a_decode_worker_cut_off_mid_stream(
    cluster: LocalCluster, colocated: LocalCluster, namespace: Namespace
) -> None:
    bodies = [{**b, "stream": True} for b in _bodies(seed=7, count=6, prompt_len=30, max_tokens=400)]
    timeout = aiohttp.ClientTimeout(total=180)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        want = await asyncio.gather(*(generate(s, colocated.url, b) for b in bodies))
        seen: list[list[int]] = [[] for _ in bodies]
        running = asyncio.gather(*(generate(s, cluster.url, b, seen[i]) for i, b in enumerate(bodies)))

        def cut_worker_streaming() -> bool:
            workers = {w["worker_id"]: w for w in cluster.cluster_state()["workers"]}
            busy = workers.get("decode-cut", {}).get("inflight_requests", 0) >= 1
            return busy and all(len(t) >= 5 for t in seen)

        await eventually(cut_worker_streaming, 60, "the namespaced worker streaming")
        namespace.cut(down=True)
        assert await running == want
        assert "decode-cut" not in {w["worker_id"] for w in cluster.cluster_state()["workers"]}
        assert await metric(s, cluster.url, "pdorch_migrations_total", phase="decode", cause="lost") >= 1
