"""What the scheduler has booked on one node, and what it has seen the node do.

* **held**: every job placed here (either side) and the KV blocks reserved for it (Reserve);
* **pending**: prefills sent here and not answered with a first token yet, in the order sent
  (engines prefill first come, first served);
* **members**: requests decoding here, or booked to once their KV lands, with what placement needs
  to protect their TPOT (their predicted decode steps and objective, the delays they have had);
* **prefixes**: the prompt-prefix hashes sent here;
* running integrals of the decode batch and its prompt tokens over time, and the prompt tokens the
  node has prefilled, from which the lifecycle events become latency observations, and so do the
  tokens the node reports decoded (:meth:`NodeLedger.progress`).

Times are numbers the caller passes (live: a monotonic clock; simulator: virtual seconds).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from scheduler.backoff import Backoff
from scheduler.ledger.member_table import MemberRow, MemberTable
from scheduler.ledger.prefix_memory import PrefixMemory
from scheduler.placement.kv_budget import outstanding_blocks
from scheduler.placement.latency_model import PromptWork, prompt_work
from scheduler.prediction.latency import DecodeSample, PrefillSample, TpotOutcome

# A progress observation covers at least this many decode steps (fewer say little of a step's time).
MIN_PROGRESS_STEPS = 8
# The prefill rate placement sees is averaged over about this long (time constant, seconds). A node
# prefills in bursts (on a decode node, a colocated prompt now and then), so the rate over one
# observation window (about a second) swings between 0 and several times its mean, and a request
# placed there decodes through many windows: it sees the mean, not the last window's. Chosen among
# 5, 10 and 20 s (longer made decode-heavy at 4 + 4 worse): docs/placement.md.
PREFILL_RATE_HORIZON_S = 5.0


_NO_WORK: PromptWork = (0.0, 0.0, 0.0)


def _add(a: PromptWork, b: PromptWork, sign: float) -> PromptWork:
    return (a[0] + sign * b[0], a[1] + sign * b[1], a[2] + sign * b[2])


class _Mark(NamedTuple):
    """The node's counters at a decode observation (the next one covers what grew since)."""

    at: float
    decoded_tokens: int
    batch_s: float
    context_s: float
    prefilled_tokens: int


@dataclass
class Held:
    """What one job holds on this node."""

    reserved_blocks: int = 0  # KV blocks reserved (prompt + predicted output), 0 on a prefill node
    tokens: int = 0  # tokens it has here (prompt + generated); 0 until its KV is here


@dataclass
class Pending:
    tokens: int  # prompt tokens
    cached: int  # of which the scheduler expects the node to have cached
    sent_at: float
    batch_s: float  # the node's integrals when it was sent
    context_s: float
    adapter_load: bool = False  # its LoRA adapter was not resident here when it was booked


class NodeLedger:
    def __init__(
        self,
        worker_id: str,
        model: str,
        accelerator: str,
        block_size: int,
        kv_bytes_per_token: int,
        capacity_tokens: int,
    ) -> None:
        self.worker_id = worker_id
        self.model = model
        self.accelerator = accelerator
        self.block_size = block_size
        self.kv_bytes_per_token = kv_bytes_per_token
        self.held: dict[str, Held] = {}
        self.pending: dict[str, Pending] = {}
        self.members: dict[str, int] = {}  # job -> its prompt tokens
        # The rest of each member (objective, predicted steps, join time, handoff delay), as
        # columns: its TPOT budget and the tightest member's come from there (tightest_member).
        self.member_table = MemberTable()
        self.prefixes = PrefixMemory(capacity_tokens)
        self.last_departure = -float("inf")  # the last first token this node produced
        self.prefilled_tokens = 0  # uncached prompt tokens prefilled here (answered)
        # Their rate, exponentially averaged over PREFILL_RATE_HORIZON_S of decode observations.
        self.prefilling_tokens_per_s = 0.0
        # Until when its KV endpoint is taken as refusing: a handoff to it was turned away for
        # lack of room (kv_busy), whatever its engine reports (vLLM's connector reports nothing).
        self.kv_busy_until = -float("inf")
        # While open, its KV network is taken as down, both ways (handoffs with two or more peers
        # did not land): it is left out of decode and is no split's prefill node, for requests that
        # have another way. Per sending node, while open, handoffs from that node to this one are
        # taken as not landing (one pair failed: which side is at fault is not known yet).
        self.kv_path = Backoff()
        self.kv_from: dict[str, Backoff] = {}
        self.version = 0  # bumps on every change (views built from it may be cached)
        # Kept as the jobs change, not summed when read: a node holds hundreds of jobs, and
        # placement reads both for every node on every decision.
        self._reserved_total = 0
        self._pending_total = 0
        self._pending_work = _NO_WORK  # the prompt_work of every pending prompt, summed
        self.view_cache: object = None  # what a view builder keeps between versions
        self.last_view: tuple[tuple[object, ...], object] | None = None
        self._t = 0.0
        self._batch_s = 0.0
        self._context_s = 0.0
        self._departure_integrals = (0.0, 0.0)
        self.joined = 0  # members decoding now
        self.joined_tokens = 0  # their prompt tokens
        self.booked_tokens = 0  # prompt tokens of every member, joined or not
        self.adapter_of: dict[str, str] = {}  # job -> its LoRA adapter, for jobs with one
        self._progress_mark: _Mark | None = None
        self.decode_step_s = 0.0  # seconds per decode step at the last decode observation (0: none)
        # Decode steps the node has taken, by its decode observations, up to ``steps_at``.
        self.steps_done = 0.0
        self.steps_at = 0.0

    # ------------------------------------------------------------------ reading

    @property
    def reserved_blocks(self) -> int:
        """Reservations not yet backed by blocks the worker reports as used (not counted twice)."""
        return self._reserved_total

    def tightest_member(self, step_s: float) -> tuple[float, int, float]:
        """The member with the least delay left to absorb, if the rest of its steps take
        ``step_s``: that delay (``inf``: none), over how many steps, and its TPOT objective."""
        return self.member_table.tightest(step_s, self.steps_done, self.steps_at)

    def adapters_booked(self) -> frozenset[str]:
        """Adapters of the jobs booked here: resident, or soon (the engine loads them for these)."""
        return frozenset(self.adapter_of.values())

    def adapters_in_use(self) -> frozenset[str]:
        """Adapters of the jobs prefilling or decoding here, which the engine will not evict."""
        of = self.adapter_of
        return frozenset(of[j] for j in (*self.pending, *self.members) if j in of)

    @property
    def pending_tokens(self) -> int:
        """Uncached prompt tokens sent here and not prefilled yet."""
        return self._pending_total

    @property
    def pending_work(self) -> PromptWork:
        """Those prompts' prefill work (``latency_model.prompt_work``), summed."""
        return self._pending_work

    # ------------------------------------------------------------------ booking

    def hold(self, job_id: str, reserve_blocks: int, adapter: str = "") -> None:
        self._unhold(self.held.get(job_id))
        held = self.held[job_id] = Held(reserve_blocks)
        self._reserved_total += self._outstanding(held)
        if adapter:
            self.adapter_of[job_id] = adapter
        self._changed()

    def send_prefill(
        self, job_id: str, tokens: int, cached: int, now: float, adapter_load: bool = False
    ) -> None:
        self._advance(now)
        self._unpend(self.pending.get(job_id))
        self.pending[job_id] = Pending(tokens, cached, now, self._batch_s, self._context_s, adapter_load)
        self._pending_total += tokens - cached
        self._pending_work = _add(self._pending_work, prompt_work(tokens - cached, cached), 1.0)
        self._changed()

    def remember(self, block_hashes: tuple[int, ...], block_tokens: int) -> None:
        """The node has seen this prompt prefix (prefix affinity); each hash covers ``block_tokens``."""
        if block_hashes:
            self.prefixes.add(block_hashes, block_tokens or self.block_size)
            self._changed()

    def kv_busy(self, now: float, seconds: float) -> None:
        """Its KV endpoint turned a handoff away for lack of room: no handoff here for ``seconds``."""
        self.kv_busy_until = max(self.kv_busy_until, now + seconds)

    def kv_unreachable_from(self, now: float) -> frozenset[str]:
        """The nodes from which handoffs here are taken as not landing now."""
        if not self.kv_from:
            return frozenset()
        return frozenset(wid for wid, w in self.kv_from.items() if w.open(now))

    def add_member(self, job_id: str, prompt_tokens: int, steps: int, tpot_slo_s: float) -> None:
        self.members[job_id] = prompt_tokens
        self.member_table.add(job_id, steps, tpot_slo_s)
        self.booked_tokens += prompt_tokens
        self._changed()

    # ------------------------------------------------------------------ lifecycle

    def answer_prefill(self, job_id: str, now: float, cached: int | None) -> PrefillSample | None:
        """The job's first token came from here; a prefill observation if it was the queue's head."""
        pending = self.pending.get(job_id)
        if pending is None:
            return None
        head = next(iter(self.pending)) == job_id
        self._unpend(self.pending.pop(job_id))
        self._advance(now)
        if self.last_departure >= pending.sent_at:
            start, (batch_s, context_s) = self.last_departure, self._departure_integrals
        else:
            start, batch_s, context_s = pending.sent_at, pending.batch_s, pending.context_s
        seconds = max(0.0, now - start)
        hit = pending.cached if cached is None else min(cached, pending.tokens)
        self.prefilled_tokens += pending.tokens - hit
        self.last_departure = now
        self._departure_integrals = (self._batch_s, self._context_s)
        self._changed()
        if not head or seconds <= 0.0:
            return None  # it did not simply wait for the one before it: its own time is unknown
        return PrefillSample(
            model=self.model,
            accelerator=self.accelerator,
            uncached=pending.tokens - hit,
            cached=hit,
            batch=(self._batch_s - batch_s) / seconds,
            context=(self._context_s - context_s) / seconds,
            seconds=seconds,
            adapter_load=pending.adapter_load,
            worker_id=self.worker_id,
        )

    def join(self, job_id: str, now: float, delay_s: float, tokens: int) -> None:
        """The member's decode begins here (its KV is here, ``tokens`` of it)."""
        held = self.held.get(job_id)
        if held is not None:
            self._set_held(held, max(held.tokens, tokens))
        prompt_tokens = self.members.get(job_id)
        if prompt_tokens is None or self.member_table.row(job_id).joined_at is not None:
            return
        self._advance(now)
        self.member_table.join(job_id, now, delay_s)
        self.joined += 1
        self.joined_tokens += prompt_tokens
        self._changed()

    def leave(self, job_id: str, now: float, steps: int) -> TpotOutcome | None:
        """The member finished after decoding ``steps`` tokens here; whether it met its TPOT
        objective (None: it had none, or never decoded here)."""
        member = self._drop_member(job_id, now)
        if member is None or member.joined_at is None or steps < 1 or member.tpot_slo_s <= 0:
            return None
        tpot = (now - member.joined_at + member.delay_s) / steps
        return TpotOutcome(self.model, self.accelerator, tpot <= member.tpot_slo_s)

    def progress(self, now: float, decoded_tokens: int) -> DecodeSample | None:
        """A decode observation of the node's batch since the last call, given the tokens the node
        reports it has decoded (over the batch's integral they give its steps): the step time is
        learnt while requests decode, not only once they end."""
        self._advance(now)
        mark = _Mark(now, decoded_tokens, self._batch_s, self._context_s, self.prefilled_tokens)
        last, self._progress_mark = self._progress_mark, mark
        if last is None:
            return None
        # A worker that restarted counts from 0 again: nothing to learn from that interval.
        seconds, tokens = now - last.at, decoded_tokens - last.decoded_tokens
        batch_s = self._batch_s - last.batch_s
        prefilled = self.prefilled_tokens - last.prefilled_tokens
        if seconds <= 0.0:
            return None
        if tokens > 0 and batch_s > 0.0 and round(tokens * seconds / batch_s) < MIN_PROGRESS_STEPS:
            self._progress_mark = last  # too few steps yet: keep accumulating
            return None
        weight = -math.expm1(-seconds / PREFILL_RATE_HORIZON_S)
        self.prefilling_tokens_per_s += weight * (prefilled / seconds - self.prefilling_tokens_per_s)
        self._changed()  # views show the rate (and, below, the steps counted)
        if tokens <= 0 or batch_s <= 0.0:
            return None
        batch = batch_s / seconds
        steps = round(tokens / batch)
        self.decode_step_s = seconds / steps
        self._count_steps(last.at, now, steps)
        return DecodeSample(
            model=self.model,
            accelerator=self.accelerator,
            steps=steps,
            batch=batch,
            context=(self._context_s - last.context_s) / seconds,
            prefill_tokens=prefilled,
            seconds=seconds,
            worker_id=self.worker_id,
        )

    def grow(self, job_id: str, tokens: int, reserved_blocks: int | None = None) -> None:
        """The job now has ``tokens`` here (and, when given, a new reservation)."""
        held = self.held.get(job_id)
        if held is not None:
            self._set_held(held, tokens, reserved_blocks)
            self._changed()

    def release(self, job_id: str, now: float) -> None:
        """Forget the job here (Unreserve). Idempotent."""
        held, pending = self.held.pop(job_id, None), self.pending.pop(job_id, None)
        self._unhold(held)
        self._unpend(pending)
        changed = held is not None or pending is not None
        self.adapter_of.pop(job_id, None)
        changed |= self._drop_member(job_id, now) is not None
        if changed:
            self._changed()

    # ------------------------------------------------------------------ internals

    def _outstanding(self, held: Held) -> int:
        return outstanding_blocks(held.reserved_blocks, held.tokens, self.block_size)

    def _unhold(self, held: Held | None) -> None:
        """Take ``held`` out of the reserved total (before it changes or goes)."""
        if held is not None:
            self._reserved_total -= self._outstanding(held)

    def _set_held(self, held: Held, tokens: int, reserved_blocks: int | None = None) -> None:
        self._unhold(held)
        held.tokens = tokens
        if reserved_blocks is not None:
            held.reserved_blocks = reserved_blocks
        self._reserved_total += self._outstanding(held)

    def _unpend(self, pending: Pending | None) -> None:
        if pending is not None:
            self._pending_total -= pending.tokens - pending.cached
            work = prompt_work(pending.tokens - pending.cached, pending.cached)
            # Exact zeros once nothing is pending, so float residue never accumulates.
            self._pending_work = _add(self._pending_work, work, -1.0) if self.pending else _NO_WORK

    def _count_steps(self, start: float, end: float, steps: int) -> None:
        """The node took ``steps`` decode steps from ``start`` to ``end``; a member that joined in
        between started counting from its share of them."""
        self.member_table.count_steps(start, (end - start) / steps, self.steps_done)
        self.steps_done += steps
        self.steps_at = end

    def _drop_member(self, job_id: str, now: float) -> MemberRow | None:
        prompt_tokens = self.members.pop(job_id, None)
        if prompt_tokens is None:
            return None
        member = self.member_table.row(job_id)
        self.member_table.remove(job_id)
        self._advance(now)
        self.booked_tokens -= prompt_tokens
        if member.joined_at is not None:
            self.joined -= 1
            self.joined_tokens -= prompt_tokens
        self._changed()
        return member

    def _advance(self, now: float) -> None:
        dt = now - self._t
        if dt > 0:
            self._batch_s += self.joined * dt
            self._context_s += self.joined_tokens * dt
            self._t = now

    def _changed(self) -> None:
        self.version += 1
