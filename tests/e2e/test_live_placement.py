"""The live scheduler places with the placement framework: KV occupancy and the predicted output
length change which decode node a request goes to; with the default policy a prefill node runs a
whole request when no decode node has room for it.

A real scheduler process; hand-driven workers report the loads we choose and show where the
scheduler sends each decode job. Decode node "small" has 64 free blocks and is otherwise idle;
"big" has 10000 blocks, a fifth of them used. The last test runs real agents.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator

import aiohttp
import pytest

from pdorch.launcher import LocalCluster
from tests.e2e.conftest import start_cluster, start_scheduler_only
from tests.e2e.helpers import MODEL, decode_tie_break, eventually, metric, stream_tokens
from tests.support.fake_worker import FakeWorker
from transport.messages import DecodeJob, GenerateJob, Load, PrefillJob, Role

pytestmark = pytest.mark.e2e


# The default's scorers only break ties between LoRA candidates; this one breaks them by occupancy.
BY_OCCUPANCY = "placement:\n" + decode_tie_break("kv-occupancy")


@pytest.fixture
def scheduler_only(tmp_path) -> Iterator[LocalCluster]:
    c = start_scheduler_only(tmp_path, BY_OCCUPANCY)
    yield c
    c.stop()


def _first_decode_job(workers: list[FakeWorker], timeout_s: float = 10.0) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for w in workers:
            with contextlib.suppress(TimeoutError):
                if isinstance(w.recv_until(DecodeJob, timeout_s=0.05), DecodeJob):
                    return w.worker_id
    raise TimeoutError("no decode job was sent")


async def _where(
    cluster: LocalCluster, decoders: list[FakeWorker], headers: dict[str, str] | None = None
) -> str:
    body = {"model": MODEL, "prompt": "placement", "max_tokens": 2000, "temperature": 0}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
        request = asyncio.create_task(s.post(cluster.url + "/v1/completions", json=body, headers=headers))
        try:
            return await asyncio.to_thread(_first_decode_job, decoders)
        finally:
            request.cancel()
            with contextlib.suppress(BaseException):
                await request


def _idle(cluster: LocalCluster) -> bool:
    return all(w["inflight_requests"] == 0 for w in cluster.cluster_state()["workers"])


async def test_occupancy_and_predicted_length_pick_the_decode_node(scheduler_only: LocalCluster) -> None:
    cluster = scheduler_only
    prefill = FakeWorker(cluster, "prefill", role=Role.PREFILL)
    small = FakeWorker(cluster, "small", capacity_blocks=64)
    big = FakeWorker(cluster, "big", capacity_blocks=10000)
    workers = [prefill, small, big]
    try:
        for w in workers:
            w.register()
        big.report(Load(blocks_used=2000, blocks_total=10000))
        # Placed before the report lands, the two nodes would tie on occupancy (seen on a loaded host).
        await eventually(lambda: _blocks_used(cluster, "big") == 2000, 10)

        # A short predicted output (the client's hint) fits the idle small node: lowest occupancy wins.
        assert await _where(cluster, [small, big], {"X-Expected-Output-Tokens": "10"}) == "small"
        await eventually(lambda: _idle(cluster), 10)
        # Nothing learnt and no hint: the prediction is max_tokens=2000, a reservation of ~126 blocks
        # that the small node cannot hold, so the big one gets it.
        assert await _where(cluster, [small, big]) == "big"
        await eventually(lambda: _idle(cluster), 10)
        # Same short request as the first, but the small node is now nearly full.
        small.report(Load(blocks_used=60, blocks_total=64))
        await eventually(lambda: _blocks_used(cluster, "small") == 60, 10)
        assert await _where(cluster, [small, big], {"X-Expected-Output-Tokens": "10"}) == "big"
    finally:
        for w in workers:
            w.close()


async def test_a_prefill_node_is_lent_to_decode_a_prompt_another_prefilled(
    scheduler_only: LocalCluster,
) -> None:
    """No decode node, two prefill nodes: "lent" has room for the KV, "short" has none. The first
    request is lent to "lent". Then "lent" has prompts queued, so it may not take a request whole
    (its own prefill would wait behind them and delay them); but it decodes already, so it may
    decode one that "short", idle, prefills and hands over (its KV endpoint), rather than wait."""
    cluster = scheduler_only
    lent = FakeWorker(cluster, "lent", role=Role.PREFILL)
    short = FakeWorker(cluster, "short", role=Role.PREFILL, capacity_blocks=2)
    workers = [lent, short]
    body = {"model": MODEL, "prompt": "placement", "max_tokens": 64, "temperature": 0}
    try:
        for w in workers:
            w.register()
        short.report(Load(blocks_total=2))
        await eventually(lambda: _load(cluster, "short")["blocks_total"] == 2, 10)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s:
            requests = [asyncio.create_task(s.post(cluster.url + "/v1/completions", json=body))]
            try:
                # Both fakes keep answering heartbeats while they wait (a silent one is dropped).
                first, _ = await asyncio.gather(
                    asyncio.to_thread(lent.recv_until, (GenerateJob, DecodeJob), 10),
                    asyncio.to_thread(_maybe, short, PrefillJob, 2),
                )
                lent.report(Load(blocks_total=4096, queued_prefill_tokens=200_000))
                await eventually(lambda: _load(cluster, "lent")["queued_prefill_tokens"] == 200_000, 10)
                requests.append(asyncio.create_task(s.post(cluster.url + "/v1/completions", json=body)))

                def second_prefill() -> PrefillJob:
                    while (job := short.recv_until(PrefillJob, 10)).request_id == first.request_id:
                        pass
                    return job

                prefill, decode = await asyncio.gather(
                    asyncio.to_thread(second_prefill), asyncio.to_thread(lent.recv_until, DecodeJob, 10)
                )
            finally:
                for r in requests:
                    r.cancel()
                    with contextlib.suppress(BaseException):
                        await r
        assert prefill.request_id == decode.request_id != first.request_id
        # The prefill side sends the KV to the lent node's endpoint.
        assert prefill.kv is not None and prefill.kv.endpoint == lent.hello.kv_endpoint
    finally:
        for w in workers:
            w.close()


@pytest.fixture
def two_prefill_nodes(tmp_path) -> Iterator[LocalCluster]:
    """No decode worker; prefill-1 holds a prompt's KV while it prefills it, not its answer too."""
    c = start_cluster(tmp_path, prefill=2, decode=0, per_worker_args={"prefill-1": ["--num-blocks", "72"]})
    yield c
    c.stop()


async def test_real_prefill_workers_hand_a_prompt_to_one_another(two_prefill_nodes: LocalCluster) -> None:
    """Real agents: while prefill-0 prefills one prompt, the next is prefilled on prefill-1 (which
    has no room to keep it) and its KV handed to prefill-0 to decode. Each answer is the one the
    request gets on its own, whole on one worker."""
    cluster = two_prefill_nodes
    prompts = [f"request {i}: " + "the quick brown fox jumps over the lazy dog " * 22 for i in range(6)]
    url, timeout = cluster.url + "/v1/completions", aiohttp.ClientTimeout(total=120)

    async def complete(s: aiohttp.ClientSession, prompt: str) -> list[int]:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 300, "temperature": 0}
        body |= {"ignore_eos": True, "return_token_ids": True}
        async with s.post(url, json=body) as r:
            assert r.status == 200, await r.text()
            return (await r.json())["choices"][0]["token_ids"]

    async with aiohttp.ClientSession(timeout=timeout) as s:
        together = await asyncio.gather(*(complete(s, p) for p in prompts))
        split = await metric(s, cluster.url, "pdorch_placements_total", kind="split")
        alone = [await complete(s, p) for p in prompts]
    assert split >= 1  # with no decode worker, a split is a prefill worker decoding
    assert together == alone and all(len(t) == 300 for t in together)
    await eventually(lambda: _decoded(cluster, "prefill-0") > 0, 10)


def _maybe(worker: FakeWorker, kind: type, timeout_s: float) -> object | None:
    with contextlib.suppress(TimeoutError):
        return worker.recv_until(kind, timeout_s)
    return None


def _load(cluster: LocalCluster, worker_id: str) -> dict:
    return next(w["load"] for w in cluster.cluster_state()["workers"] if w["worker_id"] == worker_id)


def _blocks_used(cluster: LocalCluster, worker_id: str) -> int:
    return next(
        w["load"]["blocks_used"] for w in cluster.cluster_state()["workers"] if w["worker_id"] == worker_id
    )


ROUND_ROBIN = """
placement:
  handler: {type: pd}
  decider: {type: always}
  prefill: {filters: [{type: role}], picker: {type: round-robin}}
  decode: {filters: [{type: role}], picker: {type: round-robin}}
"""


@pytest.fixture
def round_robin_scheduler(tmp_path) -> Iterator[LocalCluster]:
    c = start_scheduler_only(tmp_path, ROUND_ROBIN)
    yield c
    c.stop()


async def test_each_request_is_placed_once(round_robin_scheduler: LocalCluster) -> None:
    """Admission's room check is the request's placement, not a rehearsal of it: a round-robin
    decode picker moves on once per request (placing twice, it would come back to the same node)."""
    cluster = round_robin_scheduler
    prefill = FakeWorker(cluster, "prefill", role=Role.PREFILL)
    decoders = [FakeWorker(cluster, name, capacity_blocks=10_000) for name in ("d0", "d1")]
    workers = [prefill, *decoders]
    try:
        for w in workers:
            w.register()
        seen = []
        for _ in range(4):
            seen.append(await _where(cluster, decoders))
            await eventually(lambda: _idle(cluster), 10)
        assert seen in (["d0", "d1", "d0", "d1"], ["d1", "d0", "d1", "d0"])
    finally:
        for w in workers:
            w.close()


@pytest.fixture
def full_decode_pool(tmp_path) -> Iterator[LocalCluster]:
    """Real agents; the decode worker's KV cache holds 2 blocks of 16 tokens, less than any request
    below needs."""
    c = start_cluster(tmp_path, per_worker_args={"decode-0": ["--num-blocks", "2", "--block-size", "16"]})
    yield c
    c.stop()


def _decoded(cluster: LocalCluster, worker_id: str) -> int:
    return next(
        w["load"]["decoded_tokens"] for w in cluster.cluster_state()["workers"] if w["worker_id"] == worker_id
    )


async def test_a_prefill_node_runs_the_whole_request_when_no_decode_node_has_room(
    full_decode_pool: LocalCluster,
) -> None:
    """The default policy (the simulator's ``pdorch``) lends the prefill pool's decode capacity: the
    request is served whole by the prefill worker instead of waiting for decode room that never comes."""
    cluster = full_decode_pool
    body = {"model": MODEL, "prompt": "a prompt of a few words " * 4, "max_tokens": 48, "temperature": 0}
    url, timeout = cluster.url + "/v1/completions", aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as s, s.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        out = await r.json()
    assert out["usage"]["completion_tokens"] > 0
    # Every token after the first is a decode step of the prefill worker's (as its report says).
    await eventually(lambda: _decoded(cluster, "prefill-0") > 0, 10)
    assert _decoded(cluster, "decode-0") == 0


@pytest.fixture
def pair(tmp_path) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path)
    yield c
    c.stop()


@pytest.mark.parametrize(("gone", "left"), [("decode-0", "prefill-0"), ("prefill-0", "decode-0")])
async def test_the_worker_left_of_a_pair_serves_requests_whole(
    pair: LocalCluster, gone: str, left: str
) -> None:
    """With one pool gone (its pods restarting, say), the other serves: a prefill worker runs whole
    requests (``fallback_to_prefill_node``), a decode worker prefills its own (the slo handler's
    ``colocate``). The scheduler stays ready instead of answering 503."""
    cluster = pair
    body = {"model": MODEL, "prompt": "a prompt of a few words " * 4, "max_tokens": 24, "temperature": 0}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async with s.post(cluster.url + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
        assert await metric(s, cluster.url, "pdorch_placements_total", kind="split") == 1
        # Two workers: every decision looks at both (a sample is for large clusters).
        assert await metric(s, cluster.url, "pdorch_placement_scope_total", scope="all") >= 1
        assert await metric(s, cluster.url, "pdorch_placement_scope_total", scope="sample") == 0
        cluster.kill(gone)

        def only_left() -> bool:
            return [w["worker_id"] for w in cluster.cluster_state()["workers"]] == [left]

        await eventually(only_left, 30, f"the scheduler dropping {gone}")
        async with s.get(cluster.url + "/ready") as r:
            assert r.status == 200, await r.text()
        async with s.post(cluster.url + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            out = await r.json()
        # Operators see where requests ran: whole on the worker of the role that is left.
        role = left.split("-")[0]
        assert await metric(s, cluster.url, "pdorch_placements_total", kind=role) == 1
        assert await metric(s, cluster.url, "pdorch_placements_total", kind="split") == 1
    assert out["usage"]["completion_tokens"] > 0
    await eventually(lambda: _decoded(cluster, left) > 0, 10)


async def test_a_stream_whose_decode_worker_dies_alone_finishes_on_the_prefill_worker(
    pair: LocalCluster,
) -> None:
    """No other decode worker to move to: the request continues whole on the prefill worker, token
    for token; once the decode worker is back, requests are split again."""
    cluster = pair
    body = {"prompt": "a prompt of a few words " * 4, "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        reference, _, _ = await stream_tokens(s, cluster.url, **body)
        seen: list[int] = []
        streaming = asyncio.create_task(stream_tokens(s, cluster.url, seen=seen, **body))
        await eventually(lambda: len(seen) >= 30, 30, "the first tokens")
        cluster.kill("decode-0")
        ids, finish, _ = await streaming
        assert (ids, finish) == (reference, "length")
        await eventually(lambda: _decoded(cluster, "prefill-0") > 0, 10)
        cluster.restart("decode-0")

        def decode_back() -> bool:
            return "decode-0" in [w["worker_id"] for w in cluster.cluster_state()["workers"]]

        await eventually(decode_back, 30, "decode-0 registering again")
        again, _, _ = await stream_tokens(s, cluster.url, **body)
    assert again == reference
    await eventually(lambda: _decoded(cluster, "decode-0") > 0, 10)
