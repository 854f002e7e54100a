"""The control server's heartbeats after a connection closes, with a real ROUTER and a real worker
socket in this process."""

from __future__ import annotations

import asyncio

import pytest
import zmq
import zmq.asyncio

from scheduler.cluster import Cluster
from scheduler.control import CLOSED_RECHECK_S, ControlServer
from scheduler.inbox import Inbox
from transport import sockets
from transport.codec import Encoder
from transport.messages import PROTOCOL_VERSION, Hello, Role
from transport.security import NO_CLIENT_AUTH, Security

pytestmark = pytest.mark.timeout(30)

# Long enough that the test is over before a regular heartbeat.
SLOW_BEAT_S = 60.0


async def test_a_close_reported_before_the_router_lets_go_is_checked_again() -> None:
    """libzmq's monitor reports a closed connection from its I/O thread; the ROUTER lets go of it a
    moment later. The beat a close brings may still be taken for a worker that is gone: the beat
    after it, CLOSED_RECHECK_S later, finds it so (without it, the next beat is a minute away)."""
    ctx = zmq.asyncio.Context()
    cluster = Cluster(heartbeat_interval_s=SLOW_BEAT_S, heartbeat_liveness=3, on_lost=lambda *_: None)
    control = ControlServer(
        ctx,
        bind="tcp://127.0.0.1:0",
        security=Security.insecure(),
        cluster=cluster,
        inbox=Inbox(),
        heartbeat_interval_s=SLOW_BEAT_S,
        heartbeat_liveness=3,
    )
    await control.start()
    worker = sockets.dealer(sockets.plain_context(ctx), control.endpoint, auth=NO_CLIENT_AUTH)
    try:
        hello = Hello(
            protocol_version=PROTOCOL_VERSION,
            worker_id="decode-0",
            role=Role.DECODE,
            engine="sim",
            model="m",
            kv_bytes_per_token=1000,
            block_size=16,
            capacity_blocks=1000,
        )
        worker.send_multipart(Encoder().encode(hello))
        assert await asyncio.to_thread(worker.poll, 5000), "no Welcome"
        worker.recv_multipart()
        assert cluster.get("decode-0") is not None
        # The close reported while the connection is still there (as when the report outruns the
        # ROUTER): the beat it brings goes out and is taken.
        await control._watch.close()  # no report of the real close below
        control._closed.set()
        assert await asyncio.to_thread(worker.poll, 5000), "no early heartbeat"
        worker.close(linger=0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10 * CLOSED_RECHECK_S + 2.0
        while cluster.get("decode-0") is not None:
            assert loop.time() < deadline, "a closed connection's worker stayed until a regular beat"
            await asyncio.sleep(0.02)
    finally:
        if not worker.closed:
            worker.close(linger=0)
        await control.close()
        ctx.destroy(linger=0)
