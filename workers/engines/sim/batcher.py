"""The simulated engine's batching loop, as a pure state machine over a caller-supplied clock.

Every call of :class:`SimBatcher` takes the time ``t`` in model seconds; nothing sleeps. It steps
discretely, one token per decode step, because a real-time worker streams each token, and it can
cancel any request at any moment and free its KV. The real-time engine (``engine.py``) drives one
with a scaled monotonic clock; tests drive it directly and count steps. The trace simulator uses a
faster fluid model of the same engine instead (``simulate/fluid.py``, whose docstring lists where
the two differ; a test checks that they agree).

One iteration, like vLLM's scheduler step:

* sequences whose KV has arrived or whose prompt is done join the running batch while it has a
  free slot (``max_batch``);
* every running sequence gets the block its next token needs; when the pool is full the most
  recently joined sequence is preempted (its KV freed, its context recomputed later: vLLM's
  recompute preemption). Prompts never cause preemption: they wait for room instead;
* the prompt being prefilled (FIFO; one at a time; its blocks taken when it starts, leading full
  blocks found in the prefix cache are skipped) runs a chunk of at most ``chunk_tokens`` when
  sequences decode, or whole otherwise, and every running sequence decodes one token in the same
  iteration (chunked prefill with piggybacked decodes);
* the iteration lasts what the :class:`CostModel` says: ``prefill_ms`` of the chunk (plus the decode
  step's marginal cost when mixed) or ``decode_step_ms(batch, context)``;
* LoRA adapters (``max_loras`` > 0): a prompt starting, or a handed-off sequence joining the batch,
  needs its adapter resident; at most ``max_loras`` are, least recently used evicted first, never one
  a request here uses (from its prompt's start, or its joining, until it is done here). Each load
  adds ``adapter_load_s`` to the iteration that needs it. A sequence whose adapter cannot get a
  slot waits, and the next one that can goes first (as vLLM's scheduler skips it).

A handoff prompt (``decode_here=False``) keeps its KV after token 0 until :meth:`release` (while the
KV is on the wire); a decode reservation holds blocks for the prompt and token 0 until the KV has
arrived (:meth:`start_decode`) or it is released.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Sequence
from typing import NamedTuple

import msgspec

from transport.errors import ErrorCode, PdorchError
from transport.messages import FinishReason, Load
from workers.engines.sim.adapter_slots import AdapterSlots
from workers.engines.sim.blocks import SimBlockPool
from workers.engines.sim.cost import CostModel
from workers.engines.sim.tokens import VOCAB_SIZE, SimTokenStream


class BatcherParams(msgspec.Struct, frozen=True):
    num_blocks: int
    block_size: int = 16
    max_batch: int = 256
    chunk_tokens: int = 512  # prompt tokens per iteration while sequences decode (0 = no limit)
    enable_prefix_caching: bool = True
    max_loras: int = 0  # LoRA adapter slots (0 = adapters are not limited and cost nothing)
    adapter_load_s: float = 0.0  # seconds (model time) per adapter load
    # No modelled time (the zero-cost engine): a sequence that joins the batch decodes to its end at
    # once, in one pass, when its KV fits (else it steps with the rest and may be preempted).
    decode_at_once: bool = False


class SimOutput(msgspec.Struct, gc=False):
    """New tokens of one request (``finish_reason`` set on its last); the first carries the prompt
    tokens served from the prefix cache."""

    request_id: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    cached_tokens: int = 0


class BatcherStats(msgspec.Struct, gc=False):
    iterations: int = 0
    prefill_iterations: int = 0  # iterations that computed a prompt chunk
    decode_iterations: int = 0  # iterations that decoded the running batch
    tokens: int = 0  # tokens decoded (token 0 of each prompt not included)
    peak_running: int = 0
    preemptions: int = 0
    prompt_tokens: int = 0  # of prompts started here (recomputes excluded)
    cached_tokens: int = 0  # of which served from the prefix cache
    busy_s: float = 0.0  # model seconds spent in iterations
    adapter_loads: int = 0


class SeqKind(enum.IntEnum):
    HANDOFF = 0  # prefill here, the KV leaves for a decode worker
    GENERATE = 1  # prefill and decode here
    DECODE = 2  # the KV comes from a prefill worker


class _Where(enum.IntEnum):
    QUEUED = 0
    PREFILLING = 1
    READY = 2  # waiting for a batch slot
    RUNNING = 3
    RESERVED = 4  # decode: blocks held, KV on its way
    HELD = 5  # handoff: prompt done, KV held until released


class _Seq:
    __slots__ = (
        "adapter",
        "cached_tokens",
        "ctx",
        "done",
        "generated",
        "hashes",
        "kind",
        "private",
        "recompute",
        "rid",
        "shared",
        "stream",
        "total",
        "where",
    )

    def __init__(
        self, rid: str, kind: SeqKind, stream: SimTokenStream, hashes: Sequence[int], adapter: str = ""
    ) -> None:
        self.rid = rid
        self.kind = kind
        self.adapter = adapter
        self.stream = stream
        self.hashes = hashes  # chained hashes of the prompt's full blocks
        self.total = stream.prompt_len  # tokens to (re)compute
        self.done = 0  # of which computed
        self.ctx = 0  # tokens whose KV this node holds
        self.generated = 0
        self.shared: list[int] = []  # prefix-cache blocks referenced
        self.private = 0  # blocks of its own
        self.recompute = False
        self.cached_tokens = 0
        self.where = _Where.QUEUED


class _Iteration(NamedTuple):
    end: float
    work: _Seq | None
    chunk_end: int
    batch: list[_Seq]


class SimBatcher:
    def __init__(self, cost: CostModel, params: BatcherParams) -> None:
        if params.max_batch <= 0 or params.block_size <= 0 or params.chunk_tokens < 0:
            raise PdorchError(ErrorCode.CONFIG, f"bad simulated engine parameters: {params}")
        self.cost = cost
        self.params = params
        self.pool = SimBlockPool(params.num_blocks, enable_prefix_caching=params.enable_prefix_caching)
        self.stats = BatcherStats()
        self.t = 0.0
        self._seqs: dict[str, _Seq] = {}
        self._queue: deque[_Seq] = deque()
        self._prefilling: _Seq | None = None
        self._ready: deque[_Seq] = deque()
        self._running: dict[str, _Seq] = {}  # in joining order: the last one is preempted first
        self._parked: dict[str, _Seq] = {}  # RESERVED and HELD
        self._iter: _Iteration | None = None
        self._out: list[SimOutput] = []
        self.adapters = AdapterSlots(params.max_loras)
        self._loads = 0  # adapter loads the next iteration pays for

    # ------------------------------------------------------------------ requests

    def add_prefill(
        self,
        t: float,
        rid: str,
        stream: SimTokenStream,
        hashes: Sequence[int],
        *,
        decode_here: bool,
        adapter: str = "",
    ) -> None:
        """Queue a prompt. ``decode_here``: generate the rest here too; else hold the KV after token 0
        until :meth:`release`."""
        self._sync(t)
        self._check_new(rid, stream.prompt_len + (1 if decode_here else 0))
        seq = _Seq(rid, SeqKind.GENERATE if decode_here else SeqKind.HANDOFF, stream, hashes, adapter)
        self._seqs[rid] = seq
        self._queue.append(seq)
        self._kick()

    def reserve_decode(
        self, t: float, rid: str, stream: SimTokenStream, hashes: Sequence[int], adapter: str = ""
    ) -> None:
        """Hold blocks for a handed-off prompt's KV and token 0; OUT_OF_BLOCKS if they are not free."""
        self._sync(t)
        blocks = self._blocks_for(stream.prompt_len + 1)
        self._check_new(rid, stream.prompt_len + 1)
        if not self.pool.allocate(blocks):
            raise PdorchError(
                ErrorCode.OUT_OF_BLOCKS,
                f"{rid}: no room for {blocks} KV blocks ({self.pool.free + self.pool.cached} free)",
            )
        seq = _Seq(rid, SeqKind.DECODE, stream, hashes, adapter)
        seq.private, seq.where = blocks, _Where.RESERVED
        self._seqs[rid] = seq
        self._parked[rid] = seq

    def start_decode(self, t: float, rid: str, first_token: int) -> None:
        """The reserved KV has arrived: decode from token 1 on (``first_token`` is token 0)."""
        self._sync(t)
        seq = self._parked.get(rid)
        if seq is None or seq.where is not _Where.RESERVED:
            raise PdorchError(ErrorCode.INTERNAL, f"{rid} has no decode reservation")
        if not 0 <= first_token < VOCAB_SIZE:
            raise PdorchError(ErrorCode.INVALID_REQUEST, f"first token {first_token} outside the vocabulary")
        if seq.stream.finish_reason(first_token, 1) is not None:
            raise PdorchError(ErrorCode.INVALID_REQUEST, f"request {rid} already finished at token 0")
        del self._parked[rid]
        seq.ctx, seq.generated = seq.total, 1
        self._publish_prompt(seq)
        seq.where = _Where.READY
        self._ready.append(seq)
        self._kick()

    def release(self, t: float, rid: str) -> None:
        """Forget ``rid`` wherever it is and free its blocks (full prompt blocks whose KV is here stay
        in the prefix cache). Its outputs not yet returned are dropped. Unknown ids are ignored."""
        self._sync(t)
        seq = self._seqs.pop(rid, None)
        if seq is None:
            return
        if seq.where is _Where.QUEUED:
            self._queue.remove(seq)
        elif seq.where is _Where.PREFILLING:
            self._prefilling = None  # the iteration in flight finishes without it
        elif seq.where is _Where.READY:
            self._ready.remove(seq)
        elif seq.where is _Where.RUNNING:
            del self._running[rid]
        else:
            del self._parked[rid]
        self._free_blocks(seq)
        self.adapters.unpin(rid)
        self._out = [o for o in self._out if o.request_id != rid]
        self._kick()

    # ------------------------------------------------------------------ time

    def advance(self, t: float) -> list[SimOutput]:
        """Run every iteration that ends by ``t``; return the outputs since the last call, one per
        request (tokens of several iterations merged, in order)."""
        self._sync(t)
        merged: dict[str, SimOutput] = {}
        for out in self._out:
            seen = merged.get(out.request_id)
            if seen is None:
                merged[out.request_id] = out
            else:
                seen.token_ids.extend(out.token_ids)
                seen.finish_reason = out.finish_reason
        self._out = []
        return list(merged.values())

    def next_event_time(self) -> float:
        """When the iteration in flight ends (``inf`` when idle: only a call can create work)."""
        return self._iter.end if self._iter is not None else math.inf

    # ------------------------------------------------------------------ observation

    def load(self) -> Load:
        queued = sum(s.total - s.done for s in self._queue)
        running = len(self._running)
        if self._prefilling is not None:
            running += 1
            queued += self._prefilling.total - self._prefilling.done
        return Load(
            blocks_used=self.pool.used,
            blocks_total=self.pool.total,
            running=running,
            waiting=len(self._queue) + len(self._ready),
            queued_prefill_tokens=queued,
            cached_blocks=self.pool.cached,
            adapter_slots=self.params.max_loras,
            adapters_resident=self.adapters.resident(),
        )

    def holds(self, rid: str) -> bool:
        return rid in self._seqs

    # ------------------------------------------------------------------ internals

    def _blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.params.block_size)

    def _check_new(self, rid: str, tokens: int) -> None:
        if rid in self._seqs:
            raise PdorchError(ErrorCode.INVALID_REQUEST, f"duplicate request id {rid}")
        if self._blocks_for(tokens) > self.pool.total:
            raise PdorchError(
                ErrorCode.OUT_OF_BLOCKS,
                f"{rid} needs {self._blocks_for(tokens)} KV blocks, the engine has {self.pool.total}",
            )

    def _sync(self, t: float) -> None:
        while self._iter is not None and self._iter.end <= t:
            self.t = self._iter.end
            self._end_iteration()
            self._start_iteration()
        self.t = max(self.t, t)

    def _kick(self) -> None:
        """Start an iteration now if the engine is idle (new work may be runnable)."""
        if self._iter is None:
            self._start_iteration()

    def _start_iteration(self) -> None:
        for seq in list(self._ready):
            if len(self._running) >= self.params.max_batch:
                break
            if not self._pin(seq):
                continue  # its adapter waits for a slot
            self._ready.remove(seq)
            seq.where = _Where.RUNNING
            self._running[seq.rid] = seq
            if self.params.decode_at_once:
                self._run_out(seq)
        batch = self._grow_batch()
        work = self._prefilling or self._start_next_prompt()
        if work is None and not batch:
            return
        chunk_end = 0
        context = sum(s.ctx for s in batch)
        if work is not None:
            chunk_end = work.total
            if batch and self.params.chunk_tokens > 0:
                chunk_end = min(chunk_end, work.done + self.params.chunk_tokens)
            ms = self.cost.prefill_ms(work.done, chunk_end)
            if batch:
                ms += self.cost.decode_marginal_ms(len(batch), context)
            self.stats.prefill_iterations += 1
        else:
            ms = self.cost.decode_step_ms(len(batch), context)
        if batch:
            self.stats.decode_iterations += 1
            self.stats.peak_running = max(self.stats.peak_running, len(batch))
        if self._loads:  # adapter loads stall this iteration
            ms += self._loads * self.params.adapter_load_s * 1e3
            self.stats.adapter_loads += self._loads
            self._loads = 0
        self.stats.iterations += 1
        self.stats.busy_s += ms / 1e3
        self._iter = _Iteration(self.t + ms / 1e3, work, chunk_end, batch)

    def _grow_batch(self) -> list[_Seq]:
        """Give every running sequence the block its next token needs, preempting the newest."""
        for seq in list(self._running.values()):
            while seq.where is _Where.RUNNING and not self._grow(seq, seq.ctx + 1):
                self._preempt(next(reversed(self._running.values())))
        return list(self._running.values())

    def _grow(self, seq: _Seq, tokens: int) -> bool:
        need = self._blocks_for(tokens) - len(seq.shared) - seq.private
        if need <= 0:
            return True
        if not self.pool.allocate(need):
            return False
        seq.private += need
        return True

    def _run_out(self, seq: _Seq) -> None:
        """Decode a sequence that just joined the batch to its end now (``decode_at_once``), if the
        KV of every token it will generate fits; else leave it to step."""
        tokens, reason = seq.stream.rest(seq.generated)
        if not self._grow(seq, seq.ctx + len(tokens)):
            return
        seq.ctx += len(tokens)
        seq.generated += len(tokens)
        self._out.append(SimOutput(seq.rid, tokens, reason))
        self.stats.tokens += len(tokens)
        del self._running[seq.rid]
        self._forget(seq)

    def _preempt(self, seq: _Seq) -> None:
        del self._running[seq.rid]
        self._free_blocks(seq)
        seq.total, seq.done, seq.recompute = seq.ctx, 0, True
        seq.where = _Where.QUEUED
        self._queue.appendleft(seq)
        self.stats.preemptions += 1

    def _start_next_prompt(self) -> _Seq | None:
        seq = next((s for s in self._queue if self.adapters.can_pin(s.rid, s.adapter)), None)
        if seq is None:
            return None
        if seq is not self._queue[0]:
            # The head waits for an adapter slot (a preempted sequence never does: it keeps its
            # adapter pinned): this one goes first.
            self._queue.remove(seq)
            self._queue.appendleft(seq)
        seq.shared = self.pool.acquire_prefix(seq.hashes)
        if not self.pool.allocate(self._blocks_for(seq.total) - len(seq.shared)):
            self.pool.retire(0, seq.shared)  # it waits, head of the line, until blocks free up
            seq.shared = []
            return None
        self._queue.popleft()
        self._pin(seq)
        seq.private = self._blocks_for(seq.total) - len(seq.shared)
        # At least one position is computed: it yields the next token.
        seq.done = min(len(seq.shared) * self.params.block_size, seq.total - 1)
        if not seq.recompute:
            seq.cached_tokens = seq.done
            self.stats.prompt_tokens += seq.total
            self.stats.cached_tokens += seq.done
        seq.where = _Where.PREFILLING
        self._prefilling = seq
        return seq

    def _end_iteration(self) -> None:
        it = self._iter
        assert it is not None
        self._iter = None
        for seq in it.batch:
            if self._running.get(seq.rid) is not seq:
                continue  # released or preempted since the iteration started
            seq.ctx += 1
            token = seq.stream.token(seq.generated)
            seq.generated += 1
            reason = seq.stream.finish_reason(token, seq.generated)
            self._out.append(SimOutput(seq.rid, [token], reason))
            self.stats.tokens += 1
            if reason is not None:
                del self._running[seq.rid]
                self._forget(seq)
        work = it.work
        if work is not None and work is self._prefilling:
            work.done = it.chunk_end
            if work.done >= work.total:
                self._prefilling = None
                self._prompt_done(work)

    def _prompt_done(self, seq: _Seq) -> None:
        seq.ctx = seq.total
        self._publish_prompt(seq)
        if seq.recompute:  # back to the batch, ahead of newcomers; its next token comes from decode
            seq.recompute = False
            seq.where = _Where.READY
            self._ready.appendleft(seq)
            return
        token = seq.stream.token(0)
        seq.generated = 1
        reason = seq.stream.finish_reason(token, 1)
        self._out.append(SimOutput(seq.rid, [token], reason, seq.cached_tokens))
        if seq.kind is SeqKind.HANDOFF:
            self.adapters.unpin(seq.rid)  # the decode worker needs the adapter now, not this one
            seq.where = _Where.HELD
            self._parked[seq.rid] = seq
        elif reason is not None:
            self._forget(seq)
        else:
            seq.where = _Where.READY
            self._ready.append(seq)

    def _forget(self, seq: _Seq) -> None:
        del self._seqs[seq.rid]
        self._free_blocks(seq)
        self.adapters.unpin(seq.rid)

    def _pin(self, seq: _Seq) -> bool:
        """Pin the sequence's adapter (False: no slot); a load is paid by the next iteration."""
        if not self.adapters.can_pin(seq.rid, seq.adapter):
            return False
        self._loads += self.adapters.pin(seq.rid, seq.adapter)
        return True

    def _publish_prompt(self, seq: _Seq) -> None:
        """The prompt's KV is complete here: its full blocks join the prefix cache."""
        fresh = seq.hashes[len(seq.shared) :]
        seq.private -= self.pool.publish(fresh)
        if self.params.enable_prefix_caching:
            seq.shared = [*seq.shared, *fresh]

    def _free_blocks(self, seq: _Seq) -> None:
        self.pool.retire(seq.private, seq.shared)
        seq.private, seq.shared = 0, []
