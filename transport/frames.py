"""Multipart messages in and out of a plain ZeroMQ socket, at the cost of the C calls alone.

pyzmq's ``send_multipart`` and ``recv_multipart`` spend more time in Python than in libzmq: each
frame goes through a Python-level ``send`` wrapper, its flags are combined as ``enum.Flag``
values (``SNDMORE | NOBLOCK`` builds a new enum member, ~3 us), and every received frame asks the
socket ``RCVMORE`` through an option lookup by enum (~3 us). On the hot path that was ~22 us per
three-frame message sent and received against ~8 us for the same C calls. These call the
socket's compiled methods with plain integer flags and read ``Frame.more``; the bytes sent and
received, the errors raised and the atomicity of a multipart message are the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import zmq
import zmq.backend

NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
POLLIN = int(zmq.POLLIN)
POLLOUT = int(zmq.POLLOUT)
# The option as its enum member: the compiled ``get`` looks every option up as one, and a member
# is its own quickest lookup.
_EVENTS = zmq.EVENTS

# The compiled base class's methods (pyzmq's Python-level subclass only wraps them).
_send = zmq.backend.Socket.send
_recv = zmq.backend.Socket.recv
_get = zmq.backend.Socket.get


def send_frames(sock: zmq.Socket, frames: Sequence[Any], flags: int = 0) -> None:
    """Send ``frames`` (buffers or ``zmq.Frame``) as one message, zero-copy; ``flags``: 0 or
    :data:`NOBLOCK`. As with libzmq, once the first frame is queued the rest are too."""
    more = flags | _SNDMORE
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _send(sock, frame, more if i < last else flags, copy=False)


def recv_frames(sock: zmq.Socket, flags: int = 0, copy: bool = False) -> list[Any]:
    """The next message: ``zmq.Frame`` objects, or ``bytes`` if ``copy``; ``flags``: 0 or
    :data:`NOBLOCK` (``zmq.Again`` if there is none)."""
    frames = [_recv(sock, flags, copy=False)]
    while frames[-1].more:
        frames.append(_recv(sock, flags, copy=False))
    return [f.bytes for f in frames] if copy else frames


def events(sock: zmq.Socket) -> int:
    """The socket's ``ZMQ_EVENTS`` (:data:`POLLIN`, :data:`POLLOUT`) as a plain int."""
    return _get(sock, _EVENTS)
