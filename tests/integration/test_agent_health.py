"""A worker whose KV endpoint stops is dead, as one whose engine is: it says so (``WorkerFatal``)
and exits with an error, so that what runs it starts it again, instead of going on taking jobs
whose handoffs it can no longer receive."""

from __future__ import annotations

import asyncio

import zmq.asyncio

from tests.support.agent import registered_agent
from tests.support.security import INSECURE
from transport.kv import KvReceiver
from transport.messages import WorkerFatal


async def test_a_worker_whose_kv_endpoint_stopped_reports_itself_dead() -> None:
    ctx = zmq.asyncio.Context()
    receiver = KvReceiver(ctx, security=INSECURE, bind="tcp://127.0.0.1:0")
    await receiver.start()
    try:
        async with registered_agent(0.0, asyncio.Event(), receiver, health_interval_s=0.05) as (s, running):
            await asyncio.sleep(0.2)
            assert not running.done(), "a healthy worker went on"
            assert receiver.alive
            await receiver._p2p.close()  # type: ignore[union-attr]  # its thread ends, as on a crash
            assert not receiver.alive
            assert isinstance(await s.recv(), WorkerFatal)
            assert await asyncio.wait_for(running, 10) == 1
    finally:
        await receiver.close()
        ctx.term()
