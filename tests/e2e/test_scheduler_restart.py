"""The scheduler killed under load and started again: the workers register with the new one within
a couple of heartbeat intervals, free every KV block and reservation they held for the old one's
requests, and the cluster serves again.

What clients of the dead scheduler see: their connections are cut (no HTTP status, no [DONE]); a
client retries on a new connection, as it would after any network failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest

from pdorch.launcher import LocalCluster
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import complete, eventually, gather_limited, generate
from tests.e2e.test_migration import _bodies

pytestmark = pytest.mark.e2e


@pytest.fixture(params=["p2p", "centralized"])
def cluster(request: pytest.FixtureRequest, tmp_path) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path, prefill=2, decode=2, kv_mode=request.param)
    yield c
    c.stop()


def _workers(cluster: LocalCluster) -> list[dict]:
    try:
        return cluster.cluster_state()["workers"]
    except OSError:
        return []


async def test_killed_scheduler_comes_back_and_no_worker_holds_anything(cluster: LocalCluster) -> None:
    bodies = _bodies(seed=6, count=12, prompt_len=300, max_tokens=400)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        load = asyncio.create_task(
            gather_limited([_cut_or_done(generate(s, cluster.url, b)) for b in bodies], limit=8)
        )
        await eventually(
            lambda: sum(w["load"]["blocks_used"] for w in _workers(cluster) if w["role"] == "decode") > 0,
            30,
            "decode workers holding KV",
        )
        cluster.kill("scheduler")
        cluster.restart("scheduler")
        # Every worker registers with the new scheduler (bounded by the wait, not timed: a loaded
        # machine may take longer to start the new scheduler)...
        await eventually(lambda: len(_workers(cluster)) == 4, 60, "all four workers back")
        # ...and holds nothing for the old scheduler's requests (as each reports it itself).
        await eventually(
            lambda: (
                all(
                    w["load"]["blocks_used"] == w["load"]["running"] == w["load"]["waiting"] == 0
                    for w in _workers(cluster)
                )
                and len(_workers(cluster)) == 4
            ),
            30,
            "every worker's blocks, running and waiting at zero",
        )
        for w in _workers(cluster):
            assert w["inflight_requests"] == 0 and w["load"]["blocks_reserved"] == 0, w
        outcomes = await load
        assert "cut" in outcomes  # the old scheduler's clients saw their connections end
        for i in range(4):
            r = await complete(s, cluster.url, prompt=f"after the restart {i}", max_tokens=8, ignore_eos=True)
            assert len(r["choices"][0]["token_ids"]) == 8


async def _cut_or_done(coro) -> str:
    try:
        await coro
    except (aiohttp.ClientError, AssertionError, TimeoutError):
        return "cut"
    return "done"
