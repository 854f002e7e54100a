"""Noticing that a server refused a connecting socket's key.

When a server's ZAP handler refuses a client's handshake (it does not trust the key), libzmq
reports it once on the socket's monitor and then gives up on that connection for good: it never
reconnects, and whatever the socket sends waits forever. (Other failures, a handshake or a
stream broken on the way, a server with another key than the one pinned, are retried by libzmq.)
A :class:`HandshakeWatch` turns the refusal into a callback, so the owner can fail what waits on
the connection at once and open a new one later (keys may have been rotated in meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from transport.loop_socket import LoopSocket
from transport.routed import cancel_and_wait
from transport.sockets import plain_context

_ids = itertools.count()


class HandshakeWatch:
    def __init__(self, sock: zmq.Socket, on_refused: Callable[[str], None]) -> None:
        """Watch ``sock`` (before it connects, so no refusal is missed); ``on_refused(why)`` is
        called on the event loop for each refused handshake."""
        self._sock = sock
        self._on_refused = on_refused
        address = f"inproc://pdorch-handshake-watch-{next(_ids)}"
        sock.monitor(address, zmq.EVENT_HANDSHAKE_FAILED_AUTH)
        pair = plain_context(sock.context).socket(zmq.PAIR)
        pair.setsockopt(zmq.LINGER, 0)
        pair.connect(address)
        self._monitor = LoopSocket(pair)
        self._task = asyncio.create_task(self._run(), name="handshake-watch")

    async def _run(self) -> None:
        while True:
            frames = await self._monitor.recv_multipart(copy=True)
            with contextlib.suppress(Exception):  # a monitor message we cannot read tells nothing
                if parse_monitor_message(frames)["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    self._on_refused("the server refused our key")

    async def close(self) -> None:
        """Stop watching (before the watched socket closes)."""
        await cancel_and_wait([self._task])
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close()
