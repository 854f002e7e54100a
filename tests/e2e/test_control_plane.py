"""Control-plane resilience with real processes: scheduler restarts, version mismatches, silence."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import aiohttp
import pytest

from pdorch.launcher import LocalCluster
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import complete
from tests.support.fake_worker import FakeWorker
from transport.messages import Disconnect, Goodbye, Heartbeat, Role, Welcome

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path) -> Iterator[LocalCluster]:
    c = start_cluster(tmp_path, kv_mode="p2p")
    yield c
    c.stop()


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
    w = FakeWorker(cluster.control, "from-the-future", protocol_version=99)
    try:
        reply = w.register()
        assert isinstance(reply, Disconnect) and "version" in reply.reason
    finally:
        w.close()
    assert "from-the-future" not in {x["worker_id"] for x in cluster.cluster_state()["workers"]}


def test_identity_must_match_worker_id(cluster: LocalCluster) -> None:
    w = FakeWorker(cluster.control, "me")
    w.hello = type(w.hello)(
        **{**{f: getattr(w.hello, f) for f in w.hello.__struct_fields__}, "worker_id": "you"}
    )
    try:
        assert isinstance(w.register(), Disconnect)
    finally:
        w.close()


def test_message_before_hello_gets_disconnect_then_hello_works(cluster: LocalCluster) -> None:
    w = FakeWorker(cluster.control, "late-hello", role=Role.DECODE)
    try:
        w.send(Heartbeat())
        assert isinstance(w.recv(), Disconnect)
        assert isinstance(w.register(), Welcome)
        assert "late-hello" in {x["worker_id"] for x in cluster.cluster_state()["workers"]}
    finally:
        w.close()


def test_silent_worker_is_dropped(cluster: LocalCluster) -> None:
    w = FakeWorker(cluster.control, "quiet")
    try:
        assert isinstance(w.register(), Welcome)
        assert "quiet" in {x["worker_id"] for x in cluster.cluster_state()["workers"]}
        deadline = time.monotonic() + 15
        while "quiet" in {x["worker_id"] for x in cluster.cluster_state()["workers"]}:
            assert time.monotonic() < deadline, "a silent worker was never dropped"
            time.sleep(0.1)
    finally:
        w.close()


def test_a_control_token_keeps_strangers_out(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scheduler and workers read PDORCH_CONTROL_TOKEN: the cluster's own workers register and
    serve; a worker without the token, or with another, is refused and never placed on."""
    monkeypatch.setenv("PDORCH_CONTROL_TOKEN", "0123456789")  # digits: must stay a string
    cluster = start_cluster(tmp_path, kv_mode="p2p")
    try:
        registered = {x["worker_id"] for x in cluster.cluster_state()["workers"]}
        assert registered == {"prefill-0", "decode-0"}
        for name, token in (("no-token", ""), ("wrong-token", "9876543210")):
            w = FakeWorker(cluster.control, name, token=token)
            try:
                reply = w.register()
                assert isinstance(reply, Disconnect) and reply.code == "unauthorized", reply
            finally:
                w.close()
        w = FakeWorker(cluster.control, "insider", token="0123456789")
        try:
            assert isinstance(w.register(), Welcome)
            workers = {x["worker_id"] for x in cluster.cluster_state()["workers"]}
            assert workers == {"prefill-0", "decode-0", "insider"}
            w.send(Goodbye("done"))  # it serves nothing: leave before a request is placed on it
        finally:
            w.close()
        deadline = time.monotonic() + 10
        while "insider" in {x["worker_id"] for x in cluster.cluster_state()["workers"]}:
            assert time.monotonic() < deadline, "the Goodbye was not processed"
            time.sleep(0.05)
        asyncio.run(_one_request(cluster))
    finally:
        cluster.stop()


async def _one_request(cluster: LocalCluster) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        out = await complete(s, cluster.url, prompt="with a token", max_tokens=4, temperature=0)
    assert len(out["choices"][0]["token_ids"]) == 4
