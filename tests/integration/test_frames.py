"""Multipart send and receive through the sockets' compiled methods behave as pyzmq's own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import zmq

from transport.frames import NOBLOCK, POLLIN, POLLOUT, events, recv_frames, send_frames


@pytest.fixture
def pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    for s in (a, b):
        s.setsockopt(zmq.LINGER, 0)
    a.bind("inproc://frames")
    b.connect("inproc://frames")
    yield a, b
    a.close()
    b.close()
    ctx.term()


MESSAGES = [
    [b"one"],
    [b"", b"x" * 100_000, b""],
    [memoryview(b"header"), bytearray(b"body"), zmq.Frame(b"frame")],
]


@pytest.mark.parametrize("message", MESSAGES)
def test_what_is_sent_is_what_pyzmq_receives_and_back(
    pair: tuple[zmq.Socket, zmq.Socket], message: list
) -> None:
    a, b = pair
    want = [bytes(m.bytes if isinstance(m, zmq.Frame) else m) for m in message]
    send_frames(a, message)
    assert b.recv_multipart() == want
    b.send_multipart(want)
    frames = recv_frames(a)
    assert all(isinstance(f, zmq.Frame) for f in frames)
    assert [f.bytes for f in frames] == want
    b.send_multipart(want)
    assert recv_frames(a, copy=True) == want


def test_messages_stay_whole_and_in_order(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    for i in range(50):
        send_frames(a, [str(i).encode(), b"-" * i, b"end"])
    got = [recv_frames(b, copy=True) for _ in range(50)]
    assert got == [[str(i).encode(), b"-" * i, b"end"] for i in range(50)]


def test_nothing_to_receive_without_blocking_is_again(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    with pytest.raises(zmq.Again):
        recv_frames(pair[0], NOBLOCK)


def test_events_are_plain_ints_that_say_what_the_socket_allows(pair: tuple[zmq.Socket, zmq.Socket]) -> None:
    a, b = pair
    assert type(events(b)) is int and events(b) & POLLOUT and not events(b) & POLLIN
    send_frames(a, [b"x"])
    assert events(b) & POLLIN
    recv_frames(b)
    assert not events(b) & POLLIN


def test_a_full_queue_refuses_the_whole_message_without_blocking() -> None:
    ctx = zmq.Context()
    a = ctx.socket(zmq.PUSH)
    a.setsockopt(zmq.LINGER, 0)
    a.setsockopt(zmq.SNDHWM, 1)
    a.bind("inproc://full")  # no peer: nothing is ever taken
    try:
        with pytest.raises(zmq.Again):
            for _ in range(10):
                send_frames(a, [b"a", b"b"], NOBLOCK)
    finally:
        a.close()
        ctx.term()


def test_a_router_names_an_unknown_peer_and_a_closed_socket_fails() -> None:
    ctx = zmq.Context()
    r = ctx.socket(zmq.ROUTER)
    r.setsockopt(zmq.LINGER, 0)
    r.setsockopt(zmq.ROUTER_MANDATORY, 1)
    r.bind("inproc://router")
    try:
        with pytest.raises(zmq.ZMQError) as e:
            send_frames(r, [b"nobody", b"hello"], NOBLOCK)
        assert e.value.errno == zmq.EHOSTUNREACH
    finally:
        r.close()
    with pytest.raises(zmq.ZMQError) as closed:
        recv_frames(r, NOBLOCK)
    assert closed.value.errno == zmq.ENOTSOCK
    ctx.term()
