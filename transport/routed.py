"""Shared plumbing of every ROUTER-side loop: receive, split off the identity, decode, and
stop tasks cleanly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, Protocol, TypeVar

from transport.codec import Decoder
from transport.errors import PdorchError

T = TypeVar("T")


class ReceivingSocket(Protocol):
    """A ``zmq.asyncio`` socket or a :class:`transport.loop_socket.LoopSocket`."""

    def recv_multipart(self, copy: bool = ...) -> Awaitable[list[Any]]: ...


async def receive_routed(
    sock: ReceivingSocket, decoder: Decoder[T], on_bad: Callable[[bytes, str], None]
) -> AsyncIterator[tuple[bytes, T, Any]]:
    """(identity, message, first body frame) for every well-formed message on a ROUTER (the frame
    tells who the connection authenticated as: :func:`transport.security.peer_name`); malformed
    ones go to ``on_bad(identity, why)`` and are dropped, so a peer's garbage never stops the loop."""
    while True:
        frames = await sock.recv_multipart(copy=False)
        if len(frames) < 2:
            on_bad(b"", "message without a body")
            continue
        identity = frames[0].bytes
        try:
            msg = decoder.decode(frames[1:])
        except PdorchError as e:
            on_bad(identity, e.message)
            continue
        yield identity, msg, frames[1]


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object]]) -> None:
    """Cancel tasks and wait until each has finished."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
