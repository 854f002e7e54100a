"""A worker agent sends the job messages it makes in one turn of its event loop as one message,
and drops none when the scheduler falls behind.

A real agent (the zero-cost sim engine) registers with a ROUTER socket that plays the scheduler, on
loopback. The messages are put in through the agent's send path, as its engine does, in a known
order within one turn; then a real job shows the shape the scheduler sees.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import zmq
import zmq.asyncio

from transport import sockets
from transport.codec import Decoder, Encoder
from transport.messages import (
    MAX_JOB_MESSAGES,
    PROTOCOL_VERSION,
    Draining,
    FromWorker,
    GenerateJob,
    Goodbye,
    Heartbeat,
    Hello,
    JobError,
    JobMessages,
    KvLoaded,
    Role,
    SamplingParams,
    TokenOutput,
    Welcome,
)
from transport.security import Security
from workers.agent import Agent, AgentConfig
from workers.engines.sim.config import SimEngineConfig
from workers.engines.sim.engine import SimulatedEngine


@dataclass
class Scheduler:
    """The scheduler's end: a ROUTER the agent has registered with."""

    sock: zmq.asyncio.Socket
    identity: bytes
    agent: Agent

    async def recv(self, timeout_s: float = 5.0) -> FromWorker:
        """The next message that is not a heartbeat."""
        dec: Decoder[FromWorker] = Decoder(FromWorker)
        async with asyncio.timeout(timeout_s):
            while True:
                frames = await self.sock.recv_multipart(copy=False)
                msg = dec.decode(frames[1:])
                if not isinstance(msg, Heartbeat):
                    return msg

    async def send(self, msg: object) -> None:
        await self.sock.send_multipart([self.identity, *Encoder().encode(msg)])


@contextlib.asynccontextmanager
async def _registered(
    time_scale: float, stop: asyncio.Event
) -> AsyncIterator[tuple[Scheduler, asyncio.Task[int]]]:
    """A real agent registered with the test's ROUTER, and the task running it until ``stop``."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:0")
    endpoint = sockets.bound_endpoint(sock)
    cfg = AgentConfig(scheduler=endpoint, worker_id="w", role=Role.BOTH)
    engine = SimulatedEngine(SimEngineConfig(time_scale=time_scale))
    agent = Agent(cfg, engine, ctx, security=Security.insecure())
    running = asyncio.create_task(agent.run(stop))
    try:
        async with asyncio.timeout(10):
            identity, *frames = await sock.recv_multipart()
        assert isinstance(Decoder(FromWorker).decode(frames), Hello)
        s = Scheduler(sock, identity, agent)
        await s.send(Welcome(PROTOCOL_VERSION, "w", heartbeat_interval_s=30.0, heartbeat_liveness=10))
        await asyncio.wait_for(agent.registered.wait(), 10)
        yield s, running
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(running, 10)
        sock.close()
        ctx.term()


@pytest.fixture
async def scheduler() -> AsyncIterator[Scheduler]:
    async with _registered(0.0, asyncio.Event()) as (s, _):
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
    async with _registered(1.0, stop) as (scheduler, running):  # modelled time: the job takes a while
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
    async with _registered(0.0, stop) as (scheduler, running):
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
