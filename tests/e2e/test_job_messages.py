"""The scheduler takes a worker's job messages sent together as one (JobMessages) as those messages
in order, and drops one that carries more than the protocol allows, counting it as malformed.

A real scheduler process; a hand-driven worker answers its jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import aiohttp
import pytest

from pdorch.launcher import LocalCluster
from tests.e2e.conftest import start_scheduler_only
from tests.e2e.helpers import MODEL, metric
from tests.support.fake_worker import FakeWorker
from transport.messages import (
    MAX_JOB_MESSAGES,
    FinishReason,
    GenerateJob,
    JobError,
    JobMessages,
    Role,
    TokenOutput,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def scheduler_only(tmp_path) -> Iterator[LocalCluster]:
    c = start_scheduler_only(tmp_path, "token_timeout_s: 2.0\nrequest_timeout_s: 6.0\n")
    yield c
    c.stop()


async def _complete(cluster: LocalCluster, max_tokens: int) -> tuple[int, dict]:
    body = {"model": MODEL, "prompt": "batched", "max_tokens": max_tokens, "ignore_eos": True}
    body |= {"return_token_ids": True}
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s,
        s.post(cluster.url + "/v1/completions", json=body) as r,
    ):
        return r.status, await r.json()


@contextlib.asynccontextmanager
async def _one_job(
    cluster: LocalCluster, max_tokens: int
) -> AsyncIterator[tuple[FakeWorker, GenerateJob, asyncio.Task[tuple[int, dict]]]]:
    """A worker registered, a request sent, its job at the worker: (worker, job, the request)."""
    worker = FakeWorker(cluster, "both", role=Role.BOTH, capacity_blocks=10_000)
    try:
        worker.register()
        request = asyncio.create_task(_complete(cluster, max_tokens))
        yield worker, await asyncio.to_thread(worker.recv_until, GenerateJob), request
    finally:
        worker.close()


async def test_job_messages_sent_as_one_are_taken_in_order(scheduler_only: LocalCluster) -> None:
    async with _one_job(scheduler_only, 3) as (worker, job, request):
        stray = JobError("not-a-job-of-ours", "internal", "ignored")  # unknown ids are dropped
        tokens = [TokenOutput(job.request_id, [65]), TokenOutput(job.request_id, [66])]
        last = TokenOutput(job.request_id, [67], finish_reason=FinishReason.LENGTH)
        worker.send(JobMessages([tokens[0], stray, tokens[1], last]))
        status, body = await request
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == [65, 66, 67]
        assert body["choices"][0]["finish_reason"] == "length"


async def test_more_job_messages_than_allowed_in_one_are_dropped(scheduler_only: LocalCluster) -> None:
    async with _one_job(scheduler_only, 1) as (worker, job, request):
        answer = TokenOutput(job.request_id, [65], finish_reason=FinishReason.LENGTH)
        worker.send(JobMessages([answer] * (MAX_JOB_MESSAGES + 1)))
        async with aiohttp.ClientSession() as s:
            for _ in range(500):
                if await metric(s, scheduler_only.url, "pdorch_control_bad_messages") >= 1:
                    break
                await asyncio.sleep(0.02)
            assert await metric(s, scheduler_only.url, "pdorch_control_bad_messages") == 1
        assert not request.done()  # nothing of the dropped message reached the request
        worker.send(answer)
        status, body = await request
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == [65]


async def test_tokens_after_a_lost_message_resume_the_request_without_a_gap(
    scheduler_only: LocalCluster,
) -> None:
    """Tokens whose output index is not the next one (a message before them was lost) are not
    taken: the attempt fails and the request resumes from the tokens it has."""
    async with _one_job(scheduler_only, 3) as (worker, job, request):
        worker.send(TokenOutput(job.request_id, [65], index=0))
        worker.send(TokenOutput(job.request_id, [67], finish_reason=FinishReason.LENGTH, index=2))
        resumed = await asyncio.to_thread(worker.recv_until, GenerateJob)
        assert resumed.generated == 1 and resumed.prompt_token_ids[-1] == 65
        end = TokenOutput(resumed.request_id, [66, 67], finish_reason=FinishReason.LENGTH, index=1)
        worker.send(end)
        status, body = await request
        assert status == 200, body
        assert body["choices"][0]["token_ids"] == [65, 66, 67]
        async with aiohttp.ClientSession() as s:
            assert await metric(s, scheduler_only.url, "pdorch_migrations_total", recovery="resume") == 1
