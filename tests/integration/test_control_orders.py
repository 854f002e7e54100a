"""The scheduler sends the jobs and cancels it makes for a worker in one turn of its event loop as
one message (JobOrders), in order, after nothing it sent earlier and before anything it sends later;
orders for a worker dropped before the turn ends go nowhere, and a worker found gone then is dropped.

The scheduler's real control server on loopback; a DEALER registered with it plays the worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import pytest
import zmq
import zmq.asyncio

from scheduler.cluster import Cluster
from scheduler.control import ControlServer
from scheduler.inbox import Inbox
from transport import sockets
from transport.codec import Decoder, Encoder
from transport.messages import (
    MAX_JOB_MESSAGES,
    PROTOCOL_VERSION,
    Cancel,
    DecodeJob,
    Disconnect,
    Heartbeat,
    Hello,
    JobOrders,
    KvMode,
    KvRoute,
    PrefillJob,
    Role,
    SamplingParams,
    ToWorker,
    Welcome,
)
from transport.security import NO_CLIENT_AUTH, Security

WAIT_S = 5.0


@dataclass
class Rig:
    control: ControlServer
    cluster: Cluster
    worker: zmq.asyncio.Socket  # the worker's DEALER, registered as "w"

    async def recv(self, timeout_s: float = WAIT_S) -> ToWorker:
        """The next message that is not a heartbeat, as sent."""
        dec: Decoder[ToWorker] = Decoder(ToWorker)
        async with asyncio.timeout(timeout_s):
            while True:
                msg = dec.decode(await self.worker.recv_multipart(copy=False))
                if not isinstance(msg, Heartbeat):
                    return msg


@pytest.fixture
async def rig() -> AsyncIterator[Rig]:
    ctx = zmq.asyncio.Context()
    inbox = Inbox()
    cluster = Cluster(heartbeat_interval_s=30.0, heartbeat_liveness=10, on_lost=inbox.workers_lost)
    control = ControlServer(
        ctx,
        bind="tcp://127.0.0.1:0",
        security=Security.insecure(),
        cluster=cluster,
        inbox=inbox,
        heartbeat_interval_s=30.0,
        heartbeat_liveness=10,
    )
    await control.start()
    worker = sockets.dealer(ctx, control.endpoint, auth=NO_CLIENT_AUTH)
    try:
        hello = Hello(PROTOCOL_VERSION, "w", Role.BOTH, "sim", "m", 4096, 16, 1000, kv_endpoint="tcp://x:1")
        await worker.send_multipart(Encoder().encode(hello))
        rig = Rig(control, cluster, worker)
        assert isinstance(await rig.recv(), Welcome)
        yield rig
    finally:
        worker.close(linger=0)
        await control.close()
        ctx.term()


def _prefill(rid: str) -> PrefillJob:
    return PrefillJob(rid, np.arange(5, dtype=np.int32), SamplingParams(max_tokens=4))


def _decode(rid: str) -> DecodeJob:
    return DecodeJob(
        rid,
        np.arange(5, dtype=np.int32),
        SamplingParams(max_tokens=4),
        KvRoute(KvMode.P2P, "tcp://127.0.0.1:9", "t-" + rid),
    )


async def test_orders_of_one_turn_leave_as_one_message_in_order(rig: Rig) -> None:
    made = [_decode("a"), _prefill("b"), Cancel("a")]
    for msg in made:
        rig.control.send("w", msg)  # all in this one turn of the loop, as placement makes them
    got = await rig.recv()
    assert isinstance(got, JobOrders)
    assert [type(m) for m in got.messages] == [DecodeJob, PrefillJob, Cancel]
    assert [m.request_id for m in got.messages] == ["a", "b", "a"]
    assert got.messages[0].kv.transfer_id == "t-a"
    assert got.messages[1].prompt_token_ids.tolist() == [0, 1, 2, 3, 4]  # arrays travel inside
    with pytest.raises(TimeoutError):
        await rig.recv(timeout_s=0.3)


async def test_a_lone_order_leaves_as_itself(rig: Rig) -> None:
    rig.control.send("w", Cancel("a"))
    assert await rig.recv() == Cancel("a")


async def test_a_message_sent_at_once_goes_after_the_orders_made_before_it(rig: Rig) -> None:
    rig.control.send("w", Cancel("a"))
    rig.control.send("w", Disconnect("bye"))  # not an order: at once, after what waits
    rig.control.send("w", Cancel("b"))  # waits for the end of the turn
    assert await rig.recv() == Cancel("a")
    assert await rig.recv() == Disconnect("bye")
    assert await rig.recv() == Cancel("b")


async def test_more_orders_than_one_message_holds_are_split(rig: Rig) -> None:
    made = [Cancel(f"r{i}") for i in range(MAX_JOB_MESSAGES + 1)]
    for msg in made:
        rig.control.send("w", msg)
    first, second = await rig.recv(), await rig.recv()
    assert isinstance(first, JobOrders) and first.messages == made[:MAX_JOB_MESSAGES]
    assert second == made[-1]


async def test_orders_for_a_worker_dropped_before_the_turn_ends_go_nowhere(rig: Rig) -> None:
    rig.control.send("w", _prefill("a"))
    rig.cluster.drop_worker("w", "test")  # e.g. its heartbeats expired in this same turn
    await asyncio.sleep(0.05)  # the turn is over
    await rig.worker.send_multipart(Encoder().encode(Heartbeat()))
    # The first thing it hears is that it is no longer registered: the job never left.
    got = await rig.recv()
    assert isinstance(got, Disconnect) and got.code == "unknown_worker"


async def test_a_worker_found_gone_when_its_orders_leave_is_dropped(rig: Rig) -> None:
    rig.worker.close(linger=0)
    for _ in range(200):  # until the ROUTER has seen the connection go
        if not rig.control._connected(rig.cluster.get("w").identity):
            break
        await asyncio.sleep(0.02)
    rig.control.send("w", _prefill("a"))
    assert rig.cluster.get("w") is not None  # the order waits for the end of the turn
    await asyncio.sleep(0.05)
    assert rig.cluster.get("w") is None
