"""A decode worker whose KV network is cut off while its control connection stays up.

The worker runs in a network namespace joined to the host by two veth pairs: its control
connection to the scheduler goes over one, its KV endpoint listens on the other, and the test takes
only the KV link down. The scheduler still hears the worker's heartbeats, so nothing looks dead:
only handoffs to it fail to land. It is the only decode worker, so every split request would go
there. The requests in flight when the cut is found move on and finish whole; after that no handoff
goes there (it is left out of decode, backing off) and requests are served without one, until the
link is back and a handoff lands there again. Needs root and iproute2; skipped, saying so, where
those are missing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pdorch.launcher import LocalCluster
from tests.e2e.helpers import generate, metric
from tests.e2e.test_migration import _bodies
from tests.support.netns import Namespace, make_namespace, namespaced_cluster

pytestmark = pytest.mark.e2e

# Long enough that nothing of the test's second round outlasts it on a slow machine.
BACKOFF_S = 15.0
HANDOFF_TIMEOUT_S = 3.0


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    yield from make_namespace(links=3)


@pytest.fixture
def cluster(tmp_path: Path, namespace: Namespace) -> Iterator[LocalCluster]:
    yield from namespaced_cluster(tmp_path, namespace, decode=0, kv_link=1, scheduler_args=_config(tmp_path))


@pytest.fixture
def prefill_cut(tmp_path: Path, namespace: Namespace) -> Iterator[LocalCluster]:
    yield from namespaced_cluster(
        tmp_path, namespace, role="prefill", decode=2, kv_link=1, scheduler_args=_config(tmp_path)
    )


@pytest.fixture
def pair_cut(tmp_path: Path, namespace: Namespace) -> Iterator[LocalCluster]:
    """prefill-cut reaches decode-0's KV endpoint over link 1 and decode-1's over link 2."""
    yield from namespaced_cluster(
        tmp_path,
        namespace,
        role="prefill",
        decode=2,
        kv_link=1,
        decode_links=(1, 2),
        scheduler_args=_config(tmp_path),
    )


def _config(tmp_path: Path) -> tuple[str, str]:
    config = tmp_path / "scheduler.yaml"
    config.write_text(f"kv_handoff_timeout_s: {HANDOFF_TIMEOUT_S}\nkv_path_backoff_s: {BACKOFF_S}\n")
    return ("--config", str(config))


def _workers(cluster: LocalCluster) -> dict[str, dict[str, Any]]:
    return {w["worker_id"]: w for w in cluster.cluster_state()["workers"]}


def _left_out(cluster: LocalCluster) -> bool:
    """No handoff goes to decode-cut: its KV network is taken as down, or (the only prefill worker
    being the one that tried) handoffs from that worker to it are."""
    cut = _workers(cluster)["decode-cut"]
    return cut["kv_unreachable"] or cut["kv_unreachable_from"] == ["prefill-0"]


async def test_handoffs_stop_going_to_a_decode_worker_cut_off_from_the_kv_network(
    cluster: LocalCluster, colocated: LocalCluster, namespace: Namespace
) -> None:
    rounds = [_bodies(seed=20 + i, count=6, prompt_len=30, max_tokens=24) for i in range(4)]
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        want = [await asyncio.gather(*(generate(s, colocated.url, b) for b in r)) for r in rounds]

        async def run(i: int) -> None:
            assert await asyncio.gather(*(generate(s, cluster.url, b) for b in rounds[i])) == want[i]

        async def landed() -> float:
            return await metric(s, cluster.url, "pdorch_kv_handoffs_total", mode="p2p", outcome="ok")

        await run(0)  # the KV network up: split requests hand off to decode-cut
        before = await landed()
        assert before >= 1 and not _left_out(cluster)

        namespace.cut(down=True, link=1)
        await run(1)  # every answer whole: the ones whose handoff stalled moved on
        assert await metric(s, cluster.url, "pdorch_migrations_total", phase="handoff", cause="stalled") >= 1
        assert _left_out(cluster)  # the scheduler's own finding: the worker says nothing of it
        assert await metric(s, cluster.url, "pdorch_kv_path_backoffs_total", scope="pair") >= 1
        # (the rest of the round's handoffs over the pair moved on with the first: cause path_down)
        moved = await metric(s, cluster.url, "pdorch_migrations_total", phase="handoff")

        await run(2)  # served without a handoff to decode-cut: none stalls
        assert await metric(s, cluster.url, "pdorch_migrations_total", phase="handoff") == moved
        assert await landed() == before

        namespace.cut(down=False, link=1)
        probes = [_bodies(seed=40 + i, count=1, prompt_len=30, max_tokens=8)[0] for i in range(500)]

        # Once its back-off is over a handoff is tried there again, lands, and the worker is back.
        async with asyncio.timeout(BACKOFF_S + 60):
            while await landed() == before:
                await generate(s, cluster.url, probes.pop())
                await asyncio.sleep(0.2)
        assert not _left_out(cluster)
        await run(3)


async def _same_answers(
    s: aiohttp.ClientSession, cluster: LocalCluster, colocated: LocalCluster, seed: int
) -> None:
    """Six requests (streaming or not, greedy or seeded) answered as a colocated worker answers them."""
    bodies = _bodies(seed=seed, count=6, prompt_len=30, max_tokens=24)
    want = await asyncio.gather(*(generate(s, colocated.url, b) for b in bodies))
    assert await asyncio.gather(*(generate(s, cluster.url, b) for b in bodies)) == want


def _as_a_whole(cluster: LocalCluster) -> list[str]:
    """The workers whose own KV network is taken as down."""
    return [wid for wid, w in _workers(cluster).items() if w["kv_unreachable"]]


async def test_handoffs_under_way_over_a_path_found_down_move_on_at_once(
    cluster: LocalCluster, colocated: LocalCluster, namespace: Namespace
) -> None:
    # The link is cut before the scheduler knows: one request's handoff stalls there, and while it
    # waits out its timeout three more are placed on the same pair. When the first times out and
    # the pair backs off, those three move on at once (cause "path_down"), each without waiting
    # out a timeout of its own (which would have counted it "stalled" as well).
    first, *rest = _bodies(seed=70, count=4, prompt_len=30, max_tokens=24)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        want = await asyncio.gather(*(generate(s, colocated.url, b) for b in [first, *rest]))
        await _same_answers(s, cluster, colocated, 71)  # handoffs to decode-cut land
        assert not _left_out(cluster)
        namespace.cut(down=True, link=1)
        leader = asyncio.create_task(generate(s, cluster.url, first))
        # Halfway through its timeout: late enough to be placed behind it, early enough that
        # their own timeouts are not near.
        await asyncio.sleep(HANDOFF_TIMEOUT_S / 2)
        assert not _left_out(cluster), "the pair backed off before the others were placed"
        got = await asyncio.gather(leader, *(generate(s, cluster.url, b) for b in rest))
        assert got == want
        moved = await metric(s, cluster.url, "pdorch_migrations_total", cause="path_down")
        assert moved >= 1, "no handoff under way over the cut pair moved on when it backed off"
        assert _left_out(cluster)


async def test_a_handoff_over_a_slow_link_that_keeps_moving_is_not_taken_for_stalled(
    cluster: LocalCluster, colocated: LocalCluster, namespace: Namespace
) -> None:
    # The KV link throttled so that one request's handoff takes one and a half handoff timeouts (its
    # four chunks, one a layer, ~1.1 s apart): the decode worker says its KV is arriving about once
    # a second, and the handoff lands where it was placed.
    body = _bodies(seed=90, count=1, prompt_len=200, max_tokens=8)[0]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        want = await generate(s, colocated.url, body)
        await _same_answers(s, cluster, colocated, 91)  # the link at full speed: handoffs land
        kv_per_token = _workers(cluster)["decode-cut"]["kv_bytes_per_token"]
        seconds = 1.5 * HANDOFF_TIMEOUT_S
        namespace.throttle(int(200 * kv_per_token * 8 / seconds), link=1)
        landed = await metric(s, cluster.url, "pdorch_kv_handoffs_total", mode="p2p", outcome="ok")
        started = time.monotonic()
        assert await generate(s, cluster.url, body) == want
        took = time.monotonic() - started
        moved = await metric(s, cluster.url, "pdorch_migrations_total")
        assert moved == 0, f"a moving handoff was taken for a stalled one (the request took {took:.1f}s)"
        assert (
            await metric(s, cluster.url, "pdorch_kv_handoffs_total", mode="p2p", outcome="ok") == landed + 1
        )
        assert took > HANDOFF_TIMEOUT_S, "the link was not slow enough to tell"


async def test_a_prefill_worker_cut_off_from_the_kv_network_does_not_take_the_decode_workers_out(
    prefill_cut: LocalCluster, colocated: LocalCluster, namespace: Namespace
) -> None:
    # prefill-cut (in the namespace) and prefill-0 both hand off to decode-0 and decode-1. With the
    # KV link of prefill-cut down, its handoffs to either decode worker fail: its own KV network is
    # at fault, not theirs, and prefill-0's handoffs to them must go on landing.
    url = prefill_cut.url
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        await _same_answers(s, prefill_cut, colocated, 50)
        namespace.cut(down=True, link=1)
        seed = 51
        async with asyncio.timeout(BACKOFF_S * 4):
            while _as_a_whole(prefill_cut) != ["prefill-cut"]:
                assert not _as_a_whole(prefill_cut)  # no decode worker, nor anything before it
                await _same_answers(s, prefill_cut, colocated, seed)
                seed += 1
        assert await metric(s, url, "pdorch_kv_path_backoffs_total", scope="worker") == 1
        assert await metric(s, url, "pdorch_kv_path_backoffs_total", scope="pair") >= 2
        stalled = await metric(s, url, "pdorch_migrations_total", phase="handoff")
        before = await metric(s, url, "pdorch_kv_handoffs_total", mode="p2p", outcome="ok")
        await _same_answers(s, prefill_cut, colocated, seed)  # split from prefill-0; no handoff stalls
        assert await metric(s, url, "pdorch_kv_handoffs_total", mode="p2p", outcome="ok") > before
        assert await metric(s, url, "pdorch_migrations_total", phase="handoff") == stalled
        assert _as_a_whole(prefill_cut) == ["prefill-cut"]


async def test_a_cut_between_two_workers_backs_off_that_pair_and_neither_worker(
    pair_cut: LocalCluster, colocated: LocalCluster, namespace: Namespace
) -> None:
    # Only the path from prefill-cut to decode-0 is down: prefill-cut still reaches decode-1, and
    # prefill-0 reaches both. The pair backs off; neither of its workers does, and both go on
    # handing off to (or taking handoffs from) their other peers.
    url = pair_cut.url
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        await _same_answers(s, pair_cut, colocated, 60)
        namespace.cut(down=True, link=1)
        seed = 61
        async with asyncio.timeout(BACKOFF_S * 4):
            while _workers(pair_cut)["decode-0"]["kv_unreachable_from"] != ["prefill-cut"]:
                await _same_answers(s, pair_cut, colocated, seed)
                seed += 1
                assert not _as_a_whole(pair_cut)
        decoded = _workers(pair_cut)["decode-0"]["load"]["decoded_tokens"]
        stalled = await metric(s, url, "pdorch_migrations_total", phase="handoff")
        for _ in range(2):
            await _same_answers(s, pair_cut, colocated, seed)  # none over the cut pair: none stalls
            seed += 1
        assert await metric(s, url, "pdorch_migrations_total", phase="handoff") == stalled
        assert not _as_a_whole(pair_cut)
        assert await metric(s, url, "pdorch_kv_path_backoffs_total", scope="worker") == 0
        # decode-0 still decodes (its reports come with its heartbeats: wait for a fresh one).
        async with asyncio.timeout(10):
            while _workers(pair_cut)["decode-0"]["load"]["decoded_tokens"] == decoded:
                await asyncio.sleep(0.2)
