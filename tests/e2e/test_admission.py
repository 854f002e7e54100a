"""Admission through a real scheduler: requests wait for room, and a full queue answers 429."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest

from pdorch.launcher import LocalCluster
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import MODEL, complete, eventually

pytestmark = pytest.mark.e2e


def _cluster(tmp_path, monkeypatch, env: dict[str, str], **spec: object) -> Iterator[LocalCluster]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    c = start_cluster(tmp_path, **spec)
    yield c
    c.stop()


@pytest.fixture
def tight(tmp_path, monkeypatch) -> Iterator[LocalCluster]:
    # One request in flight, one waiting; anything more is refused at once.
    yield from _cluster(tmp_path, monkeypatch, {"PDORCH_ADMISSION": "{max_inflight: 1, max_queued: 1}"})


async def test_queue_full_is_429_and_waiters_are_served(tight: LocalCluster) -> None:
    long = {"prompt": "hold the slot", "max_tokens": 400, "ignore_eos": True, "temperature": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        first = asyncio.create_task(complete(s, tight.url, **long))
        await eventually(lambda: tight.cluster_state()["admission"]["running"] == 1, 20)
        second = asyncio.create_task(complete(s, tight.url, **{**long, "max_tokens": 5}))
        await eventually(lambda: tight.cluster_state()["admission"]["queued"] == 1, 20)
        async with s.post(tight.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}) as r:
            body = await r.json()
            assert r.status == 429, body
            assert body["error"]["code"] == "queue_full"
            assert int(r.headers["Retry-After"]) >= 1
        # The waiting request was not lost: it runs once the first one finishes.
        a, b = await asyncio.gather(first, second)
    assert len(a["choices"][0]["token_ids"]) == 400
    assert len(b["choices"][0]["token_ids"]) == 5


@pytest.fixture
def three_sequences(tmp_path, monkeypatch) -> Iterator[LocalCluster]:
    yield from _cluster(tmp_path, monkeypatch, {"PDORCH_ADMISSION": "{max_inflight: 3, max_queued: 1}"})


async def test_a_requests_choices_count_as_its_sequences(three_sequences: LocalCluster) -> None:
    """``n`` 3 fills ``max_inflight`` 3: a request of one choice behind it waits, the next is refused."""
    c = three_sequences
    long = {"prompt": "three at once", "max_tokens": 300, "ignore_eos": True, "temperature": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        first = asyncio.create_task(complete(s, c.url, **long, n=3))
        await eventually(lambda: c.cluster_state()["admission"]["running"] == 3, 20)
        second = asyncio.create_task(complete(s, c.url, **{**long, "max_tokens": 5}))
        await eventually(lambda: c.cluster_state()["admission"]["queued"] == 1, 20)
        async with s.post(c.url + "/v1/completions", json={"model": MODEL, "prompt": "x"}) as r:
            assert r.status == 429, await r.text()
        a, b = await asyncio.gather(first, second)
    assert [len(choice["token_ids"]) for choice in a["choices"]] == [300, 300, 300]
    assert len(b["choices"][0]["token_ids"]) == 5
    assert c.cluster_state()["admission"]["running"] == 0


@pytest.fixture
def small_kv(tmp_path, monkeypatch) -> Iterator[LocalCluster]:
    yield from _cluster(
        tmp_path, monkeypatch, {"PDORCH_QUEUE_TIMEOUT_S": "5"}, worker_args=["--num-blocks", "64"]
    )


async def test_more_choices_than_a_node_holds_at_once_are_served(small_kv: LocalCluster) -> None:
    """16 choices of 100 tokens need ~110 blocks of 16 beside the prompt's on a node of 64: the
    request takes the empty node and its engine runs the choices as blocks free (not a 429)."""
    body = {"prompt": "many at once", "max_tokens": 100, "ignore_eos": True, "temperature": 1.0, "seed": 3}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        out = await complete(s, small_kv.url, **body, n=16)
    assert sorted(c["index"] for c in out["choices"]) == list(range(16))
    assert all(len(c["token_ids"]) == 100 for c in out["choices"])
