"""A request's deadlines hold while its worker keeps it busy: the whole request's
(``request_timeout_s``) however steadily tokens come, and a stall's (``token_timeout_s``) once they
stop.

A real scheduler process and one hand-driven worker that does both phases, so every request goes to
it whole and nothing else can take it over.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import aiohttp
import pytest

from pdorch.launcher import LocalCluster
from tests.e2e.conftest import start_scheduler_only
from tests.e2e.helpers import MODEL, metric
from tests.support.fake_worker import FakeWorker
from transport.messages import GenerateJob, Heartbeat, Role, TokenOutput

pytestmark = pytest.mark.e2e

CONFIG = """
token_timeout_s: 1.0
request_timeout_s: 4.0
queue_timeout_s: 1.0
"""


@pytest.fixture
def scheduler_only(tmp_path) -> Iterator[LocalCluster]:
    c = start_scheduler_only(tmp_path, CONFIG)
    yield c
    c.stop()


class _Trickle:
    """A worker that answers every job with one token every ``every_s`` seconds, ``tokens`` in all
    (0: for ever) and never a finish."""

    def __init__(self, cluster: LocalCluster, every_s: float, tokens: int) -> None:
        self.worker = FakeWorker(cluster, "both", role=Role.BOTH, capacity_blocks=10_000)
        self.every_s, self.tokens = every_s, tokens
        self.jobs: dict[str, int] = {}  # job id -> tokens sent
        self._alive = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> _Trickle:
        self.worker.register()
        self._alive.set()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._alive.clear()
        self._thread.join(5)
        self.worker.close()

    def _run(self) -> None:
        next_at = beat_at = time.monotonic()
        while self._alive.is_set():
            try:
                msg = self.worker.recv(0.05)
            except TimeoutError:
                msg = None
            if isinstance(msg, GenerateJob):
                self.jobs[msg.request_id] = 0
            if time.monotonic() >= beat_at:
                beat_at += 0.2
                self.worker.send(Heartbeat(self.worker.load))
            if time.monotonic() >= next_at:
                next_at += self.every_s
                for job_id, sent in self.jobs.items():
                    if self.tokens == 0 or sent < self.tokens:
                        self.worker.send(TokenOutput(job_id, [65]))
                        self.jobs[job_id] = sent + 1


async def _post(cluster: LocalCluster) -> tuple[int, dict, float]:
    body = {"model": MODEL, "prompt": "deadlines", "max_tokens": 1000, "ignore_eos": True}
    start = time.monotonic()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s,
        s.post(cluster.url + "/v1/completions", json=body) as r,
    ):
        return r.status, await r.json(), time.monotonic() - start


async def test_a_request_making_progress_still_ends_at_its_deadline(scheduler_only: LocalCluster) -> None:
    """A token every 0.25 s never trips the 1 s stall timeout, and the request still ends at 4 s."""
    with _Trickle(scheduler_only, every_s=0.25, tokens=0) as worker:
        status, body, took = await _post(scheduler_only)
        assert status == 504, body
        assert "did not finish within 4s" in body["error"]["message"]
        assert 3.9 <= took < 15
        assert sum(worker.jobs.values()) >= 8  # it went on streaming well past one stall timeout
    async with aiohttp.ClientSession() as s:
        assert await metric(s, scheduler_only.url, "pdorch_migrations_total", cause="stalled") == 0


async def test_a_request_whose_worker_goes_quiet_is_moved_as_stalled(scheduler_only: LocalCluster) -> None:
    """Two tokens per attempt, then nothing: 1 s later the attempt has stalled and the request moves
    on (to the same worker, the only one: it stays registered), until its own deadline ends it."""
    with _Trickle(scheduler_only, every_s=0.1, tokens=2):
        status, body, took = await _post(scheduler_only)
        assert status == 504, body
        assert "did not finish within 4s" in body["error"]["message"]
        assert 3.9 <= took < 10
    async with aiohttp.ClientSession() as s:
        assert await metric(s, scheduler_only.url, "pdorch_migrations_total", cause="stalled") >= 2


async def test_requests_started_apart_end_apart(scheduler_only: LocalCluster) -> None:
    """Requests that started at different times reach their deadlines at different times: each one's
    timer is its own."""
    with _Trickle(scheduler_only, every_s=0.25, tokens=0):
        posts = []
        for _ in range(3):
            posts.append(asyncio.create_task(_post(scheduler_only)))
            await asyncio.sleep(1.0)
        done = await asyncio.gather(*posts)
    for status, body, took in done:
        assert status == 504, body
        assert 3.9 <= took < 10
