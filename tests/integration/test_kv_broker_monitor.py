"""The scheduler's watch on the KV broker, against a real broker on loopback: it sees the broker,
notices at once when it goes away (its connection closes), notices one that goes silent with its
connection open, and notices a restart (a new instance on the same address)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import zmq
import zmq.asyncio

from scheduler.kv_broker_monitor import KvBrokerMonitor
from tests.support.kv import wait_until
from tests.support.security import INSECURE
from transport.codec import Encoder
from transport.kv.broker import KvBroker
from transport.kv.messages import KvPong
from transport.security import NO_CLIENT_AUTH

INTERVAL_S = 0.05


async def _broker_on(ctx: zmq.asyncio.Context, endpoint: str) -> KvBroker:
    """A broker on the address another one just left (libzmq releases a port asynchronously)."""
    for _ in range(100):
        broker = KvBroker(ctx, security=INSECURE, bind=endpoint, capacity_bytes=1 << 20, ttl_s=60)
        try:
            await broker.start()
            return broker
        except zmq.ZMQError:
            await broker.close()
            await asyncio.sleep(0.05)
    raise AssertionError(f"{endpoint} stayed in use")


@contextlib.asynccontextmanager
async def _watching(
    ctx: zmq.asyncio.Context, endpoint: str, liveness: int
) -> AsyncIterator[tuple[KvBrokerMonitor, list[str]]]:
    """A monitor on ``endpoint`` and the losses it reports, in order."""
    lost: list[str] = []
    monitor = KvBrokerMonitor(
        ctx, endpoint, auth=NO_CLIENT_AUTH, interval_s=INTERVAL_S, liveness=liveness, on_lost=lost.append
    )
    await monitor.start()
    try:
        yield monitor, lost
    finally:
        await monitor.close()


@contextlib.asynccontextmanager
async def _answering_peer(ctx: zmq.asyncio.Context) -> AsyncIterator[tuple[zmq.asyncio.Socket, str]]:
    """A ROUTER that plays the broker by hand (it answers only what the test makes it answer)."""
    peer = ctx.socket(zmq.ROUTER)
    port = peer.bind_to_random_port("tcp://127.0.0.1")
    try:
        yield peer, f"tcp://127.0.0.1:{port}"
    finally:
        peer.close(linger=0)


async def _answer(peer: zmq.asyncio.Socket, instance: str) -> None:
    """Answer the next ping as broker ``instance``."""
    identity, *_ = await asyncio.wait_for(peer.recv_multipart(), 5)
    await peer.send_multipart([identity, *Encoder().encode(KvPong(nonce=1, instance=instance))])


async def test_monitor_sees_the_broker_go_and_come_back_as_another(ctx: zmq.asyncio.Context) -> None:
    first = KvBroker(ctx, security=INSECURE, bind="tcp://127.0.0.1:0", capacity_bytes=1 << 20, ttl_s=60)
    await first.start()
    async with _watching(ctx, first.endpoint, liveness=4) as (monitor, lost):
        await wait_until(lambda: monitor.reachable)
        assert monitor.instance == first.instance and not lost
        await first.close()
        await wait_until(lambda: not monitor.reachable)
        assert lost == ["closed the connection"]
        second = await _broker_on(ctx, first.endpoint)
        try:
            await wait_until(lambda: monitor.reachable)
            assert monitor.instance == second.instance != first.instance
            # Noticed again: handoffs sent through it while it was away (to decode workers that
            # take KV only through it) are lost with the restart too.
            assert lost == ["closed the connection", "restarted (its transfers are gone)"]
            assert monitor.losses == 1, "one outage"
        finally:
            await second.close()


async def test_an_answer_from_another_instance_is_a_restart(ctx: zmq.asyncio.Context) -> None:
    """A restart between two pings whose connection's closing went unseen: the instance tells."""
    async with (
        _answering_peer(ctx) as (peer, endpoint),
        _watching(ctx, endpoint, liveness=1000) as (monitor, lost),
    ):
        await _answer(peer, "a")
        await wait_until(lambda: monitor.instance == "a")
        await _answer(peer, "b")
        await wait_until(lambda: monitor.instance == "b")
        assert lost == ["restarted (its transfers are gone)"] and monitor.reachable
        assert monitor.losses == 1


async def test_a_broker_that_dies_is_noticed_at_once_not_after_its_silence(ctx: zmq.asyncio.Context) -> None:
    broker = KvBroker(ctx, security=INSECURE, bind="tcp://127.0.0.1:0", capacity_bytes=1 << 20, ttl_s=60)
    await broker.start()
    # Silence would take 1,000 intervals (50 s) to tell.
    async with _watching(ctx, broker.endpoint, liveness=1000) as (monitor, lost):
        await wait_until(lambda: monitor.reachable)
        await broker.close()
        await wait_until(lambda: bool(lost), timeout_s=5.0)
        assert lost == ["closed the connection"] and not monitor.reachable


async def test_a_broker_gone_silent_with_its_connection_open_is_noticed(ctx: zmq.asyncio.Context) -> None:
    """Hung, or cut off without its connection closing: only its silence tells."""
    async with (
        _answering_peer(ctx) as (peer, endpoint),
        _watching(ctx, endpoint, liveness=4) as (monitor, lost),
    ):
        await _answer(peer, "b")
        await wait_until(lambda: monitor.reachable)
        await wait_until(lambda: bool(lost))  # no answer again, the connection open
        assert lost == [f"silent for {INTERVAL_S * 4:g}s"] and not monitor.reachable


class _Answers:
    """A socket whose first receive waits for ``first``; later ones never end."""

    def __init__(self, first: asyncio.Future[list[bytes]]) -> None:
        self._pending = [first]

    async def recv_multipart(self) -> list[bytes]:
        return await (self._pending.pop() if self._pending else asyncio.get_running_loop().create_future())


async def test_closing_as_an_answer_arrives_still_stops_the_monitor(ctx: zmq.asyncio.Context) -> None:
    """close() cancels the monitor; an answer landing in the same turn of the event loop must not
    swallow that cancellation (asyncio.wait_for does, on Python 3.11), or close() never returns."""
    monitor = KvBrokerMonitor(
        ctx, "tcp://127.0.0.1:9", auth=NO_CLIENT_AUTH, interval_s=60, liveness=4, on_lost=lambda _: None
    )
    first: asyncio.Future[list[bytes]] = asyncio.get_running_loop().create_future()
    listening = asyncio.create_task(monitor._listen(_Answers(first), monitor._clock() + 60))  # type: ignore[arg-type]
    await asyncio.sleep(0)  # waiting for the first answer
    first.set_result(Encoder().encode(KvPong(nonce=1, instance="b")))
    listening.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(listening, 5)
