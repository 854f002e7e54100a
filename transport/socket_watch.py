"""What happens to a socket's connections, from its monitor: a callback per event of interest.

Two events matter here. When a server's ZAP handler refuses a client's handshake (it does not trust
the key), libzmq reports it once and then gives up on that connection for good: it never
reconnects, and whatever the socket sends waits forever (other failures, a handshake or a stream
broken on the way, a server with another key than the one pinned, are retried by libzmq); the
owner fails what waits on the connection at once and opens a new one later (keys may have been
rotated in meanwhile). And a connection closed by its peer (the process died, or its socket
closed): the owner learns it at once, not only when its pings go unanswered.
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

REFUSED = {zmq.EVENT_HANDSHAKE_FAILED_AUTH: "the server refused our key"}
CLOSED = {zmq.EVENT_DISCONNECTED: "closed the connection"}


class SocketWatch:
    def __init__(self, sock: zmq.Socket, events: dict[int, str], on_event: Callable[[str], None]) -> None:
        """Watch ``sock`` (before it connects, so nothing is missed) for ``events`` (event ->
        what it means); ``on_event(meaning)`` is called on the event loop for each."""
        self._sock = sock
        self._events = events
        self._on_event = on_event
        address = f"inproc://pdorch-socket-watch-{next(_ids)}"
        mask = 0
        for event in events:
            mask |= event
        sock.monitor(address, mask)
        pair = plain_context(sock.context).socket(zmq.PAIR)
        pair.setsockopt(zmq.LINGER, 0)
        pair.connect(address)
        self._monitor = LoopSocket(pair)
        self._task = asyncio.create_task(self._run(), name="socket-watch")

    async def _run(self) -> None:
        while True:
            frames = await self._monitor.recv_multipart(copy=True)
            meaning = None
            with contextlib.suppress(Exception):  # a monitor message we cannot read tells nothing
                meaning = self._events.get(parse_monitor_message(frames)["event"])
            if meaning is not None:
                self._on_event(meaning)

    async def close(self) -> None:
        """Stop watching (before the watched socket closes)."""
        await cancel_and_wait([self._task])
        with contextlib.suppress(zmq.ZMQError):
            self._sock.disable_monitor()
        self._monitor.close()
