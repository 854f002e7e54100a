"""The decode side of the KV plane: receives transfers on its own endpoint (p2p) or fetches them
from the broker (centralized).

p2p transfers are served by :class:`transport.kv.p2p_endpoint.P2pEndpoint` on a thread of its
own (admission, parking and the per-chunk path are described there); fetches run on the event
loop, one :class:`FetchTransfer` per fetch over a :class:`DealerLink` per broker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import msgspec
import zmq.asyncio

from transport.errors import ErrorCode, PdorchError
from transport.kv.arrival_watch import ArrivalWatch
from transport.kv.deadline import Deadline
from transport.kv.dealer_link import DealerLink
from transport.kv.fetch_transfer import FetchTransfer
from transport.kv.in_transfer import KvSink
from transport.kv.messages import KV_PROTOCOL_VERSION, KvFetch
from transport.kv.p2p_endpoint import DEFAULT_MAX_EAGER_HELD_BYTES, Expected, Outcome, P2pEndpoint
from transport.kv.receive_buffers import keep_receive_buffers
from transport.kv.same_host import SameHostMode
from transport.kv.same_host.ring import MIN_SLOTS
from transport.kv.same_host.ring_pool import RingPool
from transport.messages import KvMode, KvRoute
from transport.security import Plane, Security
from transport.sockets import plain_context

DEFAULT_RECEIVER_WINDOW_BYTES = 32 * 1024 * 1024
# A same-host transfer's ring: 4 slots of 4 MiB. 16 MiB stays in a server's last-level cache, so
# the receiver reads back what the sender just wrote from there; 4 MiB chunks keep the per-chunk
# messages few (a 1 GiB transfer: 256).
DEFAULT_RING_SLOTS = 4
DEFAULT_RING_SLOT_BYTES = 4 * 1024 * 1024


class ReceiverLimits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What one decode agent's p2p KV endpoint admits (``KvReceiver``'s bounds), as the worker's
    ``--kv-*`` flags and a vLLM server's ``pdorch_kv_limits`` set them."""

    max_active: int = 8  # transfers receiving at once
    max_parked: int = 256  # begins nobody expects yet, in all
    max_parked_per_peer: int = 32  # ... per connection
    max_parked_per_scope: int = 128  # ... per authenticated key name
    park_s: float = 30.0  # how long such a begin may wait for its decode job
    idle_s: float = 10.0  # a transfer silent this long is failed

    def __post_init__(self) -> None:
        if (
            min(self.max_active, self.max_parked_per_peer, self.max_parked_per_scope) < 1
            or self.max_parked < 0
        ):
            raise PdorchError(ErrorCode.CONFIG, f"KV receiver limits must be positive: {self}")
        if self.park_s <= 0 or self.idle_s <= 0:
            raise PdorchError(ErrorCode.CONFIG, f"KV receiver wait limits must be > 0: {self}")

    def kwargs(self) -> dict[str, float]:
        return msgspec.structs.asdict(self)


DEFAULT_LIMITS = ReceiverLimits()


class KvReceiverStats(msgspec.Struct, gc=False):
    completed: int = 0
    failed: int = 0
    dropped_messages: int = 0
    refused_begins: int = 0
    parked: int = 0
    active: int = 0
    expected: int = 0  # p2p transfers the decode side waits for
    same_host: int = 0  # p2p transfers whose chunks came through shared memory
    shared_rings: int = 0  # shared rings open now (lent or kept for their sender)
    eager: int = 0  # small p2p transfers taken without an accept's round trip
    eager_not_ready: int = 0  # eager begins turned away (too many bytes held) and begun again


class KvReceiver:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        *,
        bind: str | None,
        security: Security,
        window_bytes: int = DEFAULT_RECEIVER_WINDOW_BYTES,
        max_active: int = 8,
        max_parked: int = 256,
        max_parked_per_peer: int = 32,
        max_parked_per_scope: int = 128,
        park_s: float = 30.0,
        idle_s: float = 10.0,
        refusing_s: float = 5.0,
        same_host: SameHostMode = SameHostMode.AUTO,
        ring_slots: int = DEFAULT_RING_SLOTS,
        ring_slot_bytes: int = DEFAULT_RING_SLOT_BYTES,
        max_eager_held_bytes: int = DEFAULT_MAX_EAGER_HELD_BYTES,
    ) -> None:
        """``bind=None``: no p2p endpoint (fetch only). ``window_bytes``: credit per transfer;
        ``max_parked*``: begins nobody expects yet, in all, per connection, per authenticated name
        (same-host begins included). ``same_host``: when p2p senders on this host get a shared ring
        (``same_host/``) of ``ring_slots`` slots (at least ``MIN_SLOTS``) of ``ring_slot_bytes``.
        ``max_eager_held_bytes``: what eager transfers waiting to be taken may hold in all."""
        if ring_slots < MIN_SLOTS:
            raise PdorchError(ErrorCode.CONFIG, f"a shared KV ring needs at least {MIN_SLOTS} slots")
        self._ctx = ctx
        self._bind = bind
        self._security = security
        self._window_bytes = window_bytes
        self._max_active = max_active
        self._max_parked = max_parked
        self._max_parked_per_peer = max_parked_per_peer
        self._max_parked_per_scope = max_parked_per_scope
        self._park_s = park_s
        self._idle_s = idle_s
        self._refusing_s = refusing_s
        self._same_host = same_host
        self._ring_slots = ring_slots
        self._ring_slot_bytes = ring_slot_bytes
        self._max_eager_held_bytes = max_eager_held_bytes
        self._rings: RingPool | None = None
        self.endpoint = ""
        self._p2p: P2pEndpoint | None = None
        self._closed = False
        self._links: dict[tuple[str, str], DealerLink] = {}
        self._retired: list[DealerLink] = []
        self._fetches: set[FetchTransfer] = set()
        self._stats = KvReceiverStats()

    @property
    def stats(self) -> KvReceiverStats:
        s = self._stats
        dropped = s.dropped_messages + sum(link.dropped_messages for link in self._links.values())
        p2p = self._p2p
        if p2p is None:
            return msgspec.structs.replace(s, dropped_messages=dropped)
        return msgspec.structs.replace(
            s,
            parked=p2p.parked,
            active=p2p.active,
            expected=p2p.expected,
            dropped_messages=dropped + p2p.stats.dropped_messages,
            refused_begins=p2p.stats.refused_begins,
            same_host=p2p.stats.same_host,
            eager=p2p.stats.eager,
            eager_not_ready=p2p.stats.eager_not_ready,
            shared_rings=self._rings.open_rings if self._rings is not None else 0,
        )

    @property
    def alive(self) -> bool:
        """False once its p2p endpoint's thread has stopped (it could take no transfer); True
        without one (no p2p endpoint: nothing to stop)."""
        return self._p2p is None or self._p2p.alive

    @property
    def refusing(self) -> bool:
        """The p2p endpoint turned transfers away for lack of room lately (see p2p_endpoint.py)."""
        return self._p2p is not None and self._p2p.refusing

    async def start(self) -> None:
        keep_receive_buffers()
        if self._bind is None:
            return
        if self._same_host != SameHostMode.OFF:
            self._rings = RingPool(
                slots=self._ring_slots,
                slot_bytes=self._ring_slot_bytes,
                window_bytes=self._window_bytes,
                idle_s=max(self._idle_s, 30.0),
                max_idle=2 * self._max_active,
            )
        self._p2p = P2pEndpoint(
            plain_context(self._ctx),
            self._bind,
            window_bytes=self._window_bytes,
            max_active=self._max_active,
            max_parked=self._max_parked,
            max_parked_per_peer=self._max_parked_per_peer,
            max_parked_per_scope=self._max_parked_per_scope,
            park_s=self._park_s,
            idle_s=self._idle_s,
            refusing_s=self._refusing_s,
            auth=self._security.server(self._ctx, Plane.KV),
            same_host=self._same_host,
            rings=self._rings,
            max_eager_held_bytes=self._max_eager_held_bytes,
        )
        self.endpoint = self._p2p.endpoint
        self._p2p.start()

    async def close(self) -> None:
        self._closed = True
        if self._p2p is not None:
            await self._p2p.close()  # transfers in progress fail, receive() calls end at once
        for fetch in list(self._fetches):
            # Tell the broker at once (best effort); it keeps the transfer for another fetch.
            fetch.fail(PdorchError(ErrorCode.CANCELLED, "KV receiver closed"))
        for link in [*self._links.values(), *self._retired]:
            await link.close()
        self._links.clear()
        self._retired.clear()

    async def receive(
        self,
        route: KvRoute,
        sink: KvSink,
        *,
        deadline_s: float,
        on_arriving: Callable[[], None] | None = None,
    ) -> dict[str, int | str]:
        """Take the transfer ``route`` names and write its verified rows to ``sink``; return the
        trailer. p2p: wait for its sender on this receiver's own endpoint (``sink`` is then called
        on the endpoint's thread); centralized: fetch it from the broker at ``route.endpoint``.
        ``on_arriving`` is called about once a second while chunks keep coming (arrival_watch.py).
        Raises PdorchError: KV_TIMEOUT (nothing or not all in time), KV_CORRUPT, KV_TRUNCATED."""
        if route.mode == KvMode.CENTRALIZED:
            return await self._fetch(route, sink, deadline_s=deadline_s, on_arriving=on_arriving)
        return await self._receive_p2p(
            route.transfer_id, sink, deadline_s=deadline_s, on_arriving=on_arriving
        )

    def announce(self, route: KvRoute, *, wait_s: float) -> None:
        """A decode job for ``route`` has arrived but waits in the engine's queue before it can
        :meth:`receive`: a p2p sender's begin may wait for it up to ``wait_s`` (instead of the
        ``park_s`` a stranger's begin gets). Centralized transfers wait in the broker instead."""
        if route.mode == KvMode.P2P and self._p2p is not None and not self._closed:
            self._p2p.announce(route.transfer_id, wait_s)

    def withdraw(self, route: KvRoute) -> None:
        """The announced job ended without receiving: its p2p sender is refused at once."""
        if route.mode == KvMode.P2P and self._p2p is not None and not self._closed:
            self._p2p.withdraw(route.transfer_id)

    # ----------------------------------------------------------------- p2p

    async def _receive_p2p(
        self, transfer_id: str, sink: KvSink, *, deadline_s: float, on_arriving: Callable[[], None] | None
    ) -> dict[str, int | str]:
        if self._p2p is None:
            raise PdorchError(ErrorCode.CONFIG, "this KV receiver has no p2p endpoint")
        if self._closed:
            raise PdorchError(ErrorCode.CANCELLED, "KV receiver closed")
        if not self._p2p.alive:
            raise PdorchError(ErrorCode.INTERNAL, "the KV receiver's p2p endpoint has stopped (see the log)")
        outcome: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        expected = Expected(transfer_id, sink, outcome)
        self._p2p.expect(expected)
        # The endpoint's thread only ever sets a result: an error here is the deadline's.
        timer = Deadline(deadline_s).fail_at(outcome, ErrorCode.KV_TIMEOUT, "late")
        watch = None
        if on_arriving is not None:
            watch = ArrivalWatch(
                lambda: expected.transfer.chunks_received if expected.transfer else 0, on_arriving
            )
        try:
            error, trailer = await outcome
        except PdorchError as e:
            waited_for = "the rest of" if expected.transfer is not None else "a sender to begin"
            error = PdorchError(e.code, f"timed out waiting for {waited_for} transfer {transfer_id}")
            self._p2p.give_up(transfer_id, error)
            return self._outcome(error, {})
        except BaseException:  # cancelled: stop waiting, tell the sender
            self._p2p.give_up(transfer_id, PdorchError(ErrorCode.CANCELLED, "the decode job was cancelled"))
            raise
        finally:
            timer.cancel()
            if watch is not None:
                watch.cancel()
        return self._outcome(error, trailer)

    def _outcome(self, error: PdorchError | None, trailer: dict[str, int | str]) -> dict[str, int | str]:
        if error is not None:
            self._stats.failed += 1
            raise error
        self._stats.completed += 1
        return trailer

    # ----------------------------------------------------------------- centralized

    async def _fetch(
        self, route: KvRoute, sink: KvSink, *, deadline_s: float, on_arriving: Callable[[], None] | None
    ) -> dict[str, int | str]:
        """Ask the broker the route names for its transfer (it deletes its copy only after this
        side acknowledged the whole transfer)."""
        broker, transfer_id = route.endpoint, route.transfer_id
        link = self._links.get((broker, route.server_key))
        if link is not None and link.broken:  # refused once: libzmq will not try again, we will
            del self._links[(broker, route.server_key)]
            if link.idle:
                await link.close()
            else:  # its failing fetches still hold it; they close with the receiver
                self._retired.append(link)
            link = None
        if link is None:
            auth = self._security.client(Plane.KV, route.server_key)
            link = self._links[(broker, route.server_key)] = DealerLink(self._ctx, broker, auth)
        if link.has(transfer_id):
            raise PdorchError(ErrorCode.INTERNAL, f"transfer {transfer_id} is already being fetched")
        deadline = Deadline(deadline_s)
        state = FetchTransfer(transfer_id, sink, self._window_bytes, link)
        link.register(transfer_id, state.handle)
        self._fetches.add(state)
        watch = ArrivalWatch(lambda: state.chunks_received, on_arriving) if on_arriving else None
        try:
            wait_ms = max(1, int(deadline.remaining() * 1000))
            await link.send(KvFetch(version=KV_PROTOCOL_VERSION, transfer_id=transfer_id, wait_ms=wait_ms))
            try:
                await deadline.wait(state.done.wait(), f"the broker to deliver transfer {transfer_id}")
            except PdorchError as e:
                state.fail(e)
            return self._outcome(state.error, state.trailer)
        finally:
            if watch is not None:
                watch.cancel()
            link.unregister(transfer_id)
            self._fetches.discard(state)
