"""The p2p half of a decode agent's KV receiver: its bound endpoint, served by a thread of its own.

Every chunk of every p2p transfer is received, verified, written to its sink and acknowledged with
credit on this thread, on a blocking socket: the event loop (which runs the engine and the agent)
is not woken per chunk, and a blocking receive replaces the loop's poll (~5% of the KV rate on a
2-core host, bench/kv_handoff.py). The loop side talks to the thread through
:meth:`P2pEndpoint.expect` / :meth:`P2pEndpoint.give_up` (a command queue plus a wake-up socket)
and learns each outcome through a future resolved with ``call_soon_threadsafe``.

Admission: a transfer is accepted only once the decode agent expects it and fewer than
``max_active`` transfers are in progress. Until then its begin message is parked without credit, so
the sender sends nothing more; a begin nobody expects within ``park_s`` is refused
(``KV_REJECTED``). A transfer the engine has *announced* (:meth:`P2pEndpoint.announce`: its decode
job arrived but waits in the engine's own queue, as a busy vLLM holds a request until a sequence
slot frees) may wait as long as the announcement says, and is not counted as a stranger's; a
withdrawn announcement (the job ended before it took its KV) refuses its begin at once, so the
sender frees what it holds instead of waiting out the park. Begins nobody expects yet are bounded
three ways: ``max_parked`` in all, ``max_parked_per_peer`` per connection and
``max_parked_per_scope`` per authenticated name, so one peer (even one holding a trusted key)
cannot take the slots others need. With authentication a peer may only begin transfers named in
its own scope (``<its key name>/...``, as the scheduler names them). The memory a receiver can be
made to hold is bounded by ``max_active * window_bytes``. An accepted transfer whose sender goes
quiet for ``idle_s`` fails (``KV_TRUNCATED``).

The endpoint is *refusing* (:attr:`P2pEndpoint.refusing`) for ``refusing_s`` after it turned a
begin away for lack of room in all (not for one peer's excess): the agent reports that in its
load, and placement leaves the worker out until it passes.

Sinks are called on this thread: they must not rely on running on the event loop.

Same-host transfers (``same_host/``): a sender on this host is lent a shared ring from
:class:`RingPool` at acceptance, given back when the transfer ends (closed if it failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import threading
import time
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
import zmq

from transport.codec import Decoder, Encoder
from transport.errors import ErrorCode, PdorchError
from transport.frames import NOBLOCK, recv_frames, send_frames
from transport.kv.in_transfer import InTransfer, KvSink, ReplyFn, validate_begin
from transport.kv.messages import (
    KV_PROTOCOL_VERSION,
    KvAbort,
    KvBegin,
    KvChunk,
    KvEnd,
    KvMessage,
    KvNack,
    KvShmChunk,
)
from transport.kv.same_host import SameHostMode, host_identity
from transport.kv.same_host.ring import Ring
from transport.kv.same_host.ring_pool import RingPool
from transport.security import ServerAuth, peer_name
from transport.sockets import bound_endpoint, router

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL_S = 0.25
# Announced transfers remembered at most (the oldest is forgotten first): the engine announces one
# per queued decode job, so this is far above any engine's queue. Aborted ones likewise.
MAX_ANNOUNCED = 4096
# The routing id of the loop side's wake-up socket, connected to the endpoint's own ROUTER over
# inproc: the thread then blocks on that one socket. Not a shape libzmq gives to peers (5 bytes).
# A peer that claimed it could only make the thread look at its command queue early.
_WAKE_ID = b"\x00pdorch-kv-wake"
# Eager transfers waiting here (not expected yet, or no slot) are held whole, their chunks with them,
# up to this many bytes in all; beyond it an eager begin is turned away (KV_NOT_READY) and its sender
# begins again the usual way, which holds nothing.
DEFAULT_MAX_EAGER_HELD_BYTES = 32 * 1024 * 1024
# What holding one message costs beyond its rows (its objects, its frame), charged to that bound: an
# eager transfer sends each layer as one chunk, so it holds at most a chunk per layer and its end.
_HELD_MESSAGE_BYTES = 1024
_wake_ids = itertools.count()
_V = TypeVar("_V")

Outcome = tuple[PdorchError | None, dict[str, int | str]]


class P2pStats(msgspec.Struct, gc=False):
    dropped_messages: int = 0
    refused_begins: int = 0
    # Of those: refused because every slot was taken (what makes the endpoint "refusing").
    refused_full: int = 0
    same_host: int = 0  # transfers whose chunks came through a shared ring
    eager: int = 0  # eager transfers taken (messages.py, KvBegin.eager), at once or after waiting
    eager_not_ready: int = 0  # eager begins turned away (too many bytes held): begun again


@dataclass(eq=False)
class Expected:
    """A transfer the decode agent waits for. Created on the loop, then owned by the thread."""

    transfer_id: str
    sink: KvSink
    outcome: asyncio.Future[Outcome]
    transfer: InTransfer | None = None  # set once accepted (read by the loop only for messages)
    identity: bytes = b""
    settled: bool = False


@dataclass(eq=False)
class _Parked:
    identity: bytes
    scope: str
    begin: KvBegin
    expires_at: float
    # Counted against its peer's and scope's share of the slots for begins nobody expects yet.
    unexpected: bool = True
    # An eager transfer's: what it is charged against the bound of bytes held (all it announced and
    # its messages' cost), and what came after it.
    reserved: int = 0
    held_limit: int = 0  # its rows' bytes
    held: list[KvChunk | KvEnd] = field(default_factory=list)
    held_bytes: int = 0


class P2pEndpoint:
    def __init__(
        self,
        ctx: zmq.Context,
        bind: str,
        *,
        window_bytes: int,
        max_active: int,
        max_parked: int,
        max_parked_per_peer: int,
        max_parked_per_scope: int,
        park_s: float,
        idle_s: float,
        refusing_s: float,
        auth: ServerAuth,
        same_host: SameHostMode = SameHostMode.AUTO,
        rings: RingPool | None = None,
        max_eager_held_bytes: int = DEFAULT_MAX_EAGER_HELD_BYTES,
    ) -> None:
        """``ctx``: a plain (not ``zmq.asyncio``) context. Binds at once; :meth:`start` serves.
        ``same_host``: when to lend senders a shared ring from ``rings``."""
        self._window_bytes = window_bytes
        self._max_active = max_active
        self._max_parked = max_parked
        self._max_parked_per_peer = max_parked_per_peer
        self._max_parked_per_scope = max_parked_per_scope
        self._park_s = park_s
        self._idle_s = idle_s
        self._refusing_s = refusing_s
        self._max_eager_held = max_eager_held_bytes
        self._eager_held = 0  # reserved by the eager transfers parked here
        self._router = router(ctx, bind, auth=auth)
        self.endpoint = bound_endpoint(self._router)
        # Blocking receives wake up at least this often, for housekeeping.
        self._router.setsockopt(zmq.RCVTIMEO, int(self._housekeeping_interval() * 1000))
        wake_endpoint = f"inproc://pdorch-kv-p2p-wake-{next(_wake_ids)}"
        self._router.bind(wake_endpoint)
        self._wake = ctx.socket(zmq.DEALER)  # the loop side's
        self._wake.setsockopt(zmq.LINGER, 0)
        self._wake.setsockopt(zmq.IDENTITY, _WAKE_ID)
        self._wake.connect(wake_endpoint)
        self._wake_lock = threading.Lock()  # expect() may be called from more than one thread
        self._commands: deque[tuple[str, str, Expected | PdorchError | float | None]] = deque()
        # The thread is (about to be) blocked in a receive: a command needs a wake-up to be seen soon.
        # Set before it last looks at the queue, so a command queued after that look finds it set.
        self._sleeping = False
        self._encoder = Encoder()
        self._decoder: Decoder[KvMessage] = Decoder(KvMessage)
        # Owned by the thread from start() on; the loop side only reads their sizes.
        self._expected: dict[str, Expected] = {}
        self._parked: OrderedDict[str, _Parked] = OrderedDict()
        # Transfers announced but not yet expected: transfer id -> until when (monotonic).
        self._announced: OrderedDict[str, float] = OrderedDict()
        # Transfers their senders aborted while they waited unexpected (an eager one is sent whole
        # and may be aborted before its decode job comes): transfer id -> (why, until when). The
        # decode job that comes for one is told at once rather than at its deadline.
        self._aborted: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._unexpected = 0
        self._unexpected_by_peer: Counter[bytes] = Counter()
        self._unexpected_by_scope: Counter[str] = Counter()
        self._active = 0
        # time.monotonic() of the last refusal for lack of room (read by the loop side).
        self._full_at = float("-inf")
        self._same_host = same_host if rings is not None else SameHostMode.OFF
        self._rings = rings
        # Why the thread stopped, once it has: expectations queued after that fail with it.
        self._stopped_with: PdorchError | None = None
        self.stats = P2pStats()
        self._thread = threading.Thread(target=self._run, name="kv-p2p-endpoint", daemon=True)

    @property
    def active(self) -> int:
        return self._active

    @property
    def parked(self) -> int:
        return len(self._parked)

    @property
    def expected(self) -> int:
        """Transfers the decode side waits for (taken in from the loop side, not yet settled)."""
        return len(self._expected)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def refusing(self) -> bool:
        """Turned a transfer away for lack of room within the last ``refusing_s``."""
        return time.monotonic() - self._full_at < self._refusing_s

    def start(self) -> None:
        self._thread.start()

    # ----------------------------------------------------------------- the loop side

    def expect(self, expected: Expected) -> None:
        """Start waiting for ``expected``; its ``outcome`` future gets the result."""
        self._command("expect", expected.transfer_id, expected)
        if self._stopped_with is not None:  # the thread is gone or going: nobody else will answer
            self._fail_queued()

    def announce(self, transfer_id: str, wait_s: float) -> None:
        """A decode job for ``transfer_id`` is queued in the engine: its begin may wait ``wait_s``."""
        self._command("announce", transfer_id, wait_s)

    def withdraw(self, transfer_id: str) -> None:
        """The announced job ended without expecting its transfer: refuse the begin now."""
        self._command("withdraw", transfer_id, None)

    def give_up(self, transfer_id: str, error: PdorchError) -> None:
        """The decode side stopped waiting (deadline, cancellation): fail the transfer, tell its sender."""
        self._command("give_up", transfer_id, error)

    async def close(self) -> None:
        """Stop the thread: transfers in progress fail (their senders are told), waiters get CANCELLED."""
        if self._thread.is_alive():
            self._command("stop", "", None)
            await asyncio.to_thread(self._thread.join, 10.0)
        if not self._thread.is_alive():  # else it still owns its socket: leave it to it
            self._router.close(linger=0)
        self._wake.close(linger=0)

    def _command(self, kind: str, transfer_id: str, arg: Expected | PdorchError | float | None) -> None:
        self._commands.append((kind, transfer_id, arg))
        if not self._sleeping:
            # Busy: it runs the queue before it next waits. (A send here also hands the GIL to the
            # busy thread and waits to get it back: under load that was most of a decode agent's
            # cost of expecting a transfer.)
            return
        with self._wake_lock, contextlib.suppress(zmq.ZMQError):
            self._wake.send(b"", zmq.NOBLOCK)

    # ----------------------------------------------------------------- the thread

    def _run(self) -> None:
        next_housekeeping = time.monotonic() + self._housekeeping_interval()
        try:
            while True:
                self._sleeping = True
                try:
                    # Commands queued meanwhile are run before waiting (their wake-up may be skipped).
                    flags = NOBLOCK if self._commands else 0
                    frames = recv_frames(self._router, flags)  # up to RCVTIMEO
                except zmq.Again:
                    frames = []
                finally:
                    self._sleeping = False
                if self._commands and not self._run_commands():
                    return
                if frames and frames[0].bytes != _WAKE_ID:
                    self._on_message(frames)
                    if self._rings is not None:
                        self._rings.retry_closing()
                now = time.monotonic()
                if now >= next_housekeeping:
                    self._housekeeping(now)
                    next_housekeeping = now + self._housekeeping_interval()
        except zmq.ContextTerminated:  # the process is shutting down without closing us first
            self._stop(PdorchError(ErrorCode.CANCELLED, "KV receiver closed"))
        except Exception:  # a bug here must not leave decode jobs waiting for their deadline
            log.exception("KV p2p endpoint failed; failing its transfers")
            self._stop(PdorchError(ErrorCode.INTERNAL, "the KV receiver failed"))
        finally:
            self._router.close(linger=0)
            if self._rings is not None:
                self._rings.close()
            self._stopped_with = self._stopped_with or PdorchError(ErrorCode.CANCELLED, "KV receiver closed")
            self._fail_queued()

    def _fail_queued(self) -> None:
        """Answer the expectations still queued once the thread stopped. Run by the thread on its
        way out and by :meth:`expect` after it: each queued command is popped exactly once."""
        assert self._stopped_with is not None
        while True:
            try:
                kind, _, arg = self._commands.popleft()
            except IndexError:
                return
            if kind == "expect":
                assert isinstance(arg, Expected)
                _resolve(arg, (self._stopped_with, {}))

    def _housekeeping_interval(self) -> float:
        return min(HOUSEKEEPING_INTERVAL_S, self._park_s / 4)

    def _run_commands(self) -> bool:
        """Handle queued commands; False once told to stop."""
        while self._commands:
            kind, tid, arg = self._commands.popleft()
            if kind == "stop":
                self._stop(PdorchError(ErrorCode.CANCELLED, "KV receiver closed"))
                return False
            if kind == "expect":
                assert isinstance(arg, Expected)
                self._on_expect(arg)
            elif kind == "give_up":
                assert isinstance(arg, PdorchError)
                self._on_give_up(tid, arg)
            elif kind == "announce":
                assert isinstance(arg, float | int)
                self._on_announce(tid, float(arg))
            elif kind == "withdraw":
                self._on_withdraw(tid)
        return True

    def _on_message(self, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            self.stats.dropped_messages += 1
            return
        identity = frames[0].bytes
        try:
            msg = self._decoder.decode(frames[1:])
        except PdorchError:
            self.stats.dropped_messages += 1
            return
        try:
            self._dispatch(identity, msg, frames[1])
        except Exception:  # one transfer's bug must not stop the receiver
            log.exception("KV receiver failed on a message for %s", msg.transfer_id)

    def _dispatch(self, identity: bytes, msg: KvMessage, frame: zmq.Frame) -> None:
        if isinstance(msg, KvBegin):
            self._on_begin(identity, peer_name(frame), msg)
            return
        expected = self._expected.get(msg.transfer_id)
        transfer = expected.transfer if expected is not None else None
        if transfer is not None and isinstance(msg, KvChunk | KvShmChunk | KvEnd | KvAbort):
            assert expected is not None
            if expected.identity == identity:
                transfer.handle(msg)
            elif isinstance(msg, KvChunk | KvShmChunk | KvEnd):
                # The sender's connection dropped and came back under a new routing id: whatever
                # was in flight on the old one is lost, so the stream can no longer be complete.
                transfer.fail(
                    ErrorCode.KV_TRUNCATED, "the sender's connection changed mid-transfer; chunks were lost"
                )
            else:
                self.stats.dropped_messages += 1
        elif isinstance(msg, KvChunk | KvEnd) and self._parked_by(identity, msg.transfer_id):
            self._hold(self._parked[msg.transfer_id], msg)
        elif isinstance(msg, KvAbort) and self._parked_by(identity, msg.transfer_id):
            parked = self._unpark(msg.transfer_id)
            if expected is not None:  # expected but still waiting for a slot
                self._settle(expected, PdorchError(ErrorCode.KV_TRUNCATED, f"sender aborted: {msg.reason}"))
            elif parked is not None:
                _remember(self._aborted, msg.transfer_id, (msg.reason, parked.expires_at))
        elif isinstance(msg, KvAbort) and self._never_begun(expected, peer_name(frame)):
            assert expected is not None
            self._settle(expected, PdorchError(ErrorCode.KV_TRUNCATED, f"sender aborted: {msg.reason}"))
        else:
            self.stats.dropped_messages += 1

    def _never_begun(self, expected: Expected | None, scope: str) -> bool:
        """Expected, and neither taken nor waiting here: its eager begin was turned away, and its
        sender, aborting, will not begin it again. (Another peer's abort is out of its scope, or a
        guess of a random id.)"""
        return (
            expected is not None
            and expected.transfer is None
            and expected.transfer_id not in self._parked
            and _in_scope(expected.transfer_id, scope)
        )

    def _on_expect(self, expected: Expected) -> None:
        tid = expected.transfer_id
        if tid in self._expected:
            error = PdorchError(ErrorCode.INTERNAL, f"transfer {tid} is already expected")
            _resolve(expected, (error, {}))
            return
        aborted = self._aborted.pop(tid, None)
        if aborted is not None:
            self._settle(expected, PdorchError(ErrorCode.KV_TRUNCATED, f"sender aborted: {aborted[0]}"))
            return
        self._expected[tid] = expected
        self._announced.pop(tid, None)
        parked = self._parked.get(tid)
        if parked is not None:  # it began before we expected it: no longer a stranger's begin
            self._uncount(parked)
        self._promote()

    def _on_announce(self, tid: str, wait_s: float) -> None:
        if tid in self._expected:
            return
        until = time.monotonic() + wait_s
        _remember(self._announced, tid, until)
        parked = self._parked.get(tid)
        if parked is not None:  # it began first: it is no longer a stranger's, and may wait longer
            self._uncount(parked)
            parked.expires_at = max(parked.expires_at, until)

    def _on_withdraw(self, tid: str) -> None:
        self._announced.pop(tid, None)
        parked = self._unpark(tid) if tid not in self._expected else None
        if parked is not None:
            self._refuse(parked.identity, tid, ErrorCode.KV_REJECTED, "its decode job ended without it")

    def _on_give_up(self, tid: str, error: PdorchError) -> None:
        expected = self._expected.get(tid)
        if expected is None:
            return
        if expected.transfer is not None:
            expected.transfer.fail(error.code, error.message)  # settles it
        else:
            self._settle(expected, error)

    def _on_begin(self, identity: bytes, scope: str, begin: KvBegin) -> None:
        tid = begin.transfer_id
        if begin.version != KV_PROTOCOL_VERSION:
            self._refuse(identity, tid, ErrorCode.PROTOCOL_MISMATCH, f"KV protocol {begin.version}")
            return
        if not _in_scope(tid, scope):
            self._refuse(
                identity, tid, ErrorCode.KV_REJECTED, f"transfer {tid} is not in the scope of {scope}"
            )
            return
        try:
            row_bytes = validate_begin(begin)
        except PdorchError as e:
            self._refuse(identity, tid, e.code, e.message)
            return
        expected = self._expected.get(tid)
        if tid in self._parked or (expected is not None and expected.transfer is not None):
            self._refuse(identity, tid, ErrorCode.KV_REJECTED, "duplicate begin")
            return
        reserved = payload = 0
        if begin.eager:
            # Taken now, or waiting like any begin with what follows it (on its way already), held.
            payload = row_bytes * begin.rows_per_layer * begin.num_layers
            reserved = payload + _HELD_MESSAGE_BYTES * (begin.num_layers + 1)
            if (expected is None or self._active >= self._max_active) and (
                self._eager_held + reserved > self._max_eager_held
            ):
                self.stats.eager_not_ready += 1
                why = f"eager transfers waiting here hold {self._eager_held} bytes already"
                self._send_to(identity, KvNack(tid, code=str(ErrorCode.KV_NOT_READY), message=why))
                return
            if expected is not None and self._active < self._max_active:
                self._take(expected, identity, begin, ring=None)
                return
        now = time.monotonic()
        announced_until = self._announced.get(tid, now)  # (one past its time is forgotten)
        parked = _Parked(
            identity,
            scope,
            begin,
            max(now + self._park_s, announced_until),
            unexpected=expected is None and announced_until <= now,
            reserved=reserved,
            held_limit=payload,
        )
        if parked.unexpected:
            refusal = self._no_room_for(parked)
            if refusal is not None:
                self._refuse(identity, tid, refusal.code, refusal.message)
                return
            self._count(parked)
        self._parked[tid] = parked
        self._eager_held += parked.reserved
        self._promote()

    def _hold(self, parked: _Parked, msg: KvChunk | KvEnd) -> None:
        """What came after an eager begin that waits here: kept for when it is taken, within what
        it announced (its rows' bytes, in a chunk per layer, then its end; more is a violation that
        fails the transfer). Checked in full once it is taken."""
        begin = parked.begin
        if not begin.eager:  # a sender that did not wait for its accept
            self.stats.dropped_messages += 1
            return
        if isinstance(msg, KvChunk):
            parked.held_bytes += msg.rows.nbytes
        ended = bool(parked.held) and isinstance(parked.held[-1], KvEnd)
        if ended or len(parked.held) > begin.num_layers or parked.held_bytes > parked.held_limit:
            tid = begin.transfer_id
            self._unpark(tid)
            error = PdorchError(ErrorCode.KV_CORRUPT, f"eager transfer {tid} sent more than it announced")
            self._refuse(parked.identity, tid, error.code, error.message)
            expected = self._expected.get(tid)
            if expected is not None:
                self._settle(expected, error)
            return
        parked.held.append(msg)

    def _no_room_for(self, parked: _Parked) -> PdorchError | None:
        """Why a begin nobody expects yet cannot wait here (None if it can): one peer or key over
        its share is rejected; no room left at all means this endpoint is congested (KV_BUSY)."""
        if self._unexpected_by_peer[parked.identity] >= self._max_parked_per_peer:
            return PdorchError(ErrorCode.KV_REJECTED, "too many transfers waiting from this peer")
        if parked.scope and self._unexpected_by_scope[parked.scope] >= self._max_parked_per_scope:
            return PdorchError(ErrorCode.KV_REJECTED, f"too many transfers waiting from {parked.scope}")
        if self._unexpected >= self._max_parked:
            self._full_at = time.monotonic()
            self.stats.refused_full += 1
            return PdorchError(ErrorCode.KV_BUSY, "too many transfers waiting")
        return None

    def _count(self, parked: _Parked) -> None:
        self._unexpected += 1
        self._unexpected_by_peer[parked.identity] += 1
        if parked.scope:
            self._unexpected_by_scope[parked.scope] += 1

    def _uncount(self, parked: _Parked) -> None:
        if not parked.unexpected:
            return
        parked.unexpected = False
        self._unexpected -= 1
        for counter, key in (
            (self._unexpected_by_peer, parked.identity),
            (self._unexpected_by_scope, parked.scope),
        ):
            counter[key] -= 1
            if counter[key] <= 0:
                del counter[key]

    def _unpark(self, tid: str) -> _Parked | None:
        parked = self._parked.pop(tid, None)
        if parked is not None:
            self._uncount(parked)
            self._eager_held -= parked.reserved
        return parked

    def _parked_by(self, identity: bytes, tid: str) -> bool:
        parked = self._parked.get(tid)
        return parked is not None and parked.identity == identity

    def _promote(self) -> None:
        """Accept parked transfers that are expected, while there is room."""
        for tid in list(self._parked):
            if self._active >= self._max_active:
                return
            expected = self._expected.get(tid)
            if expected is None or expected.transfer is not None:
                continue
            parked = self._unpark(tid)
            assert parked is not None
            ring = None if parked.begin.eager else self._ring_for(parked)
            self._take(expected, parked.identity, parked.begin, ring, parked.held)

    def _take(
        self,
        expected: Expected,
        identity: bytes,
        begin: KvBegin,
        ring: Ring | None,
        held: list[KvChunk | KvEnd] | None = None,
    ) -> None:
        """Accept ``begin`` from ``identity`` into one of the ``max_active`` slots (``held``: what
        came after an eager begin while it waited)."""
        expected.identity = identity
        expected.transfer = InTransfer(
            begin,
            expected.sink,
            self._window_bytes,
            self._replier(identity),
            on_finish=lambda t, expected=expected: self._settle(expected, t.error, t.trailer),
            ring=ring,
        )
        self._active += 1
        self.stats.eager += begin.eager
        expected.transfer.accept()
        for msg in held or ():
            expected.transfer.handle(msg)

    def _ring_for(self, parked: _Parked) -> Ring | None:
        """A shared ring for this transfer, if its sender is on this host (or the mode forces it)."""
        host = parked.begin.host
        if self._rings is None or not host or self._same_host == SameHostMode.OFF:
            return None
        if self._same_host == SameHostMode.AUTO and host != host_identity():
            return None
        row_bytes = validate_begin(parked.begin)  # validated before it was parked
        return self._rings.lend(parked.identity, row_bytes)

    def _settle(
        self, expected: Expected, error: PdorchError | None, trailer: dict[str, int | str] | None = None
    ) -> None:
        """The transfer is over: forget it, free its slot, tell the loop side."""
        if expected.settled:
            return
        expected.settled = True
        transfer = expected.transfer
        if transfer is not None and transfer.ring is not None and self._rings is not None:
            # A failed transfer's sender may still be writing into its ring: never lend that one again.
            # Nor one the sender did not use (it could not map it, and a sealed ring stays unmappable).
            self._rings.give_back(
                expected.identity, transfer.ring, reuse=error is None and transfer.ring_used
            )
            self.stats.same_host += transfer.ring_used
        if self._expected.get(expected.transfer_id) is expected:
            del self._expected[expected.transfer_id]
        if expected.transfer is not None:
            self._active -= 1
        parked = self._unpark(expected.transfer_id)
        if parked is not None:  # it waited for a slot in vain: tell its sender now
            self._full_at = time.monotonic()
            self._refuse(parked.identity, expected.transfer_id, ErrorCode.KV_BUSY, "no receive slot in time")
        _resolve(expected, (error, dict(trailer or {})))
        self._promote()

    def _replier(self, identity: bytes) -> ReplyFn:
        return functools.partial(self._send_to, identity)

    def _send_to(self, identity: bytes, msg: KvMessage) -> None:
        # Replies never wait: a peer that is gone or not reading loses them and times out.
        with contextlib.suppress(zmq.ZMQError):
            send_frames(self._router, [identity, *self._encoder.encode(msg)], NOBLOCK)

    def _refuse(self, identity: bytes, tid: str, code: ErrorCode, message: str) -> None:
        self.stats.refused_begins += 1
        self._send_to(identity, KvNack(transfer_id=tid, code=str(code), message=message))

    def _housekeeping(self, now: float) -> None:
        if self._rings is not None:
            self._rings.housekeeping(now)
        for expected in list(self._expected.values()):
            transfer = expected.transfer
            last = transfer.last_activity if transfer is not None else None
            if transfer is not None and last is not None and now - last > self._idle_s:
                transfer.fail(
                    ErrorCode.KV_TRUNCATED, f"the sender went quiet for {self._idle_s:.0f}s mid-transfer"
                )
        while self._announced and next(iter(self._announced.values())) <= now:
            self._announced.popitem(last=False)
        while self._aborted and next(iter(self._aborted.values()))[1] <= now:
            self._aborted.popitem(last=False)
        for tid, parked in list(self._parked.items()):
            if tid not in self._expected and parked.expires_at <= now:
                self._unpark(tid)
                self._refuse(parked.identity, tid, ErrorCode.KV_REJECTED, "no decode job expects it")

    def _stop(self, error: PdorchError) -> None:
        self._stopped_with = error
        self._announced.clear()
        self._aborted.clear()
        for tid in list(self._parked):  # their senders time out (the receiver is going away)
            self._unpark(tid)
        for expected in list(self._expected.values()):
            if expected.transfer is not None:
                expected.transfer.fail(error.code, error.message)
            else:
                self._settle(expected, error)


def _remember(ids: OrderedDict[str, _V], tid: str, value: _V) -> None:
    """Keep ``tid`` as the newest of ``ids``, at most ``MAX_ANNOUNCED`` of them (the oldest go)."""
    ids[tid] = value
    ids.move_to_end(tid)
    while len(ids) > MAX_ANNOUNCED:
        ids.popitem(last=False)


def _in_scope(transfer_id: str, scope: str) -> bool:
    """With authentication a peer may only name transfers of its own key name (``<scope>/...``)."""
    return not scope or transfer_id.startswith(scope + "/")


def _resolve(expected: Expected, outcome: Outcome) -> None:
    def set_outcome() -> None:
        if not expected.outcome.done():
            expected.outcome.set_result(outcome)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        expected.outcome.get_loop().call_soon_threadsafe(set_outcome)
