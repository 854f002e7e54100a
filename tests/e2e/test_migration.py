"""Nothing lost: requests survive the death of the workers they run on, in every phase.

Real processes (2 prefill + 2 decode workers, p2p). Each decode worker's KV endpoint sits behind a
TCP proxy that the tests can hold, so a handoff stays in flight for as long as a test needs. A
worker is killed with SIGKILL (or stopped with SIGSTOP) while its requests are in a chosen phase:
before the prefill's answer, between the first token and the KV landing, or after the decode side
streamed tokens. Every client must get the output a colocated worker produces, token for token,
greedy and seeded, streaming and not; the scheduler's metrics must show the migration happened in
that phase. The killed worker is started again after each test.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import zmq

from pdorch.launcher import LocalCluster, free_port
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import complete, eventually, generate, metric
from tests.support.fake_worker import FakeWorker
from tests.support.tcp_proxy import ProxyThread
from transport.messages import DecodeJob, Heartbeat, Load

pytestmark = pytest.mark.e2e

DECODERS = ("decode-0", "decode-1")
CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=180)


@pytest.fixture(scope="module")
def proxies() -> Iterator[tuple[ProxyThread, dict[str, tuple[int, int]]]]:
    thread = ProxyThread()
    ports = {name: (free_port(), free_port()) for name in DECODERS}  # (bound, advertised)
    for bound, advertised in ports.values():
        thread.add(advertised, bound)
    yield thread, ports
    thread.close()


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, proxies: tuple[ProxyThread, dict[str, tuple[int, int]]]
) -> Iterator[LocalCluster]:
    _, ports = proxies
    per_worker = {
        name: ["--kv-bind", f"tcp://127.0.0.1:{bound}", "--kv-advertise", f"tcp://127.0.0.1:{advertised}"]
        for name, (bound, advertised) in ports.items()
    }
    logs = tmp_path_factory.mktemp("migration")
    # Late binding keeps prompts in the admission queue rather than in the prefill workers' queues;
    # these tests need work queued on a worker when they kill it, so it is off here. (Among decode
    # nodes predicted alike, the default takes the one with fewer requests.)
    # A handoff these tests hold up leaves its decode worker out of decode for a while (the KV-path
    # back-off); kept short, so that the next test finds both decode workers placeable soon.
    config = logs / "scheduler.yaml"
    config.write_text(
        "placement:\n  handler: {type: slo, params: {max_prefill_wait_s: 0}}\nkv_path_backoff_s: 0.5\n"
    )
    c = start_cluster(
        logs,
        prefill=2,
        decode=2,
        kv_mode="p2p",
        per_worker_args=per_worker,
        scheduler_args=["--config", str(config)],
    )
    yield c
    c.stop()


@pytest.fixture
def healed(cluster: LocalCluster, proxies: tuple[ProxyThread, Any]) -> Iterator[LocalCluster]:
    """The cluster, whole again after the test: stopped workers continued, killed ones restarted."""
    yield cluster
    proxies[0].set_mode("pass")
    for name in cluster.worker_names():
        proc = cluster.procs[name]
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
        else:
            cluster.restart(name)
    deadline = time.monotonic() + 60
    while {w["worker_id"] for w in cluster.cluster_state()["workers"]} != set(cluster.worker_names()):
        assert time.monotonic() < deadline, "the cluster did not heal"
        time.sleep(0.1)
    # Every request of the test is over: nothing may stay booked on any worker.
    while booked := {
        w["worker_id"]: w["inflight_requests"]
        for w in cluster.cluster_state()["workers"]
        if w["inflight_requests"]
    }:
        assert time.monotonic() < deadline, f"requests left booked after the test: {booked}"
        time.sleep(0.1)
    # Nor a decode worker left out for a handoff the test held up: the next test places there.
    while left_out := [w["worker_id"] for w in cluster.cluster_state()["workers"] if _backing_off(w)]:
        assert time.monotonic() < deadline, f"decode workers still left out: {left_out}"
        time.sleep(0.1)


def _backing_off(worker: dict[str, Any]) -> bool:
    """Handoffs to or from the worker are being avoided (its KV network, or one of its pairs)."""
    return bool(worker["kv_unreachable"] or worker["kv_unreachable_from"])


def _bodies(seed: int, count: int, prompt_len: int, max_tokens: int) -> list[dict[str, Any]]:
    """A mix of greedy and seeded, streaming and not."""
    rng = random.Random(seed)
    bodies = []
    for i in range(count):
        body: dict[str, Any] = {
            "prompt": [rng.randrange(256) for _ in range(prompt_len + rng.randrange(8))],
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": i % 2 == 0,
        }
        body.update({"temperature": 0.8, "seed": 100 + i} if i % 4 >= 2 else {"temperature": 0.0})
        bodies.append(body)
    return bodies


async def _run(
    url: str, bodies: list[dict[str, Any]], seen: list[list[int]] | None = None
) -> list[list[int]]:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as s:
        results = await asyncio.gather(
            *(generate(s, url, b, None if seen is None else seen[i]) for i, b in enumerate(bodies))
        )
    return [ids for ids, _ in results]


def _busy(cluster: LocalCluster, role: str, at_least: int = 1) -> list[str]:
    return [
        w["worker_id"]
        for w in cluster.cluster_state()["workers"]
        if w["role"] == role and w["inflight_requests"] >= at_least
    ]


def _running_decoder(cluster: LocalCluster) -> str:
    """The decode worker with the most of the test's requests on it ("" if none). By the scheduler's
    booking: a worker's own report of its running jobs comes with its heartbeat, so it can still
    count the jobs of the test before, and miss this test's short ones."""
    workers = [
        w for w in cluster.cluster_state()["workers"] if w["role"] == "decode" and w["inflight_requests"]
    ]
    return max(workers, key=lambda w: w["inflight_requests"])["worker_id"] if workers else ""


async def _migration_series(url: str) -> list[str]:
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as s, s.get(url + "/metrics") as r:
        return [line for line in (await r.text()).splitlines() if line.startswith("pdorch_migrations_total{")]


async def _migrations(url: str, **labels: str) -> float:
    async with aiohttp.ClientSession() as s:
        return await metric(s, url, "pdorch_migrations_total", **labels)


async def test_prefill_killed_before_its_answer(healed: LocalCluster, colocated: LocalCluster) -> None:
    # Long prompts queue up on the prefill workers, so a kill catches requests before their answer.
    bodies = _bodies(seed=1, count=16, prompt_len=1500, max_tokens=6)
    want = await _run(colocated.url, bodies)
    before = await _migrations(healed.url, phase="prefill", cause="lost", recovery="resume")
    running = asyncio.create_task(_run(healed.url, bodies))
    await eventually(lambda: len(_busy(healed, "prefill", at_least=3)) >= 1, 30, "a busy prefill worker")
    healed.kill(_busy(healed, "prefill", at_least=3)[0])
    assert await running == want
    assert await _migrations(healed.url, phase="prefill", cause="lost", recovery="resume") > before


@pytest.mark.parametrize("victim_role", ["prefill", "decode"])
async def test_killed_between_the_first_token_and_the_kv_landing(
    healed: LocalCluster, colocated: LocalCluster, proxies: tuple[ProxyThread, Any], victim_role: str
) -> None:
    # KV over the eager bound (messages.py: 1 MiB; 4 KiB a token here), so the held begin is all
    # that leaves: an eager transfer would be on its way whole, and land from a dead prefill worker.
    bodies = [{**b, "stream": True} for b in _bodies(seed=2, count=4, prompt_len=300, max_tokens=24)]
    want = await _run(colocated.url, bodies)
    before = await _migrations(healed.url, phase="handoff", cause="lost")
    proxies[0].set_mode("hold")  # the KV stays on its way to the decode workers
    seen: list[list[int]] = [[] for _ in bodies]
    running = asyncio.create_task(_run(healed.url, bodies, seen))
    # Every client has its first token (from the prefill side) and no more: the KV is held.
    await eventually(lambda: all(len(s) == 1 for s in seen), 30, "every first token")
    healed.kill(_busy(healed, victim_role)[0])
    proxies[0].set_mode("pass")
    assert await running == want
    assert await _migrations(healed.url, phase="handoff", cause="lost") > before


async def test_decode_killed_after_streaming_tokens(healed: LocalCluster, colocated: LocalCluster) -> None:
    bodies = _bodies(seed=3, count=6, prompt_len=30, max_tokens=300)
    want = await _run(colocated.url, bodies)
    before = await _migrations(healed.url, phase="decode", cause="lost", recovery="resume")
    seen: list[list[int]] = [[] for _ in bodies]
    running = asyncio.create_task(_run(healed.url, bodies, seen))
    streamed = [s for s, b in zip(seen, bodies, strict=True) if b["stream"]]
    await eventually(lambda: all(len(s) >= 10 for s in streamed), 60, "ten tokens on every stream")
    # Every stream is past its handoff, so the requests booked on a decode worker are decoding there.
    await eventually(lambda: _running_decoder(healed), 30, "a decode worker running jobs")
    victim = _running_decoder(healed)
    healed.kill(victim)
    got = await running
    assert got == want
    after = await _migrations(healed.url, phase="decode", cause="lost", recovery="resume")
    assert after > before, f"no decode-phase migration off {victim}: {await _migration_series(healed.url)}"


async def test_a_stopped_worker_is_as_dead_as_a_killed_one(
    healed: LocalCluster, colocated: LocalCluster
) -> None:
    """SIGSTOP: alive but silent. It is dropped when its heartbeats stop, its requests move on, and
    what it sends once continued (tokens of jobs that moved) is ignored, not streamed twice."""
    bodies = _bodies(seed=4, count=6, prompt_len=20, max_tokens=300)
    want = await _run(colocated.url, bodies)
    seen: list[list[int]] = [[] for _ in bodies]
    running = asyncio.create_task(_run(healed.url, bodies, seen))
    streamed = [s for s, b in zip(seen, bodies, strict=True) if b["stream"]]
    await eventually(lambda: all(len(s) >= 5 for s in streamed), 60, "five tokens on every stream")
    victim = _busy(healed, "decode")[0]
    os.kill(healed.procs[victim].pid, signal.SIGSTOP)
    await eventually(
        lambda: victim not in {w["worker_id"] for w in healed.cluster_state()["workers"]}, 30, "its drop"
    )
    os.kill(healed.procs[victim].pid, signal.SIGCONT)  # what it had computed meanwhile arrives late
    assert await running == want
    assert await _migrations(healed.url, cause="lost") > 0


async def test_a_worker_that_takes_jobs_but_makes_no_progress_is_left(
    healed: LocalCluster, colocated: LocalCluster
) -> None:
    """A decode worker that registers, heartbeats and accepts jobs, and never delivers anything: the
    handoff deadline notices, and the request moves to a worker that works."""
    body = {"prompt": "stuck somewhere", "max_tokens": 12, "temperature": 0.0}
    want = await _run(colocated.url, [body])
    # Both real decode workers busy with a long stream each, before the stuck one joins: then the
    # idle, roomy stuck one is the decode node placement prefers (on a tie, by the scorer set above).
    busy = {"prompt": "keep them busy", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    holding = asyncio.create_task(_run(healed.url, [busy, busy]))
    # Its KV endpoint takes connections and never completes a handshake: the prefill side's
    # transfer just waits.
    black_hole = zmq.Context.instance().socket(zmq.ROUTER)
    black_hole.setsockopt(zmq.LINGER, 0)
    kv_port = black_hole.bind_to_random_port("tcp://127.0.0.1")
    stuck = FakeWorker(
        healed, "stuck-decode", capacity_blocks=10**6, kv_endpoint=f"tcp://127.0.0.1:{kv_port}"
    )
    alive = threading.Event()
    jobs: list[DecodeJob] = []

    def heartbeat() -> None:
        while alive.is_set():
            try:
                msg = stuck.recv(0.2)
            except TimeoutError:
                continue
            if isinstance(msg, DecodeJob):
                jobs.append(msg)
            stuck.send(Heartbeat(Load(blocks_total=10**6)))

    beating = threading.Thread(target=heartbeat, daemon=True)
    try:
        await eventually(lambda: len(_busy(healed, "decode")) == 2, 30, "both real decode workers busy")
        stuck.register()
        alive.set()
        beating.start()
        assert await _run(healed.url, [body] * 3) == want * 3
        assert [j.request_id for j in jobs], "the stuck worker was never tried"
        assert await _migrations(healed.url, cause="stalled") >= 1
    finally:
        holding.cancel()
        with contextlib.suppress(BaseException):
            await holding
        alive.clear()
        if beating.is_alive():
            beating.join(5)
        stuck.close()
        black_hole.close()


async def test_the_choices_of_an_n_request_move_on_their_own(
    healed: LocalCluster, colocated: LocalCluster
) -> None:
    """All n choices decode on the worker where the prompt's KV landed; when it dies, each
    resumes elsewhere and the client gets every choice whole."""
    body: dict[str, Any] = {
        "prompt": [random.Random(6).randrange(256) for _ in range(70)],
        "max_tokens": 300,
        "ignore_eos": True,
        "temperature": 0.8,
        "return_token_ids": True,
    }
    async with aiohttp.ClientSession(timeout=CLIENT_TIMEOUT) as s:
        want = [(await complete(s, colocated.url, **body, seed=40 + i))["choices"][0] for i in range(3)]
        running = asyncio.create_task(complete(s, healed.url, **body, seed=40, n=3))
        await eventually(lambda: len(_busy(healed, "decode", at_least=3)) == 1, 60, "3 choices decoding")
        healed.kill(_busy(healed, "decode", at_least=3)[0])
        got = (await running)["choices"]
    assert [c["token_ids"] for c in got] == [c["token_ids"] for c in want]
