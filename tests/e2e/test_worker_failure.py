"""Killing a worker process mid-request: its clients get an error promptly, the cluster drops the
worker, and new requests succeed on the remaining workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import pytest

from pdorch.launcher import LocalCluster
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import complete, eventually, stream_tokens

pytestmark = pytest.mark.e2e

# Heartbeat expiry is 0.5 s x 4 by default; an error must reach the client well within this.
PROMPT_ERROR_BOUND_S = 20.0


@pytest.fixture
def two_by_two(tmp_path) -> Iterator[LocalCluster]:
    cluster = start_cluster(tmp_path, prefill=2, decode=2, kv_mode="p2p")
    yield cluster
    cluster.stop()


async def _outcome(coro) -> str:
    try:
        await coro
        return "ok"
    except AssertionError as e:
        return f"error: {e}"


async def test_kill_decode_worker_mid_request(two_by_two: LocalCluster) -> None:
    cluster = two_by_two
    long = {"prompt": "a long story", "max_tokens": 3000, "ignore_eos": True, "temperature": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        tasks = [asyncio.create_task(_outcome(stream_tokens(s, cluster.url, **long))) for _ in range(6)]

        def busy_decoders() -> list[dict]:
            return [
                w
                for w in cluster.cluster_state()["workers"]
                if w["role"] == "decode" and w["inflight_requests"]
            ]

        await eventually(lambda: len(busy_decoders()) >= 1 and all(not t.done() for t in tasks))
        victim = busy_decoders()[0]
        killed_at = time.monotonic()
        cluster.kill(victim["worker_id"])
        done, pending = await asyncio.wait(tasks, timeout=PROMPT_ERROR_BOUND_S)
        errors = [t.result() for t in done if t.result() != "ok"]
        # Its clients got an error (not a hang), well before the long generations could finish.
        assert len(errors) >= victim["inflight_requests"] >= 1, errors
        assert all("worker" in e for e in errors), errors
        assert time.monotonic() - killed_at < PROMPT_ERROR_BOUND_S
        for t in pending:
            assert (await t) == "ok"  # the others run to completion on the surviving decode worker
        await eventually(
            lambda: victim["worker_id"] not in {w["worker_id"] for w in cluster.cluster_state()["workers"]}
        )
        for i in range(4):
            r = await complete(s, cluster.url, prompt=f"after the crash {i}", max_tokens=6)
            assert r["choices"][0]["token_ids"]


async def test_kill_prefill_worker_mid_request(two_by_two: LocalCluster) -> None:
    cluster = two_by_two
    # Long prompts queue up on the prefill workers, so a kill catches requests mid-prefill.
    bodies = [{"prompt": [i % 250] * 1500, "max_tokens": 4, "temperature": 0} for i in range(24)]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        tasks = [asyncio.create_task(_outcome(complete(s, cluster.url, **b))) for b in bodies]

        def busy_prefill() -> list[dict]:
            return [
                w
                for w in cluster.cluster_state()["workers"]
                if w["role"] == "prefill" and w["inflight_requests"] >= 2
            ]

        await eventually(lambda: len(busy_prefill()) >= 1)
        victim = busy_prefill()[0]["worker_id"]
        cluster.kill(victim)
        done, pending = await asyncio.wait(tasks, timeout=PROMPT_ERROR_BOUND_S * 3)
        assert not pending, "some requests hung after the prefill worker died"
        outcomes = [t.result() for t in done]
        assert any(o != "ok" for o in outcomes), "no request was caught on the killed prefill worker"
        assert all(o == "ok" or "worker" in o for o in outcomes), outcomes
        await eventually(lambda: victim not in {w["worker_id"] for w in cluster.cluster_state()["workers"]})
        for i in range(4):
            r = await complete(s, cluster.url, prompt=f"after the prefill crash {i}", max_tokens=6)
            assert r["choices"][0]["token_ids"]
