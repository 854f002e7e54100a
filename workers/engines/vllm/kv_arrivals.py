"""Notes from a decode vLLM's connector to its agent that a request's KV is arriving.

The scheduler takes a handoff for stalled when nothing about it is heard for a while, and a decode
side says "still arriving" (``KvArriving``) while a long transfer keeps moving. With vLLM the
transfer is received inside vLLM, by the connector's KV plane, and the agent hears of it only when
the first token comes: without these notes, a large handoff over a slow link was moved on as
stalled while it was landing.

The connector (:class:`ArrivalReporter`, on its KV plane's thread) pushes one small note per
transfer at most once a second while its chunks come (``transport/kv/arrival_watch.py``); the
agent (:class:`ArrivalListener`) pulls them on a local endpoint both are configured with (an
``ipc://`` path, or a port on a pod's loopback) and emits ``KvArriving`` for the decode job
waiting for that transfer. Notes are advisory: one that cannot be sent at once is dropped, and one
about no job this agent is waiting for is ignored. Both ends authenticate as the worker (the
connector holds the agent's key), on the KV plane's terms. Shared by the agent and the vLLM
processes, so it imports neither vLLM nor torch.
"""

from __future__ import annotations

import asyncio
import contextlib

import msgspec
import zmq

from transport import sockets
from transport.frames import NOBLOCK, send_frames
from transport.messages import KvArriving
from transport.security import Security
from transport.security.zap import Plane
from workers.engines.base import Emit

# A note is a transfer id and a few bytes of framing: anything larger is not one (libzmq drops
# the connection before reading it).
NOTE_MAX_BYTES = 1024
# Notes queued towards an agent that is not reading: at one per transfer per second, plenty.
NOTES_HWM = 256
# The agent tells the scheduler at most this often per request, however many notes come.
EMIT_EVERY_S = 0.5


class ArrivalNote(msgspec.Struct, array_like=True, frozen=True, gc=False):
    transfer_id: str


class _Watch:
    """A decode job waiting for its transfer, and when the agent last said its KV was arriving."""

    __slots__ = ("request_id", "told_at")

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.told_at = float("-inf")


_encode = msgspec.msgpack.Encoder().encode


class ArrivalReporter:
    """The connector's end: a PUSH to the agent. Use from one thread (the KV plane's)."""

    def __init__(self, ctx: zmq.Context, connect: str, security: Security) -> None:
        """``ctx``: a plain (blocking-API) context; ``security``: the worker's, whose own key the
        agent's endpoint serves with."""
        auth = security.client(Plane.KV, security.public_key)
        self._sock = sockets.push(ctx, connect, auth=auth, hwm=NOTES_HWM)

    def arriving(self, transfer_id: str) -> None:
        # Dropped when no agent is connected or it is not reading: the note is only advice.
        with contextlib.suppress(zmq.Again):
            send_frames(self._sock, [_encode(ArrivalNote(transfer_id))], NOBLOCK)

    def close(self) -> None:
        self._sock.close(linger=0)


class ArrivalListener:
    """The agent's end: a PULL bound at ``bind`` (local: only the vLLM beside it speaks here)."""

    def __init__(self, ctx: zmq.Context, bind: str, security: Security) -> None:
        """``ctx``: an asyncio context (the agent's)."""
        auth = security.server(ctx, Plane.KV)
        self._sock = sockets.pull(ctx, bind, auth=auth, hwm=NOTES_HWM, max_bytes=NOTE_MAX_BYTES)
        self.endpoint = sockets.bound_endpoint(self._sock)
        self._watched: dict[str, _Watch] = {}  # by transfer id
        self._task: asyncio.Task[None] | None = None
        self.bad_notes = 0

    def start(self, emit: Emit) -> None:
        self._task = asyncio.create_task(self._run(emit), name="vllm-kv-arrivals")

    def watch(self, transfer_id: str, request_id: str) -> None:
        """A decode job waits for ``transfer_id``: its notes become ``KvArriving(request_id)``."""
        self._watched[transfer_id] = _Watch(request_id)

    def unwatch(self, transfer_id: str) -> None:
        self._watched.pop(transfer_id, None)

    @property
    def watched(self) -> int:
        return len(self._watched)

    async def _run(self, emit: Emit) -> None:
        decode = msgspec.msgpack.Decoder(ArrivalNote).decode
        loop = asyncio.get_running_loop()
        while True:
            data = await self._sock.recv()
            try:
                note = decode(data)
            except msgspec.DecodeError:
                self.bad_notes += 1
                continue
            watch = self._watched.get(note.transfer_id)
            if watch is None:  # its job ended, or it was never ours
                continue
            now = loop.time()
            if now - watch.told_at >= EMIT_EVERY_S:
                watch.told_at = now
                emit(KvArriving(watch.request_id))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._sock.close(linger=0)
