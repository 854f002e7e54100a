"""A simulated LLM engine in virtual time: continuous batching, paged-KV capacity, preemption, prefix cache.

:class:`SimEngine` is a pure state machine over a caller-supplied clock value (seconds): no sleeping,
no sockets. The cluster simulator drives many of them in virtual time. Timing comes from
:class:`~workers.engines.sim.cost.CostModel`.

How one engine behaves (the same for every role; a prefill-only node simply never gets decode work):

* **Prefill queue** (FIFO). An iteration prefills the head prompt; when sequences are decoding it
  takes a chunk of at most ``chunk_tokens`` and the iteration also advances every decoding sequence
  one token (chunked prefill, Sarathi-Serve style); with nothing decoding the whole remaining prompt
  runs in one iteration. A prompt's KV is allocated when its prefill starts (it waits if it does not
  fit); the longest cached prefix (``prefix_block_tokens``-token blocks, LRU, living in free KV) is
  skipped.
* **Decode batch**. Without prefill work the batch decodes "fluidly": the step time is taken at the
  last change of the batch (refreshed every ``REFRESH_STEPS`` steps as contexts grow) and progress
  is a real number of steps, so a finish or a KV-full instant is computed, not stepped to.
* **KV**: sequences grow one token per step. When the KV is full the most recently joined sequence
  is preempted (vLLM's recompute preemption): its KV is freed and it waits to be recomputed here.
* **Admission** of incoming handoffs and preempted sequences: FIFO, when their KV fits and the batch
  has a free slot (``max_batch``).
* **LoRA adapters** (``max_loras`` > 0): at most that many resident, least recently used evicted
  first, never one a request here is using (from its prefill's start to the end of its prefill
  here, or of its decode here). Loading one stalls the engine ``adapter_load_s`` (added to the
  prefill iteration that needs it, or to the decode batch when an incoming handoff needs it). A
  prompt or handoff whose adapter cannot get a slot waits, and work behind it with a resident
  adapter goes first (vLLM's scheduler skips it likewise).

Events come back from :meth:`SimEngine.advance` as :class:`EngineEvent` tuples.

**Against the real-time engine's batcher.** ``pdorch worker --engine sim`` does not use this class:
it steps :class:`~workers.engines.sim.batcher.SimBatcher` one iteration at a time, because it streams
every token and must cancel any request at any moment. This model exists for speed: stepping every
decode iteration of every node of an hour-long trace took about nine times as long, in one
measurement, as advancing the batch analytically between events. ``tests/unit/test_sim_models_agree.py``
runs both on one trace: without KV pressure every request's TTFT and finish time agree within two
decode steps (plus 1% of its latency); under KV pressure the averages agree within 10%. Where they
differ, and why:

* decode time: here the step time is taken when the batch changes and every ``REFRESH_STEPS``
  steps, so it lags the growing context a little; and a prompt that arrives while the batch decodes
  starts at once (a fluid batch has no step boundary), where the batcher first ends the step in
  flight;
* KV is counted in tokens here, in whole blocks per sequence there;
* shared prefixes: here every sequence is charged for its whole context and the prefix cache only
  lives in free KV; the batcher, like vLLM, holds a shared full block once for every sequence that
  uses it. Under KV pressure with shared prefixes this model therefore runs out of KV sooner and
  its prompts wait longer (simpler, and on the pessimistic side);
* admission: here incoming handoffs and preempted sequences wait FIFO until their KV fits with a 1%
  watermark, and a new prompt whose KV fits may start before a preempted one is readmitted; the
  batcher refuses a decode reservation that does not fit (the scheduler reserved room before
  sending it) and puts a preempted sequence at the head of the prompt queue;
* ``max_batch`` bounds admissions here (a local prompt joins the batch when its prefill is done),
  the running batch there;
* prefix hashes cover ``prefix_block_tokens`` tokens here (a trace's own granularity, e.g.
  Mooncake's 512-token ``hash_ids``), one KV block there;
* nothing here cancels a request; the batcher releases one at any moment;
* LoRA adapters (the slots are the batcher's own :class:`~workers.engines.sim.adapter_slots.AdapterSlots`):
  an incoming handoff pins and loads its adapter here when it is admitted, before its KV moves; the
  batcher when it joins the batch, after. The load stalls the engine in both.
"""

from __future__ import annotations

import enum
import heapq
import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import NamedTuple

import msgspec

from workers.engines.sim.adapter_slots import AdapterSlots
from workers.engines.sim.cost import CostModel

REFRESH_STEPS = 128
# Share of KV kept free when admitting, so a just-admitted sequence is not preempted at once (vLLM's
# watermark, 1%).
ADMIT_WATERMARK = 0.01
_EPS = 1e-9


class EventKind(enum.IntEnum):
    PREFILL_DONE = 0  # first token produced; for a handoff the KV stays until release()
    ADMITTED = 1  # an incoming handoff got its KV on this node: start the transfer, then join()
    FINISHED = 2
    PREEMPTED = 3
    WATERMARK = 4  # a sequence's context reached the watermark set with set_watermark()
    DROPPED = 5  # needs more KV than the node has at all


class EngineEvent(NamedTuple):
    kind: EventKind
    rid: int
    time: float


class EngineParams(msgspec.Struct, frozen=True):
    block_size: int = 16
    chunk_tokens: int = 512  # prefill tokens per iteration while sequences decode (0 = no limit)
    max_batch: int = 256
    prefix_block_tokens: int = 16  # tokens covered by one prefix hash
    max_loras: int = 0  # LoRA adapter slots (0 = adapters cost nothing and are not limited)
    adapter_load_s: float = 0.0  # stall per adapter load


class _Mode(enum.IntEnum):
    HANDOFF = 0  # prefill here, KV leaves for a decode node
    LOCAL = 1  # prefill here, then decode here
    RECOMPUTE = 2  # a preempted sequence's context, recomputed here


class _Work:
    __slots__ = ("adapter", "allocated", "done", "hashes", "mode", "remaining", "rid", "started", "total")

    def __init__(
        self, rid: int, total: int, hashes: Sequence[int], mode: _Mode, remaining: int, adapter: str = ""
    ) -> None:
        self.rid = rid
        self.adapter = adapter
        self.total = total
        self.done = 0
        self.hashes = hashes
        self.mode = mode
        self.remaining = remaining  # decode steps still to run after this prefill
        self.allocated = mode is _Mode.RECOMPUTE
        self.started = False


class _Seq:
    __slots__ = ("adapter", "ctx_join", "hashes", "p_join", "remaining", "rid")

    def __init__(self, rid: int, ctx: int, remaining: int, hashes: Sequence[int], adapter: str = "") -> None:
        self.rid = rid
        self.adapter = adapter
        self.ctx_join = ctx
        self.remaining = remaining
        self.hashes = hashes
        self.p_join = 0.0


class _Waiting(NamedTuple):
    rid: int
    tokens: int
    seq: _Seq
    recompute: bool


class EngineLoad(NamedTuple):
    blocks_used: int
    running: int
    waiting: int
    queued_prefill_tokens: int


class SimEngine:
    def __init__(self, cost: CostModel, params: EngineParams | None = None) -> None:
        self.cost = cost
        self.params = params = params or EngineParams()
        self.capacity = cost.kv_capacity_tokens
        self.t = 0.0
        self.preemptions = 0
        self.busy_s = 0.0  # time spent in iterations or decode steps (utilisation)
        self.changes = 0  # bumps on every state change (lets observers cache what they derive)
        self.prompt_tokens = 0  # prompt tokens of prefills started here (recomputes excluded)
        self.cached_tokens = 0  # of which served from the prefix cache
        # Per request whose prefill started here: its prompt tokens served from the cache (the
        # engine's report with its first token; the caller pops it).
        self.prefill_hits: dict[int, int] = {}
        # Prefix cache: hash -> None, least recently used first.
        self.cache: OrderedDict[int, None] = OrderedDict()
        self._queue: deque[_Work] = deque()
        self._queued_tokens = 0
        self._waiting: deque[_Waiting] = deque()
        self._pending_join: dict[int, _Seq] = {}
        self._held: dict[int, int] = {}  # rid -> tokens held outside the batch (prefill, in transfer)
        self._fixed = 0  # sum of _held
        # Decode batch; progress P in steps; S(P) = s_base + len(batch) * (P - p_base).
        self._batch: dict[int, _Seq] = {}
        self._p = 0.0
        self._p_base = 0.0
        self._s_base = 0.0
        self._generated_base = 0.0  # tokens decoded here up to P = p_base
        self._step_s = 0.0
        self._step_p = 0.0  # P at which _step_s was computed
        self._thresholds: list[tuple[float, int, int, int]] = []  # (P, order, kind, rid)
        self._order = 0
        self._watermarks: dict[int, float] = {}
        # Iteration in flight: (end time, work, chunk end, mixed).
        self._iter: tuple[float, _Work, int, bool] | None = None
        self._out: list[EngineEvent] = []
        # LoRA adapters resident and pinned (the real-time batcher's); the engine is stalled loading
        # one until _stall_until.
        self.adapters = AdapterSlots(params.max_loras)
        self._stall_until = 0.0
        self.adapter_loads = 0

    # ------------------------------------------------------------------ public: mutators

    def submit_prefill(
        self,
        t: float,
        rid: int,
        prompt_len: int,
        hashes: Sequence[int],
        *,
        decode_here: bool,
        output_len: int,
        adapter: str = "",
    ) -> None:
        """Queue a prompt. ``decode_here``: generate the remaining ``output_len - 1`` tokens here too."""
        self._sync(t)
        mode = _Mode.LOCAL if decode_here else _Mode.HANDOFF
        self._queue.append(_Work(rid, prompt_len, hashes, mode, max(0, output_len - 1), adapter))
        self._queued_tokens += prompt_len

    def request_admission(
        self,
        t: float,
        rid: int,
        context_tokens: int,
        remaining_steps: int,
        hashes: Sequence[int],
        adapter: str = "",
    ) -> None:
        """An incoming handoff asks for KV; ADMITTED comes when it fits (then transfer, then join)."""
        self._sync(t)
        seq = _Seq(rid, context_tokens, remaining_steps, hashes, adapter)
        self._waiting.append(_Waiting(rid, context_tokens, seq, False))
        self._admit()

    def join(self, t: float, rid: int) -> None:
        """The admitted handoff's KV has arrived: it joins the decode batch."""
        self._sync(t)
        seq = self._pending_join.pop(rid)
        self._unhold(rid)
        self._join(seq)

    def release(self, t: float, rid: int) -> None:
        """A handoff's KV has left this prefill node."""
        self._sync(t)
        self._unhold(rid)
        self._admit()

    def set_watermark(self, t: float, rid: int, context_tokens: int) -> None:
        """Emit WATERMARK when ``rid``'s context reaches ``context_tokens`` (re-reservation hook)."""
        self._sync(t)
        seq = self._batch.get(rid)
        if seq is None:
            self._watermarks[rid] = float(context_tokens)
            return
        self._push_threshold(seq.p_join + (context_tokens - seq.ctx_join), EventKind.WATERMARK, rid)

    # ------------------------------------------------------------------ public: time

    def advance(self, t: float) -> list[EngineEvent]:
        """Run every internal event up to ``t``; return the events produced since the last call."""
        self._sync(t)
        out, self._out = self._out, []
        return out

    def next_event_time(self) -> float:
        return self._next()[0]

    # ------------------------------------------------------------------ public: observation

    def load_at(self, t: float) -> EngineLoad:
        used = self._fixed + self._s_at(self._p_at(t))
        return EngineLoad(
            blocks_used=math.ceil(used / self.params.block_size),
            running=len(self._batch),
            waiting=len(self._waiting) + len(self._queue),
            queued_prefill_tokens=self._queued_tokens,
        )

    def generated_at(self, t: float) -> int:
        """Tokens decoded here so far (each decode step gives every sequence in the batch one)."""
        return int(self._generated_base + len(self._batch) * (self._p_at(t) - self._p_base))

    def context_at(self, t: float, rid: int) -> int:
        seq = self._batch.get(rid)
        if seq is None:
            return 0
        return int(seq.ctx_join + self._p_at(t) - seq.p_join)

    @property
    def decoding(self) -> bool:
        """True while sequences decode (then KV use grows with time, between events too)."""
        return bool(self._batch)

    @property
    def idle(self) -> bool:
        return not (self._queue or self._batch or self._waiting or self._pending_join or self._held)

    # ------------------------------------------------------------------ internals: time

    def _p_at(self, t: float) -> float:
        if self._iter is None and self._batch and t > self.t:
            return self._p + max(0.0, t - max(self.t, self._stall_until)) / self._step_s
        return self._p

    def _s_at(self, p: float) -> float:
        return self._s_base + len(self._batch) * (p - self._p_base)

    def _free(self) -> float:
        return self.capacity - self._fixed - self._s_at(self._p)

    def _sync(self, t: float) -> None:
        self.changes += 1
        while True:
            when, action = self._next()
            if when > t or when == math.inf:
                break
            self._fluid_to(when)
            action()
        self._fluid_to(t)

    def _fluid_to(self, t: float) -> None:
        if t <= self.t:
            return
        if self._iter is None and self._batch:
            self._p += max(0.0, t - max(self.t, self._stall_until)) / self._step_s
            self.busy_s += t - self.t
        self.t = t

    def _next(self):  # -> tuple[float, Callable[[], None]]
        if self._iter is not None:
            return self._iter[0], self._end_iteration
        if self._queue and self._startable():
            return self.t, self._start_iteration
        if not self._batch:
            return math.inf, _noop
        self._refresh_step()
        steps_to_full = (self.capacity - self._fixed - self._s_at(self._p)) / len(self._batch)
        best_p, action = self._p + max(0.0, steps_to_full), self._preempt_one
        if self._thresholds and self._thresholds[0][0] <= best_p:
            best_p, action = self._thresholds[0][0], self._fire_thresholds
        refresh_p = self._step_p + REFRESH_STEPS
        if refresh_p < best_p:
            best_p, action = refresh_p, _noop
        return max(self.t, self._stall_until) + max(0.0, best_p - self._p) * self._step_s, action

    def _refresh_step(self) -> None:
        if self._p - self._step_p >= REFRESH_STEPS - 1e-6 or self._step_s <= 0.0:
            self._recompute_step()

    def _recompute_step(self) -> None:
        if self._batch:
            self._step_s = self.cost.decode_step_ms(len(self._batch), self._s_at(self._p)) / 1e3
        self._step_p = self._p

    # ------------------------------------------------------------------ internals: prefill

    def _can_start(self, work: _Work) -> bool:
        return (work.allocated or work.total <= self._free()) and self._slot_for(work.rid, work.adapter)

    def _startable(self) -> bool:
        """Whether a prefill can start now. A head waiting only for an adapter slot lets the first
        prompt behind it that can start go first (it then stays the head until it is done)."""
        head = self._queue[0]
        if self._can_start(head):
            return True
        if head.started or self._slot_for(head.rid, head.adapter):
            return False  # it waits for KV: first come, first served
        for i, work in enumerate(self._queue):
            if i and not work.started and self._can_start(work):
                del self._queue[i]
                self._queue.appendleft(work)
                return True
        return False

    def _start_iteration(self) -> None:
        work = self._queue[0]
        if not work.allocated:
            self._hold(work.rid, work.total)
            work.allocated = True
        load_s = self._acquire(work.rid, work.adapter)
        if not work.started:
            work.started = True
            cached = self._lookup(work.hashes) * self.params.prefix_block_tokens
            work.done = min(cached, work.total - 1) if work.mode is not _Mode.RECOMPUTE else 0
            self._queued_tokens -= work.done
            if work.mode is not _Mode.RECOMPUTE:
                self.prompt_tokens += work.total
                self.cached_tokens += work.done
                self.prefill_hits[work.rid] = work.done
        mixed = bool(self._batch)
        end = work.total
        if mixed and self.params.chunk_tokens > 0:
            end = min(end, work.done + self.params.chunk_tokens)
        ms = self.cost.prefill_ms(work.done, end)
        if mixed:
            while self._batch and self._free() < len(self._batch):
                self._preempt_one()
            mixed = bool(self._batch)
            ms += self.cost.decode_marginal_ms(len(self._batch), self._s_at(self._p))
        # An adapter load (this prompt's, or one a handoff is still paying) delays the iteration.
        duration = ms / 1e3 + load_s + max(0.0, self._stall_until - self.t)
        self._stall_until = self.t
        self.busy_s += duration
        self._iter = (self.t + duration, work, end, mixed)

    def _end_iteration(self) -> None:
        assert self._iter is not None
        _, work, end, mixed = self._iter
        self._iter = None
        self._queued_tokens -= end - work.done
        work.done = end
        if mixed:
            self._p += 1.0
            self._fire_thresholds()
        if work.done >= work.total:
            # Not always the head: a preempted sequence admitted since the iteration started (by a
            # finish above or a release) was put in front of it to be recomputed next.
            self._queue.remove(work)
            self._complete(work)
        self._admit()

    def _complete(self, work: _Work) -> None:
        if work.mode is not _Mode.RECOMPUTE:
            self._out.append(EngineEvent(EventKind.PREFILL_DONE, work.rid, self.t))
            self._insert(work.hashes)
        if work.mode is _Mode.HANDOFF:
            self._unpin(work.rid)  # the decode node needs the adapter now, not this one
            return  # KV held until release()
        self._unhold(work.rid)
        self._join(_Seq(work.rid, work.total, work.remaining, work.hashes, work.adapter))

    # ------------------------------------------------------------------ internals: decode

    def _rebase(self) -> None:
        self._generated_base += len(self._batch) * (self._p - self._p_base)
        self._s_base = self._s_at(self._p)
        self._p_base = self._p

    def _join(self, seq: _Seq) -> None:
        if seq.remaining <= 0:
            self._unpin(seq.rid)
            self._out.append(EngineEvent(EventKind.FINISHED, seq.rid, self.t))
            self._insert(seq.hashes)
            return
        self._rebase()
        seq.p_join = self._p
        self._batch[seq.rid] = seq
        self._s_base += seq.ctx_join
        self._push_threshold(self._p + seq.remaining, EventKind.FINISHED, seq.rid)
        mark = self._watermarks.pop(seq.rid, None)
        if mark is not None:
            self._push_threshold(self._p + mark - seq.ctx_join, EventKind.WATERMARK, seq.rid)
        self._recompute_step()

    def _leave(self, seq: _Seq) -> int:
        """Remove ``seq`` from the batch; return its context length."""
        self._rebase()
        ctx = round(seq.ctx_join + self._p - seq.p_join)
        del self._batch[seq.rid]
        self._s_base -= seq.ctx_join + self._p - seq.p_join
        if not self._batch:
            self._s_base = 0.0
        self._recompute_step()
        return ctx

    def _push_threshold(self, p: float, kind: EventKind, rid: int) -> None:
        self._order += 1
        heapq.heappush(self._thresholds, (p, self._order, int(kind), rid))

    def _fire_thresholds(self) -> None:
        heap = self._thresholds
        if heap and 0.0 < heap[0][0] - self._p < 1e-6:
            self._p = heap[0][0]  # float round-off of the computed event time
        while heap and heap[0][0] <= self._p + _EPS:
            p, _, kind, rid = heapq.heappop(heap)
            seq = self._batch.get(rid)
            if seq is None:
                continue  # finished or preempted since
            if kind == EventKind.FINISHED:
                if abs(seq.p_join + seq.remaining - p) > _EPS:
                    continue  # stale: the sequence was preempted and rejoined
                self._leave(seq)
                self._unpin(rid)
                self._out.append(EngineEvent(EventKind.FINISHED, rid, self.t))
                self._insert(seq.hashes)
            elif p >= seq.p_join - _EPS:
                self._out.append(EngineEvent(EventKind.WATERMARK, rid, self.t))
        self._admit()

    def _preempt_one(self) -> None:
        if not self._batch:
            return
        rid = next(reversed(self._batch))
        seq = self._batch[rid]
        generated = self._p - seq.p_join
        ctx = self._leave(seq)
        self.preemptions += 1
        # It keeps its adapter pinned: it is still this engine's request.
        rest = _Seq(rid, ctx, max(0, round(seq.remaining - generated)), seq.hashes, seq.adapter)
        self._waiting.appendleft(_Waiting(rid, ctx, rest, True))
        self._out.append(EngineEvent(EventKind.PREEMPTED, rid, self.t))

    # ------------------------------------------------------------------ internals: KV

    def _hold(self, rid: int, tokens: int) -> None:
        self._held[rid] = self._held.get(rid, 0) + tokens
        self._fixed += tokens

    def _unhold(self, rid: int) -> None:
        self._fixed -= self._held.pop(rid, 0)

    def _admit(self) -> None:
        i = 0
        while i < len(self._waiting):
            head = self._waiting[i]
            if head.tokens > self.capacity * (1.0 - ADMIT_WATERMARK):
                del self._waiting[i]
                self._out.append(EngineEvent(EventKind.DROPPED, head.rid, self.t))
                continue
            if not self._slot_for(head.rid, head.seq.adapter):
                i += 1  # waits for an adapter slot; what follows may go first
                continue
            room = self._free() - head.tokens - ADMIT_WATERMARK * self.capacity
            if room < 0 or len(self._batch) + len(self._pending_join) >= self.params.max_batch:
                return
            del self._waiting[i]
            self._hold(head.rid, head.tokens)
            if head.recompute:
                seq = head.seq
                work = _Work(head.rid, head.tokens, seq.hashes, _Mode.RECOMPUTE, seq.remaining, seq.adapter)
                self._queue.appendleft(work)
                self._queued_tokens += head.tokens
            else:
                # The adapter loads now, stalling the batch, so it is resident when the KV lands.
                self._stall_until = max(self._stall_until, self.t) + self._acquire(head.rid, head.seq.adapter)
                self._pending_join[head.rid] = head.seq
                self._out.append(EngineEvent(EventKind.ADMITTED, head.rid, self.t))

    # ------------------------------------------------------------------ internals: LoRA adapters

    def _slot_for(self, rid: int, adapter: str) -> bool:
        """Whether ``rid``'s adapter is resident or can be loaded now."""
        return self.adapters.can_pin(rid, adapter)

    def _acquire(self, rid: int, adapter: str) -> float:
        """Pin ``rid``'s adapter (loading it if need be); the seconds the load stalls the engine."""
        loads = self.adapters.pin(rid, adapter)
        self.adapter_loads += loads
        return loads * self.params.adapter_load_s

    def _unpin(self, rid: int) -> None:
        self.adapters.unpin(rid)

    # ------------------------------------------------------------------ internals: prefix cache

    def _lookup(self, hashes: Sequence[int]) -> int:
        n = 0
        cache = self.cache
        for h in hashes:
            if h not in cache:
                break
            cache.move_to_end(h)
            n += 1
        return n

    def _insert(self, hashes: Sequence[int]) -> None:
        cache = self.cache
        for h in hashes:
            cache[h] = None
            cache.move_to_end(h)
        room = int(self._free() // self.params.prefix_block_tokens)
        while len(cache) > max(0, room):
            cache.popitem(last=False)


def _noop() -> None:
    return None
