"""A worker agent sends the job messages it makes in one turn of its event loop as one message,
and drops none when the scheduler falls behind.

A real agent (the zero-cost sim engine) registers with a ROUTER socket that plays the scheduler, on
loopback. The messages are put in through the agent's send path, as its engine does, in a known
order within one turn; then a real job shows the shape the scheduler sees.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.support.agent import Scheduler, registered_agent
from transport.messages import (
    MAX_JOB_MESSAGES,
    Draining,
    FromWorker,
    GenerateJob,
    Goodbye,
    Heartbeat,
    JobError,
    JobMessages,
    KvLoaded,
    SamplingParams,
    TokenOutput,
)


@pytest.fixture
async def scheduler() -> AsyncIterator[Scheduler]:
    async with registered_agent(0.0, asyncio.Event()) as (s, _):
        yield s


async def test_job_messages_of_one_turn_leave_as_one_message_in_order(scheduler: Scheduler) -> None:
    made = [TokenOutput("a", [5, 6]), KvLoaded("b", first_token=7), JobError("c", "internal", "x")]
    for msg in made:
        scheduler.agent._send(msg)  # as the engine does, all in this one turn of the loop
    got = await scheduler.recv()
    assert isinstance(got, JobMessages)
    assert got.messages == made


async def test_a_lone_job_message_leaves_as_itself(scheduler: Scheduler) -> None:
    scheduler.agent._send(TokenOutput("a", [5]))
    assert await scheduler.recv() == TokenOutput("a", [5])


async def test_a_message_that_leaves_at_once_goes_after_what_was_waiting(scheduler: Scheduler) -> None:
    scheduler.agent._send(TokenOutput("a", [5]))
    scheduler.agent._send(Heartbeat())  # not a job message: sent at once, what waits first
    assert await scheduler.recv() == TokenOutput("a", [5])
    with pytest.raises(TimeoutError):  # nothing left to send at the end of the turn
        await scheduler.recv(timeout_s=0.3)


async def test_more_than_one_message_holds_is_split(scheduler: Scheduler) -> None:
    made = [TokenOutput(f"r{i}", [i]) for i in range(MAX_JOB_MESSAGES + 1)]
    for msg in made:
        scheduler.agent._send(msg)
    first, second = await scheduler.recv(), await scheduler.recv()
    assert isinstance(first, JobMessages) and first.messages == made[:MAX_JOB_MESSAGES]
    assert second == made[-1]


async def test_a_first_token_leaves_at_once_after_what_was_waiting(scheduler: Scheduler) -> None:
    """A request's first token waits for nothing (its time to first token), and the order holds."""
    scheduler.agent._first_pending.add("p")  # as a prefill job's start marks it
    scheduler.agent._send(TokenOutput("a", [5]))
    scheduler.agent._send(TokenOutput("p", [9]))
    assert await scheduler.recv() == TokenOutput("a", [5])
    assert await scheduler.recv() == TokenOutput("p", [9])


async def test_a_job_answers_through_it_whole(scheduler: Scheduler) -> None:
    """Its tokens arrive whole, each message saying where its tokens are in the output (a resumed
    job's count from its ``generated``)."""
    await scheduler.send(
        GenerateJob("g", [1, 2, 3, 120, 121], SamplingParams(max_tokens=16, ignore_eos=True), generated=2)
    )
    tokens: list[int] = [120, 121]  # the output so far
    finish = None
    while finish is None:
        msg = await scheduler.recv()
        for m in msg.messages if isinstance(msg, JobMessages) else [msg]:
            assert isinstance(m, TokenOutput) and m.request_id == "g"
            assert m.index == len(tokens)  # where its tokens are in the request's output
            tokens += m.token_ids
            finish = m.finish_reason
    assert len(tokens) == 16


async def test_nothing_is_dropped_when_the_scheduler_falls_behind(scheduler: Scheduler) -> None:
    """More than the queues to the scheduler hold (its socket's and the agent's high-water marks,
    the kernel's buffers), sent while the scheduler reads nothing: all of it arrives, in order."""
    tokens = list(range(100_000, 102_000))  # ~10 KB a message
    made = [TokenOutput(f"r{i}", tokens) for i in range(3_000)]
    for msg in made:
        scheduler.agent._send_now(msg)  # each on its own, at once
    assert scheduler.agent._backlog  # the queues filled up: the rest waits
    got = [await scheduler.recv(timeout_s=30) for _ in made]
    assert [m.request_id for m in got] == [m.request_id for m in made]
    assert not scheduler.agent._backlog


async def test_an_agent_told_to_stop_drains_its_jobs_and_says_goodbye() -> None:
    """Stopping (SIGTERM in a worker process) tells the scheduler it is draining, lets the job in
    flight finish, says Goodbye and ends the agent cleanly."""
    stop = asyncio.Event()
    async with registered_agent(1.0, stop) as (scheduler, running):  # modelled time: the job takes a while
        await scheduler.send(GenerateJob("g", [1, 2, 3], SamplingParams(max_tokens=32, ignore_eos=True)))
        first = await scheduler.recv()  # its first token: the job is running
        assert isinstance(first, TokenOutput) and first.request_id == "g"
        stop.set()
        got: list[FromWorker] = []
        while not got or not isinstance(got[-1], Goodbye):
            msg = await scheduler.recv(timeout_s=20)
            got += msg.messages if isinstance(msg, JobMessages) else [msg]
        assert isinstance(got[0], Draining)
        tokens = [t for m in got if isinstance(m, TokenOutput) for t in m.token_ids]
        assert len(first.token_ids) + len(tokens) == 32  # the job finished before the Goodbye
        assert await asyncio.wait_for(running, 10) == 0


async def test_an_agent_told_to_stop_behind_a_backlog_says_goodbye_after_it() -> None:
    """The scheduler is behind when the agent is told to stop: what waits for room still leaves,
    in order, and Goodbye after it, before the agent closes its socket."""
    stop = asyncio.Event()
    async with registered_agent(0.0, stop) as (scheduler, running):
        tokens = list(range(100_000, 102_000))  # ~10 KB a message
        made = [TokenOutput(f"r{i}", tokens) for i in range(3_000)]
        for msg in made:
            scheduler.agent._send_now(msg)
        assert scheduler.agent._backlog  # the queues are full: the rest waits
        stop.set()
        await asyncio.sleep(0.5)  # still behind while the agent drains and says Goodbye
        got: list[FromWorker] = []
        while not got or not isinstance(got[-1], Goodbye):
            got.append(await scheduler.recv(timeout_s=10))
        assert [m.request_id for m in got if isinstance(m, TokenOutput)] == [m.request_id for m in made]
        assert isinstance(got[-2], Draining)
        assert await asyncio.wait_for(running, 10) == 0
