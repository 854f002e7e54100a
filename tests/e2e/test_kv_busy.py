"""A decode worker whose KV endpoint turns handoffs away for lack of room (``kv_busy``) is left
out of decode for a while by the scheduler itself, whatever its engine reports (vLLM's connector
reports nothing): the request moves on, and the next ones go elsewhere at once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import zmq.asyncio

from pdorch.launcher import LocalCluster
from tests.e2e.conftest import start_cluster
from tests.e2e.helpers import complete
from tests.support.fake_worker import FakeWorker
from tests.support.security import party
from transport.kv.receiver import KvReceiver
from transport.messages import DecodeJob, Heartbeat

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    cluster = start_cluster(tmp_path, kv_mode="p2p", prefill=1, decode=1)
    yield cluster
    cluster.stop()


class _Pump:
    """Keeps a fake decode worker alive (heartbeats) and notes when each DecodeJob reached it."""

    def __init__(self, fake: FakeWorker) -> None:
        self.fake = fake
        self.jobs: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.fake.recv(0.1)
            except TimeoutError:
                continue
            if isinstance(msg, Heartbeat):
                self.fake.send(Heartbeat(self.fake.load))
            elif isinstance(msg, DecodeJob):
                self.jobs.append(time.monotonic())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


async def test_a_decode_worker_turning_handoffs_away_is_left_out_for_a_while(cluster: LocalCluster) -> None:
    keys = party(cluster, "decode-x")
    ctx = zmq.asyncio.Context()
    # Room for no transfer that is not expected yet: every begin is turned away as kv_busy.
    rx = KvReceiver(ctx, bind="tcp://127.0.0.1:0", security=keys, max_parked=0)
    await rx.start()
    fake = FakeWorker(cluster, "decode-x", security=keys, kv_endpoint=rx.endpoint, capacity_blocks=100_000)
    fake.register()
    pump = _Pump(fake)
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
            for i in range(12):  # until one is placed on decode-x
                got = await complete(
                    s, cluster.url, prompt=f"busy {i} " * 10, max_tokens=4, temperature=0, ignore_eos=True
                )
                assert len(got["choices"][0]["token_ids"]) == 4, "the request moved on and finished"
                if pump.jobs:
                    break
            assert pump.jobs, "decode-x was never chosen"
            first = pump.jobs[0]
            state = {w["worker_id"]: w for w in cluster.cluster_state()["workers"]}
            assert state["decode-x"]["kv_refusing"], "the scheduler shows it refusing"
            for i in range(5):
                got = await complete(
                    s, cluster.url, prompt=f"after {i} " * 10, max_tokens=4, temperature=0, ignore_eos=True
                )
                assert len(got["choices"][0]["token_ids"]) == 4
            window = [t for t in pump.jobs[1:] if t - first < 4.0]
            assert not window, "placed on decode-x again while it was refusing"
        assert rx.stats.refused_begins >= 1
    finally:
        pump.stop()
        fake.close()
        await rx.close()
        ctx.term()
        await asyncio.sleep(0)
