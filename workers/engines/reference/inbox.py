"""What other threads hand the engine thread: new requests, handoff reservations, cancellations.

One lock guards it all, and every method is short, so the agent's event loop never waits for a
step to finish. The engine thread takes arrivals and cancellations at the start of each step and
publishes its own counts at the end, for :meth:`RequestInbox.load`.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterable, Sequence

import msgspec

from transport.errors import ErrorCode, PdorchError
from transport.messages import Load
from workers.engines.reference.prefix_cache import PrefixCache
from workers.engines.reference.sequence import EngineSequence, SequenceKind


class Reservation(msgspec.Struct, frozen=True):
    blocks: list[int]
    num_prompt_tokens: int


class EngineStats(msgspec.Struct, frozen=True):
    """Counts of engine-thread state, published at the end of every step."""

    running: int = 0
    waiting: int = 0
    queued_prefill_tokens: int = 0


class RequestInbox:
    def __init__(self, prefix_cache: PrefixCache) -> None:
        self._prefix_cache = prefix_cache
        self._allocator = prefix_cache.allocator
        self._lock = threading.Lock()
        self._arrived: list[EngineSequence] = []
        self._cancelled: list[EngineSequence] = []
        self._live: dict[str, EngineSequence] = {}
        self._reserved: dict[str, Reservation] = {}
        self._stats = EngineStats()

    # ------------------------------------------------------------------ any thread

    def submit(self, seq: EngineSequence) -> None:
        with self._lock:
            self._check_new_id(seq.request_id)
            self._live[seq.request_id] = seq
            self._arrived.append(seq)

    def reserve(self, request_id: str, num_blocks: int, num_prompt_tokens: int) -> list[int]:
        with self._lock:
            self._check_new_id(request_id)
            blocks = self._allocator.allocate(num_blocks)
            self._reserved[request_id] = Reservation(blocks, num_prompt_tokens)
        return blocks

    def start_decode(self, seq: EngineSequence, block_hashes: Sequence[int]) -> None:
        """Turn ``seq``'s reservation into its blocks (atomically, so a cancel never misses both)."""
        with self._lock:
            reservation = self._reserved.get(seq.request_id)
            if reservation is None:
                raise PdorchError(ErrorCode.INVALID_REQUEST, f"no KV blocks reserved for {seq.request_id}")
            if reservation.num_prompt_tokens != seq.prompt_len:
                raise PdorchError(
                    ErrorCode.INVALID_REQUEST,
                    f"{seq.request_id}: blocks reserved for {reservation.num_prompt_tokens} prompt tokens, "
                    f"add_decode says {seq.prompt_len}",
                )
            del self._reserved[seq.request_id]
            seq.blocks = list(reservation.blocks)
            self._prefix_cache.publish_blocks(seq.blocks, block_hashes)
            self._live[seq.request_id] = seq
            self._arrived.append(seq)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            reservation = self._reserved.pop(request_id, None)
            if reservation is not None:
                self._allocator.free(reservation.blocks)
                return
            seq = self._live.pop(request_id, None)
            if seq is not None:
                seq.cancelled = True
                self._cancelled.append(seq)

    def has_work(self) -> bool:
        with self._lock:
            stats = self._stats
            return bool(self._arrived or self._cancelled or stats.running or stats.waiting)

    def load(self) -> Load:
        with self._lock:
            stats = self._stats
            queued = [s for s in self._arrived if s.kind is not SequenceKind.DECODE]
            blocks = self._allocator.counts()
            return Load(
                blocks_used=blocks.used,
                blocks_total=blocks.total,
                running=stats.running,
                waiting=stats.waiting + len(self._arrived),
                queued_prefill_tokens=stats.queued_prefill_tokens + sum(s.prompt_len for s in queued),
                cached_blocks=blocks.cached,
            )

    # ------------------------------------------------------------------ engine thread

    def take(self) -> tuple[list[EngineSequence], list[EngineSequence]]:
        """Everything that arrived and everything cancelled since the last call."""
        with self._lock:
            arrived, self._arrived = self._arrived, []
            cancelled, self._cancelled = self._cancelled, []
        return arrived, cancelled

    def forget(self, seq: EngineSequence) -> None:
        """``seq`` finished: its id may be used again."""
        with self._lock:
            if self._live.get(seq.request_id) is seq:
                del self._live[seq.request_id]

    def publish(self, stats: EngineStats) -> None:
        with self._lock:
            self._stats = stats

    def check_references(self, engine_sequences: Iterable[EngineSequence]) -> None:
        """Raise INTERNAL unless the allocator's reference counts are exactly the blocks held by
        ``engine_sequences``, the untaken arrivals and cancellations, and the reservations."""
        with self._lock:
            holders = {id(s): s for s in (*engine_sequences, *self._arrived, *self._cancelled)}
            held = Counter(b for seq in holders.values() for b in seq.blocks)
            held.update(b for reservation in self._reserved.values() for b in reservation.blocks)
            counted = self._allocator.reference_counts()
        if dict(held) != counted:
            raise PdorchError(
                ErrorCode.INTERNAL, f"KV block references {dict(held)} != allocator's {counted}"
            )

    def _check_new_id(self, request_id: str) -> None:
        if request_id in self._live or request_id in self._reserved:
            raise PdorchError(ErrorCode.INVALID_REQUEST, f"request id {request_id!r} is already in use")
