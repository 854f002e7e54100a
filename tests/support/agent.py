"""A real worker agent registered with a ROUTER socket that plays the scheduler, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.asyncio

from transport import sockets
from transport.codec import Decoder, Encoder
from transport.kv import KvReceiver
from transport.messages import PROTOCOL_VERSION, FromWorker, Heartbeat, Hello, Role, Welcome
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
async def registered_agent(
    time_scale: float, stop: asyncio.Event, kv_receiver: KvReceiver | None = None, **cfg: Any
) -> AsyncIterator[tuple[Scheduler, asyncio.Task[int]]]:
    """A real agent (the sim engine, ``time_scale``; ``cfg``: more of its config) registered with
    the test's ROUTER, and the task running it until ``stop``."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:0")
    endpoint = sockets.bound_endpoint(sock)
    config = AgentConfig(scheduler=endpoint, worker_id="w", role=Role.BOTH, **cfg)
    engine = SimulatedEngine(SimEngineConfig(time_scale=time_scale))
    agent = Agent(config, engine, ctx, security=Security.insecure(), kv_receiver=kv_receiver)
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
