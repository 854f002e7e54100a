"""The receiving half of one transfer: checks every chunk before the sink sees it.

Checks, in order, for each chunk: the sender held credit for it, it is the next in sequence (a gap
means a lost chunk: ``KV_TRUNCATED``), its geometry matches the begin message and it continues its
layer where the previous chunk stopped, it carries one checksum per span (else ``KV_CORRUPT``).
Then, span by span: the span's checksum matches (else ``KV_CORRUPT``) and only then are its rows
written to the sink, while they are still in cache (see checksum.py). The end message's totals
must match what arrived and cover every row of every layer (else ``KV_TRUNCATED``). Any failure is
final and is told to the sender (nack).

Used by the decode agent's receiver (p2p and fetch) and by the broker (storing a transfer).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import traceback
from collections.abc import Callable
from typing import Protocol

import numpy as np

from transport.errors import ErrorCode, PdorchError
from transport.kv.checksum import checksum, min_checksum_rows, span_count
from transport.kv.flow_control import ReceiveWindow
from transport.kv.messages import (
    EAGER_MAX_BYTES,
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
    nack_error,
)
from transport.kv.same_host.ring import Ring, place

log = logging.getLogger(__name__)

# Sends a reply without waiting (a peer that is gone or not reading loses it); may raise.
ReplyFn = Callable[[KvMessage], None]
# Geometry bounds for a begin message: refuse absurd announcements before acting on them.
MAX_LAYERS = 4096
MAX_ROW_DIMS = 7


class KvSink(Protocol):
    """Where verified rows go on the receiving side (e.g. the engine's paged KV cache).

    ``rows`` is a read-only view over the received frame, or over a slot of a same-host ring that
    is reused once ``write`` returns: copy what you keep. (The broker's :class:`ChecksummedKvSink`
    keeps frames; it is never lent a ring.)"""

    def write(self, layer: int, row_offset: int, rows: np.ndarray) -> None: ...


class ChecksummedKvSink(Protocol):
    """A sink that keeps each chunk whole with its verified checksums (the broker: it re-sends chunks
    as they came, so it need not hash them again). It gets a chunk once all its spans verified."""

    def write_checksummed(
        self, layer: int, row_offset: int, rows: np.ndarray, checksums: list[int]
    ) -> None: ...


def validate_begin(begin: KvBegin) -> int:
    """Row size in bytes of a plausible begin message; ``BAD_MESSAGE`` otherwise."""
    try:
        dtype = np.dtype(begin.dtype)
    except TypeError:
        raise PdorchError(ErrorCode.BAD_MESSAGE, f"unknown dtype {begin.dtype!r}") from None
    if (
        dtype.hasobject
        or dtype.itemsize == 0
        or not 0 < begin.num_layers <= MAX_LAYERS
        or begin.rows_per_layer <= 0
        or len(begin.row_shape) > MAX_ROW_DIMS
        or any(d <= 0 for d in begin.row_shape)
    ):
        raise PdorchError(ErrorCode.BAD_MESSAGE, f"implausible KV geometry in begin of {begin.transfer_id}")
    row_bytes = math.prod(begin.row_shape) * dtype.itemsize  # exact (np.prod would wrap at 2**63)
    if begin.checksum_rows < min_checksum_rows(row_bytes):
        raise PdorchError(
            ErrorCode.BAD_MESSAGE, f"{begin.checksum_rows} rows per checksum in begin of {begin.transfer_id}"
        )
    if begin.eager and row_bytes * begin.rows_per_layer * begin.num_layers > EAGER_MAX_BYTES:
        too_big = f"eager transfer {begin.transfer_id} is larger than {EAGER_MAX_BYTES} bytes"
        raise PdorchError(ErrorCode.BAD_MESSAGE, too_big)
    return row_bytes


class InTransfer:
    def __init__(
        self,
        begin: KvBegin,
        sink: KvSink,
        window_bytes: int,
        reply: ReplyFn,
        on_finish: Callable[[InTransfer], None] | None = None,
        ring: Ring | None = None,
    ) -> None:
        """``begin`` must have passed :func:`validate_begin`. ``on_finish`` is called once, when the
        transfer completed or failed. ``ring``: a shared ring offered to a same-host sender (the
        window is then the ring; the sink must copy what it keeps). Not tied to an event loop: the
        p2p receiver runs it on its own thread."""
        self.transfer_id = begin.transfer_id
        self.begin = begin
        self._sink = sink
        # Decided once: a runtime Protocol check is far too slow to make per chunk.
        # A plain attribute look-up: isinstance against a runtime-checkable Protocol costs more
        # than the rest of a small transfer's set-up.
        self._checksummed_sink: ChecksummedKvSink | None = (
            sink if hasattr(sink, "write_checksummed") else None  # type: ignore[assignment]
        )
        self._reply = reply
        self._dtype = np.dtype(begin.dtype)
        self._row_shape = tuple(begin.row_shape)
        self.row_bytes = validate_begin(begin)
        self._checksum_rows = begin.checksum_rows
        self.total_bytes = self.row_bytes * begin.rows_per_layer * begin.num_layers
        # At least two rows of credit, so a chunk always fits however small the configured window;
        # an eager transfer holds credit for all of itself from its begin (it is small: messages.py).
        floor = max(2 * self.row_bytes, self.total_bytes if begin.eager else 0)
        self._window = ReceiveWindow(max(window_bytes, floor) if ring is None else ring.size)
        self.ring = ring
        self.ring_used = False
        self._ring_cursor = 0  # where the sender put the next chunk (ring.place, run on both sides)
        self._next_seq = 0
        self._layer_rows = [0] * begin.num_layers
        self.accepted_at: float | None = None
        self._payload_bytes = 0
        self.finished = False
        self._on_finish = on_finish
        # time.monotonic() of the last sign of life from the sender, from acceptance on. Senders
        # open a transfer when its first rows exist, so an accepted transfer that goes quiet is dead.
        self.last_activity: float | None = None
        self.error: PdorchError | None = None
        self.trailer: dict[str, int | str] = {}

    @property
    def window_bytes(self) -> int:
        return self._window.window

    @property
    def chunks_received(self) -> int:
        return self._next_seq

    def accept(self) -> None:
        """Take the transfer: grant the window (an eager one's sender holds it already: no accept)."""
        self.accepted_at = self.last_activity = time.monotonic()
        offer = self.ring.offer if self.ring is not None else None
        credit = self._window.first_grant()
        if not self.begin.eager:
            self._send(KvAccept(transfer_id=self.transfer_id, credit_bytes=credit, ring=offer))

    def handle(self, msg: KvMessage) -> None:
        if self.finished:
            return
        if isinstance(msg, KvChunk | KvShmChunk | KvEnd):
            self.last_activity = time.monotonic()
        if isinstance(msg, KvChunk):
            self._on_chunk(msg)
        elif isinstance(msg, KvShmChunk):
            self._on_shm_chunk(msg)
        elif isinstance(msg, KvEnd):
            self._on_end(msg)
        elif isinstance(msg, KvAbort):
            self.fail(ErrorCode.KV_TRUNCATED, f"sender aborted: {msg.reason}", tell_sender=False)
        elif isinstance(msg, KvNack):  # the broker refusing a fetch
            self._finish(nack_error(msg))

    def _on_shm_chunk(self, msg: KvShmChunk) -> None:
        """A chunk the sender wrote into the ring: checked exactly as a sent one, and charged the
        credit of its place, so the sender never writes a place that was not emptied yet."""
        ring = self.ring
        if ring is None:
            self.fail(ErrorCode.KV_CORRUPT, "a shared-memory chunk, but no ring was offered")
            return
        nbytes = msg.rows * self.row_bytes
        if not 0 < nbytes <= ring.slot_bytes:
            self.fail(ErrorCode.KV_CORRUPT, f"shared chunk {msg.seq} of {msg.rows} rows does not fit a slot")
            return
        if not self.ring_used:  # the sender has mapped it: nobody else may open it from now on
            ring.seal()
            self.ring_used = True
        offset, charge, self._ring_cursor = place(self._ring_cursor, nbytes, ring.size, ring.slot_bytes)
        rows = ring.rows(offset, msg.rows, self._dtype, self._row_shape, self.row_bytes)
        chunk = KvChunk(self.transfer_id, msg.seq, msg.layer, msg.row_offset, msg.checksums, rows)
        self._on_chunk(chunk, charge=charge)

    def _on_chunk(self, chunk: KvChunk, charge: int = 0) -> None:
        """``charge``: the credit the chunk takes (default: its bytes)."""
        rows = chunk.rows
        charge = charge or rows.nbytes
        if not self._window.on_arrival(charge):
            self.fail(ErrorCode.KV_CORRUPT, "sender exceeded its credit")
            return
        if chunk.seq != self._next_seq:
            self.fail(ErrorCode.KV_TRUNCATED, f"chunk {self._next_seq} is missing (got {chunk.seq})")
            return
        problem = self._geometry_problem(chunk)
        if problem:
            self.fail(ErrorCode.KV_CORRUPT, problem)
            return
        try:
            problem = self._verify_and_write(chunk)
        except PdorchError as e:
            self.fail(e.code, f"sink refused rows: {e.message}")
            return
        except Exception as e:  # a bug in the sink fails this transfer, not the receiver
            # Logged as text: a record holding the traceback would hold its frames' views of the
            # rows, and so keep a shared ring mapped for as long as a handler keeps the record.
            trace = "".join(traceback.format_exception(e))
            log.error("KV sink failed on transfer %s:\n%s", self.transfer_id, trace)
            self.fail(ErrorCode.INTERNAL, f"sink failed: {e!r}")
            return
        if problem:
            self.fail(ErrorCode.KV_CORRUPT, problem)
            return
        self._next_seq += 1
        self._layer_rows[chunk.layer] += rows.shape[0]
        self._payload_bytes += rows.nbytes
        regrant = self._window.on_consumed(charge)
        if regrant:
            self._send(KvCredit(transfer_id=self.transfer_id, credit_bytes=regrant))

    def _verify_and_write(self, chunk: KvChunk) -> str:
        """Verify each span and write it to the sink right after; stop at the first bad one. A
        checksummed sink gets the whole chunk once every span verified. Returns what was wrong
        ("" if nothing); the sink's exceptions propagate."""
        rows, digests, per = chunk.rows, chunk.checksums, self._checksum_rows
        n = rows.shape[0]
        if len(digests) != span_count(n, per):
            return f"chunk {chunk.seq} has {len(digests)} checksums for {span_count(n, per)} spans"
        plain_sink = None if self._checksummed_sink is not None else self._sink
        for i, start in enumerate(range(0, n, per)):
            span = rows[start : start + per]
            if checksum(span) != digests[i]:
                return f"checksum mismatch in chunk {chunk.seq}, span {i}"
            if plain_sink is not None:
                plain_sink.write(chunk.layer, chunk.row_offset + start, span)
        if self._checksummed_sink is not None:
            self._checksummed_sink.write_checksummed(chunk.layer, chunk.row_offset, rows, digests)
        return ""

    def _geometry_problem(self, chunk: KvChunk) -> str:
        rows = chunk.rows
        if rows.dtype != self._dtype or rows.ndim == 0 or rows.shape[1:] != self._row_shape:
            expected = f"{self._dtype}[*, {self._row_shape}]"
            return f"chunk {chunk.seq} is {rows.dtype}{rows.shape}, begin said {expected}"
        if not 0 <= chunk.layer < len(self._layer_rows):
            return f"chunk {chunk.seq} names layer {chunk.layer} of {len(self._layer_rows)}"
        expected_offset = self._layer_rows[chunk.layer]
        if chunk.row_offset != expected_offset or rows.shape[0] == 0:
            return f"chunk {chunk.seq} starts at row {chunk.row_offset}, expected {expected_offset}"
        if expected_offset + rows.shape[0] > self.begin.rows_per_layer:
            return f"chunk {chunk.seq} runs past the end of layer {chunk.layer}"
        return ""

    def _on_end(self, end: KvEnd) -> None:
        complete = [self.begin.rows_per_layer] * self.begin.num_layers
        if end.chunks != self._next_seq or end.payload_bytes != self._payload_bytes:
            self.fail(
                ErrorCode.KV_TRUNCATED,
                f"end says {end.chunks} chunks / {end.payload_bytes} bytes, "
                f"received {self._next_seq} / {self._payload_bytes}",
            )
        elif end.layer_rows != self._layer_rows or self._layer_rows != complete:
            self.fail(ErrorCode.KV_TRUNCATED, "not every row of every layer arrived")
        else:
            self.trailer = dict(end.trailer)
            self._finish(None)
            self._send(KvAck(transfer_id=self.transfer_id))

    def fail(self, code: ErrorCode, message: str, *, tell_sender: bool = True) -> None:
        """End the transfer with an error; tell the sender unless it is the one who gave up."""
        if self.finished:
            return
        self._finish(PdorchError(code, f"transfer {self.transfer_id}: {message}"))
        if tell_sender:
            self._send(KvNack(transfer_id=self.transfer_id, code=str(code), message=message))

    def _finish(self, error: PdorchError | None) -> None:
        if not self.finished:
            self.error = error
            self.finished = True
            # Dropped once called: it may hold what holds this transfer, a cycle only the garbage
            # collector would free (per transfer, ~5% of a decode agent's CPU under load).
            on_finish, self._on_finish = self._on_finish, None
            if on_finish is not None:
                on_finish(self)

    def _send(self, msg: KvMessage) -> None:
        # The peer may be gone or stuck; the transfer's deadline deals with that, not the reply.
        with contextlib.suppress(Exception):
            self._reply(msg)
