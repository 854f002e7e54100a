"""The reservation ledger: what every job holds on every node, kept the same way live and simulated.

A placement is *booked* the moment it is decided (:meth:`Ledger.book`): the decode node reserves
the request's KV (Reserve), the prefill node gets the prompt in its queue, both remember its prefix
hashes. The next decision, even one taken before anything reaches a worker, sees all of that. The
request's lifecycle events then move it along and come back as latency observations:

* :meth:`first_token` — the prefill node answered (a :class:`PrefillSample`); colocated, its decode
  begins there;
* :meth:`kv_loaded` — the KV landed on the decode node: its decode begins there (a
  :class:`HandoffSample`), and the prefill node holds nothing more for it;
* :meth:`finish` — it finished decoding (a :class:`TpotOutcome`);
* :meth:`release` — Unreserve on one node or every node, on finish or any failure. Idempotent.

The live scheduler calls these from its request flow, the simulator from its engines' events.
"""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.backoff import Backoff
from scheduler.ledger.node_ledger import Held, NodeLedger
from scheduler.placement.types import Placement
from scheduler.prediction.latency import HandoffSample, PrefillSample, TpotOutcome


@dataclass
class Booking:
    """One job's placement as booked."""

    job_id: str
    prefill: str
    decode: str
    prompt_tokens: int
    kv_bytes_per_token: int
    first_token_at: float | None = None

    @property
    def colocated(self) -> bool:
        return self.prefill == self.decode


@dataclass(frozen=True)
class BookingFacts:
    """What the ledger keeps of the request a job serves."""

    prompt_tokens: int
    block_hashes: tuple[int, ...]
    prefix_block_tokens: int
    decode_steps: int  # predicted tokens after the first
    tpot_slo_s: float
    adapter: str = ""  # its LoRA adapter ("" = the base model)


class Ledger:
    def __init__(self) -> None:
        self._nodes: dict[str, NodeLedger] = {}
        self._jobs: dict[str, Booking] = {}

    # ------------------------------------------------------------------ nodes

    def add_node(
        self,
        worker_id: str,
        model: str,
        accelerator: str,
        *,
        block_size: int,
        kv_bytes_per_token: int,
        capacity_tokens: int,
    ) -> NodeLedger:
        """A node joins (or rejoins: whatever was booked on it before is forgotten). Its KV capacity
        bounds the prefixes it can be believed to hold."""
        self.drop_node(worker_id)
        node = NodeLedger(worker_id, model, accelerator, block_size, kv_bytes_per_token, capacity_tokens)
        self._nodes[worker_id] = node
        return node

    def drop_node(self, worker_id: str) -> list[str]:
        """The node is gone; the jobs that had something on it (their other nodes are untouched)."""
        node = self._nodes.pop(worker_id, None)
        for other in self._nodes.values():
            other.kv_from.pop(worker_id, None)  # its pairs go with it (a node rejoins afresh)
        return [] if node is None else list(node.held)

    def decode_steps(self) -> dict[str, float]:
        """Seconds per decode step each node took at its last decode observation (those with one)."""
        return {wid: n.decode_step_s for wid, n in self._nodes.items() if n.decode_step_s > 0}

    def node(self, worker_id: str) -> NodeLedger | None:
        return self._nodes.get(worker_id)

    def booking(self, job_id: str) -> Booking | None:
        return self._jobs.get(job_id)

    # ------------------------------------------------------------------ booking

    def book(
        self,
        job_id: str,
        placement: Placement,
        facts: BookingFacts,
        *,
        cached: int,
        now: float,
        adapter_load: bool = False,
    ) -> Booking:
        """Reserve on the decode node, queue the prompt on the prefill node (``cached`` tokens expected
        there already; ``adapter_load``: it loads the request's adapter first), remember the prefix
        on both."""
        p, d = self._nodes[placement.prefill], self._nodes[placement.decode]
        booking = Booking(job_id, p.worker_id, d.worker_id, facts.prompt_tokens, d.kv_bytes_per_token)
        self._jobs[job_id] = booking
        if not booking.colocated:
            p.hold(job_id, 0, facts.adapter)
            p.remember(facts.block_hashes, facts.prefix_block_tokens)
        self.book_decode(job_id, d.worker_id, placement.reserve_blocks, facts)
        p.send_prefill(job_id, facts.prompt_tokens, min(cached, facts.prompt_tokens), now, adapter_load)
        return booking

    def book_decode(self, job_id: str, worker_id: str, reserve_blocks: int, facts: BookingFacts) -> None:
        """Reserve for the job on a decode node (at booking, or a new one for the same KV)."""
        booking = self._jobs.get(job_id)
        d = self._nodes[worker_id]
        if booking is not None:
            booking.decode = worker_id
            booking.kv_bytes_per_token = d.kv_bytes_per_token
        d.hold(job_id, reserve_blocks, facts.adapter)
        d.add_member(job_id, facts.prompt_tokens, facts.decode_steps, facts.tpot_slo_s)
        d.remember(facts.block_hashes, facts.prefix_block_tokens)

    # ------------------------------------------------------------------ lifecycle

    def first_token(self, job_id: str, now: float, cached: int | None = None) -> PrefillSample | None:
        booking = self._jobs.get(job_id)
        if booking is None or booking.first_token_at is not None:
            return None
        booking.first_token_at = now
        p = self._nodes.get(booking.prefill)
        sample = None if p is None else p.answer_prefill(job_id, now, cached)
        if booking.colocated and p is not None:
            p.join(job_id, now, 0.0, booking.prompt_tokens)
        return sample

    def kv_loaded(self, job_id: str, now: float) -> HandoffSample | None:
        booking = self._jobs.get(job_id)
        if booking is None:
            return None
        answered = booking.first_token_at
        if answered is None:  # the KV landed before the prefill's own answer came back
            self.first_token(job_id, now)
        p, d = self._nodes.get(booking.prefill), self._nodes.get(booking.decode)
        delay = 0.0 if answered is None else now - answered
        if d is not None:
            d.join(job_id, now, delay, booking.prompt_tokens)
        if p is not None and not booking.colocated:
            p.release(job_id, now)
        if answered is None or p is None or d is None or booking.colocated:
            return None
        return HandoffSample(
            model=d.model,
            prefill_accelerator=p.accelerator,
            decode_accelerator=d.accelerator,
            kv_bytes=booking.prompt_tokens * booking.kv_bytes_per_token,
            seconds=delay,
        )

    # ------------------------------------------------------------------ the KV paths

    def kv_handoff_failed(
        self, prefill: str, decode: str, now: float, began_at: float, base_s: float, max_s: float
    ) -> list[tuple[tuple[str, ...], float]]:
        """A p2p handoff begun at ``began_at`` from ``prefill`` to ``decode`` did not land. The pair
        backs off (``scheduler.backoff``); a node whose handoffs with two or more peers are backing
        off has its own KV network taken as down, and backs off as a whole (one bad node does not
        take out every peer it tried). What now backs off, for how long: ``((prefill, decode), s)``
        for the pair, ``((node,), s)`` for a node."""
        d = self._nodes.get(decode)
        if d is None:
            return []
        seconds = d.kv_from.setdefault(prefill, Backoff()).failed(now, began_at, base_s, max_s)
        if seconds is None:
            return []
        out: list[tuple[tuple[str, ...], float]] = [((prefill, decode), seconds)]
        peers = {
            decode: len(d.kv_unreachable_from(now)),
            prefill: sum(1 for n in self._nodes.values() if (w := n.kv_from.get(prefill)) and w.open(now)),
        }
        for wid, count in peers.items():
            node = self._nodes.get(wid)
            if node is not None and count >= 2:
                node_s = node.kv_path.failed(now, began_at, base_s, max_s)
                if node_s is not None:
                    out.append(((wid,), node_s))
        return out

    def kv_path_backs_off(self, prefill: str, decode: str, now: float) -> bool:
        """Whether a handoff from ``prefill`` to ``decode`` would go over a KV path backing off:
        the pair's, or either node's whole KV network."""
        d, p = self._nodes.get(decode), self._nodes.get(prefill)
        if any(n is not None and n.kv_path.open(now) for n in (p, d)):
            return True
        pair = None if d is None else d.kv_from.get(prefill)
        return pair is not None and pair.open(now)

    def kv_handoff_landed(self, prefill: str, decode: str, now: float) -> None:
        """A p2p handoff from ``prefill`` landed on ``decode``: both ends' KV paths work; the next
        failure of the pair or of either node backs off afresh (an open window runs its time)."""
        d, p = self._nodes.get(decode), self._nodes.get(prefill)
        if d is not None:
            pair = d.kv_from.get(prefill)
            if pair is not None:
                pair.succeeded()
                if not pair.open(now):
                    del d.kv_from[prefill]  # kept only while it says something
            d.kv_path.succeeded()
        if p is not None:
            p.kv_path.succeeded()

    def held_on_decode(self, job_id: str) -> tuple[NodeLedger, Held] | None:
        """The job's decode node and what it holds there."""
        booking = self._jobs.get(job_id)
        d = None if booking is None else self._nodes.get(booking.decode)
        held = None if d is None else d.held.get(job_id)
        return None if d is None or held is None else (d, held)

    def finish(self, job_id: str, now: float, steps: int) -> TpotOutcome | None:
        """The job finished on its decode node after ``steps`` tokens there (its first came from
        the prefill); Unreserves it everywhere."""
        booking = self._jobs.get(job_id)
        if booking is None:
            return None
        d = self._nodes.get(booking.decode)
        outcome = None if d is None else d.leave(job_id, now, steps)
        self.release(job_id, now)
        return outcome

    def release(self, job_id: str, now: float, worker_id: str | None = None) -> None:
        """Unreserve the job on ``worker_id``, or on every node it used. Idempotent."""
        booking = self._jobs.get(job_id)
        if worker_id is not None:
            node = self._nodes.get(worker_id)
            if node is not None:
                node.release(job_id, now)
            return
        self._jobs.pop(job_id, None)
        if booking is None:
            return
        for wid in {booking.prefill, booking.decode}:
            node = self._nodes.get(wid)
            if node is not None:
                node.release(job_id, now)
