"""LoopSocket: a plain ZeroMQ socket driven by the event loop, over real loopback sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import zmq

from transport.loop_socket import LoopSocket
from transport.security import NO_CLIENT_AUTH, NO_SERVER_AUTH
from transport.sockets import bound_endpoint, dealer, router

WAIT_S = 5.0  # generous on a shared machine; success never waits for it


@pytest.fixture
def plain() -> Iterator[zmq.Context]:
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


@pytest.fixture
async def pair(plain: zmq.Context) -> AsyncIterator[tuple[LoopSocket, zmq.Socket]]:
    """A LoopSocket DEALER connected to a plain ROUTER that already knows its identity."""
    peer = router(plain, "tcp://127.0.0.1:0", auth=NO_SERVER_AUTH)
    sock = LoopSocket(dealer(plain, bound_endpoint(peer), auth=NO_CLIENT_AUTH))
    await asyncio.wait_for(sock.send([b"hello"]), WAIT_S)
    assert peer.poll(int(WAIT_S * 1000))
    yield sock, peer
    sock.close()
    peer.close(linger=0)


async def identity_of(peer: zmq.Socket, sock: LoopSocket) -> bytes:
    await asyncio.wait_for(sock.send([b"who"]), WAIT_S)
    assert peer.poll(int(WAIT_S * 1000))
    frames = peer.recv_multipart()
    while frames[1:] != [b"who"]:  # skip the fixture's hello
        assert peer.poll(int(WAIT_S * 1000))
        frames = peer.recv_multipart()
    return frames[0]


async def test_a_message_arriving_while_waiting_wakes_the_receiver(
    pair: tuple[LoopSocket, zmq.Socket],
) -> None:
    sock, peer = pair
    identity = await identity_of(peer, sock)
    receiving = asyncio.create_task(sock.recv_multipart())
    await asyncio.sleep(0.05)
    assert not receiving.done()
    peer.send_multipart([identity, b"one", b"two"])
    frames = await asyncio.wait_for(receiving, WAIT_S)
    assert [f.bytes for f in frames] == [b"one", b"two"]


async def test_messages_already_queued_are_received_without_waiting(
    pair: tuple[LoopSocket, zmq.Socket],
) -> None:
    sock, peer = pair
    identity = await identity_of(peer, sock)
    for i in range(5):
        peer.send_multipart([identity, str(i).encode()])
    got = [(await asyncio.wait_for(sock.recv_multipart(copy=True), WAIT_S))[0] for _ in range(5)]
    assert got == [b"0", b"1", b"2", b"3", b"4"]


async def test_a_send_does_not_swallow_the_wakeup_of_a_waiting_receive(
    pair: tuple[LoopSocket, zmq.Socket],
) -> None:
    """A send processes the socket's pending state, which may reset its descriptor: the waiting
    receive must be woken anyway, or it would wait forever for a message that is already there."""
    sock, peer = pair
    identity = await identity_of(peer, sock)
    receiving = asyncio.create_task(sock.recv_multipart())
    await asyncio.sleep(0.05)
    peer.send_multipart([identity, b"reply"])
    time.sleep(0.2)  # block the loop: the reply arrives and signals the descriptor meanwhile
    sock.send_now([b"request"])  # ... and this consumes that signal before the loop sees it
    frames = await asyncio.wait_for(receiving, WAIT_S)
    assert [f.bytes for f in frames] == [b"reply"]


async def test_send_waits_until_the_socket_can_take_it(plain: zmq.Context, tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/peer"  # nobody listens there yet
    raw = plain.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.IMMEDIATE, 1)  # no queueing before a connection: a send would block
    raw.connect(endpoint)
    sock = LoopSocket(raw)
    try:
        with pytest.raises(zmq.Again):
            sock.send_now([b"too early"])
        sending = asyncio.create_task(sock.send([b"late"]))
        await asyncio.sleep(0.1)
        assert not sending.done()
        peer = plain.socket(zmq.ROUTER)
        peer.setsockopt(zmq.LINGER, 0)
        peer.bind(endpoint)
        try:
            await asyncio.wait_for(sending, WAIT_S)
            assert peer.poll(int(WAIT_S * 1000))
            assert peer.recv_multipart()[1:] == [b"late"]
        finally:
            peer.close(linger=0)
    finally:
        sock.close()


async def test_closing_fails_a_waiting_receive(pair: tuple[LoopSocket, zmq.Socket]) -> None:
    sock, _ = pair
    receiving = asyncio.create_task(sock.recv_multipart())
    await asyncio.sleep(0.05)
    sock.close()
    with pytest.raises(zmq.ZMQError):
        await asyncio.wait_for(receiving, WAIT_S)
    assert sock.closed
    sock.close()  # twice is harmless


async def test_a_cancelled_receive_does_not_disturb_the_next(pair: tuple[LoopSocket, zmq.Socket]) -> None:
    sock, peer = pair
    identity = await identity_of(peer, sock)
    first = asyncio.create_task(sock.recv_multipart())
    second = asyncio.create_task(sock.recv_multipart())
    await asyncio.sleep(0.05)
    first.cancel()
    peer.send_multipart([identity, b"for the second"])
    frames = await asyncio.wait_for(second, WAIT_S)
    assert [f.bytes for f in frames] == [b"for the second"]
    assert first.cancelled()
