"""A plain (blocking-API) ZeroMQ socket driven by the asyncio event loop, for the KV plane.

``zmq.asyncio`` pays for its generality on every message: a Future per call, enum flag
arithmetic, and a re-check of the socket's events after every send while a receive is pending.
For the KV plane's chunks one way and credit the other, that was ~0.1 CPU-second per GiB moved
on each side (bench/kv_handoff.py), a large share of the rate on a 2-core host. This class calls the socket
non-blocking and only waits, on the socket's file descriptor, when a call would block.

The descriptor (``ZMQ_FD``) signals that the socket's *state changed*, not that a message is
there, and any operation on the socket may consume that signal. So: a task waits only right after
its non-blocking call failed with ``EAGAIN`` (that call processed the pending state, so the next
change signals again), the loop callback wakes whoever waits for what ``ZMQ_EVENTS`` now allows,
and an operation that may have consumed the signal re-checks for the other kind of waiter.

One task may receive at a time; any number may send (each send is one whole message: libzmq
queues a multipart message atomically).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import zmq

from transport.frames import NOBLOCK, POLLIN, POLLOUT, events, recv_frames, send_frames


class LoopSocket:
    def __init__(self, sock: zmq.Socket) -> None:
        """Takes ownership of ``sock`` (a socket of a plain, not ``zmq.asyncio``, context)."""
        self.raw = sock
        self._loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        # One future per waiting task: a task cancelled while waiting cancels only its own.
        self._readers: list[asyncio.Future[None]] = []
        self._writers: list[asyncio.Future[None]] = []
        self._recheck_pending = False
        self._loop.add_reader(self._fd, self._on_state_change)

    @property
    def closed(self) -> bool:
        return self.raw.closed

    def _on_state_change(self) -> None:
        if self.raw.closed:
            return
        self._wake(events(self.raw))

    def _wake(self, ready: int) -> None:
        if ready & POLLIN and self._readers:
            _resolve(self._readers)
        if ready & POLLOUT and self._writers:
            _resolve(self._writers)

    def _recheck(self) -> None:
        """After an operation that may have consumed the descriptor's signal: look at the socket's
        events once the current callback is done (one look for a burst of sends, not one each)."""
        if (self._readers or self._writers) and not self._recheck_pending:
            self._recheck_pending = True
            self._loop.call_soon(self._deferred_recheck)

    def _deferred_recheck(self) -> None:
        self._recheck_pending = False
        self._on_state_change()

    async def _wait(self, waiters: list[asyncio.Future[None]]) -> None:
        waiter = self._loop.create_future()
        waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in waiters:
                waiters.remove(waiter)

    async def recv_multipart(self, copy: bool = False) -> list[Any]:
        """The next message (``zmq.Frame`` objects unless ``copy``); waits as long as it takes."""
        while True:
            try:
                frames = recv_frames(self.raw, NOBLOCK, copy)
            except zmq.Again:  # which also re-armed the descriptor: safe to wait on it
                await self._wait(self._readers)
                continue
            self._recheck()
            return frames

    def send_now(self, frames: Sequence[Any]) -> None:
        """Queue a message without waiting (zero-copy); raises ``zmq.Again`` if it would block and
        ``zmq.ZMQError`` if it cannot be sent (e.g. ``EHOSTUNREACH`` on a ROUTER)."""
        try:
            send_frames(self.raw, frames, NOBLOCK)
        finally:
            self._recheck()

    async def send(self, frames: Sequence[Any]) -> None:
        """Queue a message (zero-copy), waiting while the socket cannot take it (high-water mark,
        no peer yet). Bound the wait with a deadline around the call."""
        while True:
            try:
                self.send_now(frames)
                return
            except zmq.Again:  # as in recv_multipart
                await self._wait(self._writers)

    def close(self, linger_ms: int = 0) -> None:
        """Close the socket; a task still waiting on it gets ``zmq.ZMQError(ENOTSOCK)``. Messages
        queued and not yet sent go for ``linger_ms`` more, in libzmq's I/O thread (never blocking)."""
        if self.raw.closed:
            return
        self._loop.remove_reader(self._fd)
        self.raw.close(linger=linger_ms)
        for waiter in [*self._readers, *self._writers]:
            if not waiter.done():
                waiter.set_exception(zmq.ZMQError(zmq.ENOTSOCK))
        self._readers.clear()
        self._writers.clear()


def _resolve(waiters: list[asyncio.Future[None]]) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(None)
    waiters.clear()
