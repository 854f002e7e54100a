"""Socket helpers: options applied, port 0 resolved, wildcard hosts advertised."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator

import pytest
import zmq
import zmq.asyncio

from transport.codec import MAX_FRAME_BYTES
from transport.security import NO_CLIENT_AUTH, NO_SERVER_AUTH
from transport.sockets import (
    _threads,
    advertised_endpoint,
    bound_endpoint,
    dealer,
    new_context,
    normalize_bind,
    router,
)


@pytest.fixture
async def ctx() -> AsyncIterator[zmq.asyncio.Context]:
    context = zmq.asyncio.Context()
    yield context
    context.destroy(linger=0)


@pytest.mark.parametrize("bind", ["tcp://127.0.0.1:0", "tcp://127.0.0.1:*"])
async def test_router_binds_a_free_port_and_reports_it(ctx: zmq.asyncio.Context, bind: str) -> None:
    sock = router(ctx, bind, auth=NO_SERVER_AUTH)
    endpoint = bound_endpoint(sock)
    host, _, port = endpoint.rpartition(":")
    assert host == "tcp://127.0.0.1" and int(port) > 0
    assert sock.getsockopt(zmq.LINGER) == 0
    assert sock.getsockopt(zmq.MAXMSGSIZE) == MAX_FRAME_BYTES
    assert sock.getsockopt(zmq.TCP_KEEPALIVE) == 1
    sock.close()


async def test_router_refuses_to_send_to_an_unknown_peer(ctx: zmq.asyncio.Context) -> None:
    sock = router(ctx, "tcp://127.0.0.1:0", auth=NO_SERVER_AUTH)
    with pytest.raises(zmq.ZMQError) as info:
        await sock.send_multipart([b"nobody", b"x"], flags=zmq.NOBLOCK)
    assert info.value.errno == zmq.EHOSTUNREACH
    sock.close()


async def test_dealer_with_identity_reaches_the_router(ctx: zmq.asyncio.Context) -> None:
    server = router(ctx, "tcp://127.0.0.1:0", auth=NO_SERVER_AUTH)
    client = dealer(ctx, bound_endpoint(server), auth=NO_CLIENT_AUTH, identity=b"worker-1")
    await client.send(b"hello")
    identity, payload = await server.recv_multipart()
    assert (identity, payload) == (b"worker-1", b"hello")
    client.close()
    server.close()


def test_endpoint_helpers() -> None:
    assert normalize_bind("tcp://0.0.0.0:0") == "tcp://0.0.0.0:*"
    assert normalize_bind("tcp://0.0.0.0:5700") == "tcp://0.0.0.0:5700"
    assert advertised_endpoint("tcp://0.0.0.0:5700", "10.1.2.3") == "tcp://10.1.2.3:5700"
    assert advertised_endpoint("tcp://127.0.0.1:5700", "10.1.2.3") == "tcp://127.0.0.1:5700"


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_a_new_context_runs_its_threads_as_batch_work() -> None:
    before = _threads()
    other = zmq.Context()  # another library's context in the same process
    other.socket(zmq.PAIR).close(linger=0)
    others = _threads() - before
    context = new_context()
    try:
        started = _threads() - before - others
        assert started, "the context's threads run once new_context returns"
        # Only ZeroMQ's (its I/O thread and reaper, named once they run): another test's thread
        # may start in this process meanwhile.
        ours = _named_zmq(started)
        assert len(ours) >= 2 and {os.sched_getscheduler(tid) for tid in ours} == {os.SCHED_BATCH}
        assert others and os.SCHED_BATCH not in {os.sched_getscheduler(tid) for tid in others}
    finally:
        context.destroy(linger=0)
        other.destroy(linger=0)


def _named_zmq(tids: set[int], timeout_s: float = 5.0) -> set[int]:
    """Those of ``tids`` that are ZeroMQ's threads ("ZMQbg/..."), once at least two have named
    themselves."""
    deadline = time.monotonic() + timeout_s
    while True:
        named = set()
        for tid in tids:
            try:
                with open(f"/proc/self/task/{tid}/comm") as f:
                    if f.read().startswith("ZMQbg"):
                        named.add(tid)
            except OSError:
                pass  # ended meanwhile
        if len(named) >= 2 or time.monotonic() > deadline:
            return named
        time.sleep(0.01)
