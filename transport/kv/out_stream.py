"""The sending half of one transfer: begin, chunks under credit, end, and the receiver's verdict.

The same class serves a prefill agent sending to a decode agent or to the broker (over a DEALER),
and the broker serving a fetch (over its ROUTER): only the ``send`` function differs. When the
receiver offers a shared ring (a same-host p2p transfer, ``same_host/``), chunks are written into
it and announced with ``KvShmChunk`` instead of being sent. An eager transfer (a small one,
``KvBegin.eager``) sends everything at once; if the receiver was not ready for it, it is begun again
the usual way, from the rows it kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
from collections.abc import Awaitable, Callable

import numpy as np

from transport.errors import ErrorCode, PdorchError
from transport.kv.checksum import checksum_rows_for, span_checksums
from transport.kv.chunking import chunk_spans, rows_per_chunk
from transport.kv.deadline import Deadline
from transport.kv.flow_control import SendCredit
from transport.kv.messages import (
    EAGER_MAX_BYTES,
    KV_PROTOCOL_VERSION,
    KvAbort,
    KvAccept,
    KvAck,
    KvBegin,
    KvChunk,
    KvCredit,
    KvEnd,
    KvMessage,
    KvNack,
    KvShmChunk,
    KvShmRing,
    nack_error,
)
from transport.kv.same_host import SameHostMode, host_identity
from transport.kv.same_host.attached import AttachedRings
from transport.kv.same_host.ring import Ring, place

log = logging.getLogger(__name__)

SendFn = Callable[[KvMessage], Awaitable[None]]


class KvOutStream:
    """One transfer being sent. Made by :meth:`KvSender.open`; not constructed by callers."""

    def __init__(
        self,
        *,
        transfer_id: str,
        num_layers: int,
        rows_per_layer: int,
        row_shape: tuple[int, ...],
        dtype: str,
        deadline: Deadline,
        send: SendFn,
        max_chunk_bytes: int,
        max_in_flight_bytes: int,
        on_closed: Callable[[], None] = lambda: None,
        checksum_rows: int | None = None,
        same_host: SameHostMode = SameHostMode.OFF,
        rings: AttachedRings | None = None,
        eager_max_bytes: int = 0,
    ) -> None:
        """``checksum_rows``: rows per checksum; the broker passes the inbound transfer's, so that
        the checksums it stored stay valid when it forwards the chunks. ``same_host``: whether to
        ask for a shared ring and write chunks into it (mapped through ``rings``).
        ``eager_max_bytes``: a transfer this small whose layers are one chunk each is sent whole
        without waiting for the receiver to accept it (at most ``EAGER_MAX_BYTES``; 0: never)."""
        self.transfer_id = transfer_id
        self.num_layers = num_layers
        self.rows_per_layer = rows_per_layer
        self.row_shape = tuple(row_shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = math.prod(self.row_shape) * self.dtype.itemsize
        rows_per_chunk(self.row_bytes, max_chunk_bytes)  # refuses rows that cannot fit in one frame
        self.checksum_rows = checksum_rows or checksum_rows_for(self.row_bytes)
        layer_bytes = self.row_bytes * rows_per_layer
        self.total_bytes = layer_bytes * num_layers
        if num_layers <= 0 or rows_per_layer <= 0:
            raise PdorchError(ErrorCode.INVALID_REQUEST, "a KV transfer needs at least one layer and one row")
        self._deadline = deadline
        # One loop timer per transfer (armed once the begin is sent, cancelled when it closes)
        # rather than a timeout scope around every wait: it wakes whatever waits, which then fails.
        self._timer: asyncio.TimerHandle | None = None
        self._timed_out = False
        self._expiry: asyncio.Task[None] | None = None
        self._giving_up = False  # the abort is being sent: one is enough
        self._send = send
        self._max_chunk_bytes = max_chunk_bytes
        self._max_in_flight_bytes = max_in_flight_bytes
        self._on_closed = on_closed
        self._accepted = asyncio.Event()
        self._settled = asyncio.Event()  # the receiver acked or nacked, or we gave up
        self._error: PdorchError | None = None
        self._closed = False
        self._nacked = False
        self._same_host = same_host if rings is not None else SameHostMode.OFF
        self._rings = rings
        self._ring_offer: KvShmRing | None = None
        self._ring: Ring | None = None
        self._start_sending()
        self._ring_lock = asyncio.Lock()  # a chunk's place and its sequence number are taken together
        self.used_ring = False  # chunks went through the receiver's shared ring
        # Sent without waiting for an accept (so far: see _begin_again).
        self.eager = (
            self.total_bytes <= min(eager_max_bytes, EAGER_MAX_BYTES) and layer_bytes <= max_chunk_bytes
        )
        self._not_ready = False  # the receiver turned the eager transfer away
        # What an eager transfer sent, kept to send again if the receiver was not ready for it.
        self._sent: list[tuple[int, int, np.ndarray, list[int] | None]] = []

    def _start_sending(self) -> None:
        """What a transfer has sent so far: nothing (at the start, and when begun again)."""
        self._credit = SendCredit(self._max_in_flight_bytes)
        self._chunk_rows, self._seq, self.bytes_sent = 1, 0, 0
        self._layer_rows = [0] * self.num_layers
        self._ring_decided = False
        self._ring_cursor = 0  # where the next chunk goes in the ring (ring.place)
        self._end_sent = False  # every byte was written: nothing more goes into a ring

    @property
    def peak_in_flight(self) -> int:
        """Most bytes ever in flight unacknowledged by credit (never above the receiver's window)."""
        return self._credit.peak_in_flight

    # ----------------------------------------------------------------- from the receiver

    def handle(self, msg: KvMessage) -> None:
        """A message from the receiver for this transfer."""
        if isinstance(msg, KvAccept) and not self._accepted.is_set():
            window_chunk = max(self.row_bytes, msg.credit_bytes // 2)
            self._chunk_rows = rows_per_chunk(self.row_bytes, min(self._max_chunk_bytes, window_chunk))
            self._credit.grant(msg.credit_bytes)
            self._ring_offer = msg.ring
            self._accepted.set()
        elif isinstance(msg, KvCredit):
            self._credit.grant(msg.credit_bytes)
        elif isinstance(msg, KvAck):
            self._settled.set()
        elif isinstance(msg, KvNack):
            if self.eager and msg.code == ErrorCode.KV_NOT_READY and not self._not_ready:
                self._not_ready = True
                self._settled.set()  # no verdict (see _verdict_in): wakes finish(), which begins again
                return
            self._nacked = True
            self._fail(nack_error(msg))

    @property
    def _verdict_in(self) -> bool:
        """The receiver acked or nacked, or this side gave up (not: it was not ready yet)."""
        return self._settled.is_set() and not self._not_ready

    def _fail(self, error: PdorchError) -> None:
        if self._error is None and not self._verdict_in:
            self._error = error
        self._credit.fail(self._error or error)
        self._accepted.set()
        self._settled.set()

    def _expire(self) -> None:
        """The deadline passed before the receiver's verdict: wake every wait, each then fails with
        ``KV_TIMEOUT`` and tells the receiver (abort), as a wait that timed out itself would."""
        if self._closed or self._verdict_in:
            return
        self._timed_out = True
        self._credit.fail(
            PdorchError(ErrorCode.KV_TIMEOUT, "timed out waiting for KV credit from the receiver")
        )
        self._accepted.set()
        self._settled.set()
        # A caller that stopped calling (neither more rows, nor finish, nor abort) would hold the
        # transfer open, and the receiver's buffers with it, until its own idle limit: close it here.
        self._expiry = asyncio.get_running_loop().create_task(self._give_up(self._late()))

    def _late(self) -> PdorchError:
        return PdorchError(ErrorCode.KV_TIMEOUT, f"transfer {self.transfer_id} passed its deadline")

    async def _wait(self, event: asyncio.Event, what: str) -> None:
        if not event.is_set():
            await event.wait()
        self._raise_if_late(what)

    def _raise_if_late(self, what: str) -> None:
        """``what``: the receiver's step this transfer waits for (named with the transfer when late)."""
        if self._timed_out:
            raise PdorchError(
                ErrorCode.KV_TIMEOUT, f"timed out waiting for the receiver to {what} {self.transfer_id}"
            )

    # ----------------------------------------------------------------- the caller's side

    async def begin(self) -> None:
        await self._send(self._begin())
        if self.eager:
            # The receiver grants all of it by taking it; it offers no ring, so the socket carries it.
            self._credit.grant(self.total_bytes)
            self._chunk_rows = rows_per_chunk(self.row_bytes, min(self._max_chunk_bytes, self.total_bytes))
            self._ring_decided = True
            self._accepted.set()
        self._timer = asyncio.get_running_loop().call_at(self._deadline.at, self._expire)

    def _begin(self) -> KvBegin:
        return KvBegin(
            version=KV_PROTOCOL_VERSION,
            transfer_id=self.transfer_id,
            num_layers=self.num_layers,
            rows_per_layer=self.rows_per_layer,
            row_shape=list(self.row_shape),
            dtype=_dtype_name(self.dtype),
            checksum_rows=self.checksum_rows,
            host=host_identity() if self._same_host != SameHostMode.OFF and not self.eager else "",
            eager=self.eager,
        )

    async def _begin_again(self) -> None:
        """The receiver was not ready for the eager transfer (it dropped what came after the begin):
        begin it again the usual way, waiting for its accept, and send the same rows."""
        self._raise_if_over()  # failed or past its deadline meanwhile: nothing to begin again
        sent, self._sent = self._sent, []
        self.eager = self._not_ready = False
        self._accepted.clear()
        self._settled.clear()
        self._start_sending()
        await self._send(self._begin())
        for layer, row_offset, rows, known_checksums in sent:
            await self.send_rows(layer, row_offset, rows, known_checksums)

    async def send_layer(self, layer: int, rows: np.ndarray) -> None:
        """Send a whole layer (``rows.shape == (rows_per_layer, *row_shape)``), split into chunks, each
        sent once credit allows. ``rows`` is sent without a copy: do not modify it afterwards."""
        if not 0 <= layer < self.num_layers or self._layer_rows[layer]:
            raise PdorchError(ErrorCode.INTERNAL, f"layer {layer} out of range or already sent")
        if rows.shape != (self.rows_per_layer, *self.row_shape) or rows.dtype != self.dtype:
            raise PdorchError(
                ErrorCode.INTERNAL,
                f"layer {layer} is {rows.dtype}{rows.shape}, transfer expects "
                f"{self.dtype}{(self.rows_per_layer, *self.row_shape)}",
            )
        await self.send_rows(layer, 0, rows)

    async def send_rows(
        self, layer: int, row_offset: int, rows: np.ndarray, known_checksums: list[int] | None = None
    ) -> None:
        """Send ``rows`` of ``layer`` starting at ``row_offset``. The broker re-sends stored chunks so,
        with their ``known_checksums`` (used when they need no further split)."""
        self._raise_if_over()
        try:
            if not self._accepted.is_set():
                await self._wait(self._accepted, "accept")
                self._raise_if_over()
            self._raise_if_late("take")
            rows = np.ascontiguousarray(rows)
            if self.eager:
                self._sent.append((layer, row_offset, rows, known_checksums))
            if self._take_ring() is not None:
                await self._write_rows(layer, row_offset, rows)
                return
            spans = chunk_spans(rows.shape[0], self._chunk_rows)
            for start, count in spans:
                part = rows[start : start + count]
                await self._credit.take(part.nbytes)
                if known_checksums is not None and len(spans) == 1:
                    digests = known_checksums
                else:
                    digests = span_checksums(part, self.checksum_rows)
                chunk = KvChunk(
                    transfer_id=self.transfer_id,
                    seq=self._seq,
                    layer=layer,
                    row_offset=row_offset + start,
                    checksums=digests,
                    rows=part,
                )
                # Counted before the send suspends, so overlapping calls never reuse a sequence number.
                self._seq += 1
                self._layer_rows[layer] += count
                self.bytes_sent += part.nbytes
                await self._send(chunk)
        except PdorchError as e:
            await self._give_up(e)
            raise

    def _take_ring(self) -> Ring | None:
        """The receiver's shared ring, mapped on first use after acceptance; None: use the socket."""
        if self._ring_decided or self._same_host == SameHostMode.OFF or self._rings is None:
            return self._ring
        self._ring_decided = True
        if self._ring_offer is None:
            if self._same_host == SameHostMode.ON:
                raise PdorchError(ErrorCode.CONFIG, "same-host KV is forced on; the receiver offered no ring")
            return None
        try:
            self._ring = self._rings.take(self._ring_offer)
        except PdorchError as e:
            if self._same_host == SameHostMode.ON:
                raise
            # Once per sender: with auto, every transfer to that receiver would say the same.
            level = logging.DEBUG if self._rings.fell_back else logging.WARNING
            self._rings.fell_back = True
            log.log(level, "transfer %s goes through the socket: %s", self.transfer_id, e.message)
            return None
        self.used_ring = True
        return self._ring

    async def _write_rows(self, layer: int, row_offset: int, rows: np.ndarray) -> None:
        """The same-host path of :meth:`send_rows`: each chunk (at most a slot's worth of rows) is
        written at its place in the ring, then announced; a place is written only under credit,
        i.e. once emptied."""
        ring = self._ring
        assert ring is not None
        for start, count in chunk_spans(rows.shape[0], max(1, ring.slot_bytes // self.row_bytes)):
            part = rows[start : start + count]
            async with self._ring_lock:
                offset, charge, cursor = place(self._ring_cursor, part.nbytes, ring.size, ring.slot_bytes)
                await self._credit.take(charge)
                self._ring_cursor = cursor
                seq = self._seq
                digests = ring.write(offset, part, self.checksum_rows)
                self._seq += 1
            self._layer_rows[layer] += count
            self.bytes_sent += part.nbytes
            await self._send(
                KvShmChunk(
                    transfer_id=self.transfer_id,
                    seq=seq,
                    layer=layer,
                    row_offset=row_offset + start,
                    checksums=digests,
                    rows=count,
                )
            )

    async def finish(self, trailer: dict[str, int | str]) -> None:
        """Send the end of the transfer and wait for the receiver's verdict; raise if it refused."""
        self._raise_if_over()
        try:
            await self._end(trailer)
            if self._not_ready:
                await self._begin_again()
                await self._end(trailer)
        except PdorchError as e:
            await self._give_up(e)
            raise
        self._close()
        if self._error is not None:
            raise self._error

    async def _end(self, trailer: dict[str, int | str]) -> None:
        end = KvEnd(
            transfer_id=self.transfer_id,
            chunks=self._seq,
            payload_bytes=self.bytes_sent,
            layer_rows=list(self._layer_rows),
            trailer=dict(trailer),
        )
        self._raise_if_late("take")
        await self._send(end)
        self._end_sent = True
        await self._wait(self._settled, "confirm")

    async def abort(self, reason: str) -> None:
        """Give up the transfer and tell the receiver (best effort). Never raises."""
        await self._give_up(PdorchError(ErrorCode.CANCELLED, f"sender aborted: {reason}"), reason)

    async def _give_up(self, error: PdorchError, reason: str | None = None) -> None:
        if self._closed or self._giving_up:
            return
        self._giving_up = True
        told_by_receiver = self._error is not None
        self._fail(error)
        try:
            if not told_by_receiver:
                with contextlib.suppress(Exception):
                    await self._send(KvAbort(transfer_id=self.transfer_id, reason=reason or error.message))
        finally:  # closed even if cancelled while telling the receiver: no later give-up would
            self._close()

    def _raise_if_over(self) -> None:
        if self._error is not None:
            self._close()
            raise self._error
        if self._timed_out:
            raise self._late()
        if self._closed:
            raise PdorchError(ErrorCode.INTERNAL, f"transfer {self.transfer_id} is already finished")

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._sent.clear()
            if self._timer is not None:
                self._timer.cancel()
            if self._ring is not None and self._rings is not None:
                # Kept mapped after an acknowledged transfer: the receiver lends it again (sealed,
                # so only through this mapping). So too when this side was cancelled while waiting
                # for the verdict of a transfer it had finished writing: the receiver most likely
                # took it (and if not, closes its side; the idle mapping here goes in time). Not
                # after a timeout: the receiver may be dead, and its pages go with our mapping.
                acked = self._error is None and self._verdict_in and not self._timed_out
                cancelled = self._error is not None and self._error.code is ErrorCode.CANCELLED
                self._rings.release(
                    self._ring, ok=acked or (self._end_sent and cancelled and not self._nacked)
                )
            # Dropped once called: it holds this stream (a cycle only the garbage collector would
            # free, per transfer).
            on_closed, self._on_closed = self._on_closed, _nothing
            on_closed()


def _nothing() -> None:
    pass


@functools.cache
def _dtype_name(dtype: np.dtype) -> str:
    # numpy works a dtype's name out in Python on every access (~5 us, once per transfer).
    return dtype.name
