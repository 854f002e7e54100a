"""Control-plane resilience with real processes: scheduler restarts, version mismatches, silence."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator

import aiohttp
import msgspec
import pytest

from pdorch.launcher import LocalCluster
from scheduler.control import MIN_BEAT_GAP_S
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import complete
from tests.support.fake_worker import FakeWorker
from transport.messages import Disconnect, Heartbeat, Role, Welcome

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path, kv_mode="p2p")
    yield c
    c.stop()


# Long enough that the test is over before the scheduler's first heartbeat.
SLOW_BEAT_S = 60.0


@pytest.fixture
def slow_beats(tmp_path) -> Iterator[LocalCluster]:
    config = tmp_path / "scheduler.yaml"
    config.write_text(f"heartbeat_interval_s: {SLOW_BEAT_S}\n")
    c = start_cluster(tmp_path, kv_mode="p2p", scheduler_args=["--config", str(config)])
    yield c
    c.stop()


def test_a_worker_that_dies_is_dropped_at_once_not_at_the_next_heartbeat(slow_beats: LocalCluster) -> None:
    # Its process killed, the kernel closes its connection: the scheduler beats at once and that
    # send finds it gone (before, the first send to it, a minute away here, did).
    slow_beats.kill("decode-0")
    deadline = time.monotonic() + SLOW_BEAT_S / 4
    while "decode-0" in {w["worker_id"] for w in slow_beats.cluster_state()["workers"]}:
        assert time.monotonic() < deadline, "a dead worker stayed registered until a heartbeat"
        time.sleep(0.05)
    assert "prefill-0" in {w["worker_id"] for w in slow_beats.cluster_state()["workers"]}


def test_connections_that_close_in_a_loop_bring_heartbeats_forward_a_bounded_number_of_times(
    slow_beats: LocalCluster,
) -> None:
    # Each closed connection brings a heartbeat to every worker forward; a peer that connects and
    # hangs up in a loop must not turn that into a storm: early beats are MIN_BEAT_GAP_S apart.
    w = FakeWorker(slow_beats, "counting")
    try:
        assert isinstance(w.register(), Welcome)
        host, port = slow_beats.control.removeprefix("tcp://").rsplit(":", 1)
        began = time.monotonic()
        for _ in range(300):
            with socket.create_connection((host, int(port)), timeout=5):
                pass
        flapped_s = time.monotonic() - began
        beats = 0
        with contextlib.suppress(TimeoutError):
            while True:  # until the beats stop (no regular one comes for a minute)
                if isinstance(w.recv(timeout_s=1.0), Heartbeat):
                    beats += 1
        assert 1 <= beats <= (time.monotonic() - began) / MIN_BEAT_GAP_S + 2, (beats, flapped_s)
    finally:
        w.close()


async def test_workers_reregister_after_scheduler_restart(cluster: LocalCluster) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        before = await complete(s, cluster.url, prompt="before", max_tokens=5, temperature=0)
        cluster.kill("scheduler")
        cluster.restart("scheduler")
        # The agents notice the silence (or the new scheduler's Disconnect) and say Hello again.
        await asyncio.to_thread(cluster.wait_ready, 2, 30)
        after = await complete(s, cluster.url, prompt="before", max_tokens=5, temperature=0)
    assert after["choices"][0]["token_ids"] == before["choices"][0]["token_ids"]
    assert all(p.poll() is None for n, p in cluster.procs.items())


def test_protocol_version_mismatch_is_refused(cluster: LocalCluster) -> None:
    w = FakeWorker(cluster, "from-the-future", protocol_version=99)
    try:
        reply = w.register()
        assert isinstance(reply, Disconnect) and "version" in reply.reason
    finally:
        w.close()
    assert "from-the-future" not in {x["worker_id"] for x in cluster.cluster_state()["workers"]}


def test_a_key_registers_only_the_worker_ids_it_claims(cluster: LocalCluster) -> None:
    w = FakeWorker(cluster, "me")  # its key claims "me"
    w.hello = msgspec.structs.replace(w.hello, worker_id="you")
    try:
        reply = w.register()
        assert isinstance(reply, Disconnect) and reply.code == "unauthorized", reply
    finally:
        w.close()
    assert "you" not in {x["worker_id"] for x in cluster.cluster_state()["workers"]}


def test_message_before_hello_gets_disconnect_then_hello_works(cluster: LocalCluster) -> None:
    w = FakeWorker(cluster, "late-hello", role=Role.DECODE)
    try:
        w.send(Heartbeat())
        assert isinstance(w.recv(), Disconnect)
        assert isinstance(w.register(), Welcome)
        assert "late-hello" in {x["worker_id"] for x in cluster.cluster_state()["workers"]}
    finally:
        w.close()


def test_silent_worker_is_dropped(cluster: LocalCluster) -> None:
    w = FakeWorker(cluster, "quiet")
    try:
        assert isinstance(w.register(), Welcome)
        assert "quiet" in {x["worker_id"] for x in cluster.cluster_state()["workers"]}
        deadline = time.monotonic() + 15
        while "quiet" in {x["worker_id"] for x in cluster.cluster_state()["workers"]}:
            assert time.monotonic() < deadline, "a silent worker was never dropped"
            time.sleep(0.1)
    finally:
        w.close()
