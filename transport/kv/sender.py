"""The prefill side of the KV plane: opens transfers to decode agents (p2p) or to the broker.

One :class:`KvSender` per prefill agent process. It keeps one DEALER per destination endpoint (a
decode agent's KV endpoint or the broker) and server key, shared by every transfer to that
destination; a destination with no transfer in progress is closed when more than ``max_links`` are
open. Each connection pins the server key its route names, so KV only ever reaches the worker or
broker the scheduler meant.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import zmq.asyncio

from transport.errors import ErrorCode, PdorchError
from transport.kv.deadline import Deadline
from transport.kv.dealer_link import DealerLink
from transport.kv.messages import EAGER_MAX_BYTES
from transport.kv.out_stream import KvOutStream
from transport.kv.same_host import SameHostMode
from transport.kv.same_host.attached import AttachedRings
from transport.messages import KvMode, KvRoute
from transport.security import Plane, Security

DEFAULT_MAX_CHUNK_BYTES = 1024 * 1024
DEFAULT_SENDER_WINDOW_BYTES = 64 * 1024 * 1024
# On close, the aborts of the transfers still open get this long to leave (an eager transfer may be
# queued whole behind a connection still being made).
CLOSE_LINGER_MS = 500


class KvSender:
    def __init__(
        self,
        ctx: zmq.asyncio.Context,
        *,
        security: Security,
        window_bytes: int = DEFAULT_SENDER_WINDOW_BYTES,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        max_links: int = 64,
        same_host: SameHostMode = SameHostMode.AUTO,
        eager_max_bytes: int = EAGER_MAX_BYTES,
    ) -> None:
        """``window_bytes`` caps this sender's bytes in flight per transfer, on top of the credit
        the receiver grants (the smaller wins); ``max_chunk_bytes`` (<= 16 MiB) sizes the chunks.
        ``same_host``: whether to write into a receiver's shared ring when it offers one (auto),
        insist on one (on: a transfer without fails with ``CONFIG``) or never ask (off).
        ``eager_max_bytes``: p2p transfers up to this size (at most ``EAGER_MAX_BYTES``; 0: none),
        each layer one chunk, go eagerly, without waiting for the receiver's accept (not with
        ``same_host`` on, which insists on the ring)."""
        self._ctx = ctx
        self._security = security
        self._window_bytes = window_bytes
        self._max_chunk_bytes = max_chunk_bytes
        self._max_links = max_links
        self._links: OrderedDict[tuple[str, str], DealerLink] = OrderedDict()
        self._retired: list[DealerLink] = []
        self._streams: set[KvOutStream] = set()
        self._closed = False
        self._same_host = same_host
        self._rings = AttachedRings() if same_host != SameHostMode.OFF else None
        self._eager_max_bytes = 0 if same_host == SameHostMode.ON else eager_max_bytes
        self.same_host_transfers = 0
        self.eager_transfers = 0  # transfers that went eagerly to the end (not begun again)

    async def open(
        self,
        route: KvRoute,
        *,
        num_layers: int,
        rows_per_layer: int,
        row_shape: tuple[int, ...],
        dtype: str,
        deadline_s: float,
    ) -> KvOutStream:
        """Announce a transfer to ``route.endpoint``; returns at once (the first ``send_layer``
        waits until the receiver accepts, unless the transfer is eager). ``deadline_s`` bounds the
        whole transfer."""
        if self._closed:
            raise PdorchError(ErrorCode.INTERNAL, "KV sender is closed")
        link = await self._link(route.endpoint, route.server_key)
        if link.has(route.transfer_id):
            raise PdorchError(ErrorCode.INTERNAL, f"transfer {route.transfer_id} is already open")
        stream = KvOutStream(
            transfer_id=route.transfer_id,
            num_layers=num_layers,
            rows_per_layer=rows_per_layer,
            row_shape=tuple(row_shape),
            dtype=dtype,
            deadline=Deadline(deadline_s),
            send=link.send,
            max_chunk_bytes=self._max_chunk_bytes,
            max_in_flight_bytes=self._window_bytes,
            on_closed=lambda: self._forget(link, stream),
            # Only a decode agent's own endpoint lends rings; the broker keeps what it receives.
            same_host=self._same_host if route.mode == KvMode.P2P else SameHostMode.OFF,
            rings=self._rings,
            eager_max_bytes=self._eager_max_bytes if route.mode == KvMode.P2P else 0,
        )
        link.register(route.transfer_id, stream.handle)
        self._streams.add(stream)
        try:
            await stream.begin()
        except BaseException:
            self._forget(link, stream)
            raise
        return stream

    def _forget(self, link: DealerLink, stream: KvOutStream) -> None:
        link.unregister(stream.transfer_id)
        self._streams.discard(stream)
        self.same_host_transfers += stream.used_ring
        self.eager_transfers += stream.eager

    async def _link(self, endpoint: str, server_key: str) -> DealerLink:
        # Keyed by the server key too: a worker restarted with another key at the same address
        # gets a new connection, pinned to its new key.
        key = (endpoint, server_key)
        for old in [r for r in self._retired if r.idle]:
            self._retired.remove(old)
            await old.close()
        link = self._links.get(key)
        if link is not None and link.broken:  # refused once: libzmq will not try again, we will
            del self._links[key]
            self._retired.append(link)  # closed once its failed transfers have let go of it
            link = None
        if link is not None:
            self._links.move_to_end(key)
            return link
        auth = self._security.client(Plane.KV, server_key)
        link = self._links[key] = DealerLink(self._ctx, endpoint, auth)
        for stale_key, stale in list(self._links.items()):
            if len(self._links) <= self._max_links:
                break
            if stale.idle and stale is not link:
                del self._links[stale_key]
                await stale.close()
        return link

    @property
    def dropped_messages(self) -> int:
        return sum(link.dropped_messages for link in self._links.values())

    async def close(self) -> None:
        """Abort the transfers still open (their receivers are told) and close every connection."""
        self._closed = True
        for stream in list(self._streams):
            await stream.abort("prefill side closed")
        links, self._links = [*self._links.values(), *self._retired], OrderedDict()
        self._retired = []
        await asyncio.gather(*(link.close(CLOSE_LINGER_MS) for link in links))
        if self._rings is not None:
            self._rings.close()

    @property
    def mapped_rings(self) -> int:
        """Receivers' shared rings this sender maps now (in use, or kept for the next transfer)."""
        return self._rings.mapped if self._rings is not None else 0
