"""Placement as the scheduler does it, live and simulated: one request builder, one decision per
attempt, booked at once in the one ledger, and what is learnt from every request's lifecycle.

The pure placement framework (``scheduler/placement``) decides; the planner feeds it what the
scheduler knows and keeps what it learns:

* :meth:`Planner.request` builds the ``PlacementRequest`` (the output-length predictor's quantiles,
  the request's objectives, prefix hashes): the live flow and the simulator both call it;
* :meth:`Planner.decide` takes the decision on a snapshot of every node (the worker's report + the
  ledger + the learnt latency models, ``scheduler/node_view.py``) and books it in the ledger before
  returning, so the next decision sees it; admission's room check *is* this decision;
* the lifecycle calls (:meth:`first_token`, :meth:`kv_loaded`, :meth:`grow`, :meth:`finished`,
  :meth:`release`) move the booking along, and the ledger's observations teach the latency models.

Times are the caller's (live: ``time.monotonic()``; simulator: virtual seconds), never read here.
The nodes come from a :class:`NodeSource`: the live worker registry or the simulator's engines.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Protocol

import msgspec
import numpy as np

from scheduler.ledger.ledger import BookingFacts, Ledger
from scheduler.ledger.prefix_memory import PREFIX_BLOCK_TOKENS
from scheduler.node_view import NodeState, node_view
from scheduler.placement.config import PlacementConfig, ReservationMode
from scheduler.placement.framework import Placer
from scheduler.placement.kv_budget import blocks_for, predicted_output_tokens, regrow
from scheduler.placement.prefix import matched_prefix_blocks, prompt_block_hashes
from scheduler.placement.sample import Holds, NodeSampler
from scheduler.placement.slo_estimate import decode_steps
from scheduler.placement.types import ClusterSnapshot, Placement, PlacementRequest
from scheduler.prediction.latency import PROGRESS_INTERVAL_S, LatencyLearner
from scheduler.prediction.output_length import OutputFeatures, OutputLengthPredictor
from transport.errors import ErrorCode, PdorchError
from transport.messages import Role


class NodeSource(Protocol):
    def node_states(self) -> Iterable[NodeState]:
        """Every node placement may use: its Hello, its last reported Load, whether it drains."""
        ...


class Planner:
    def __init__(
        self,
        nodes: NodeSource,
        ledger: Ledger,
        placer: Placer,
        predictor: OutputLengthPredictor,
        latency: LatencyLearner,
        *,
        colocated: bool,
    ) -> None:
        self._nodes = nodes
        self.ledger = ledger
        self.placer = placer
        self.predictor = predictor
        self.latency = latency
        self._colocated = colocated
        self._progress_at = -float("inf")
        # Decisions taken on a sample of the nodes, and on all of them (a small cluster, or the
        # sample could not take the request): pdorch_placement_scope_total.
        self.scope: Counter[str] = Counter()
        self._sampler = NodeSampler(self.config.sample, self.config.seed)

    @property
    def config(self) -> PlacementConfig:
        return self.placer.config

    # ------------------------------------------------------------------ the request

    def features(
        self,
        model: str,
        prompt: Sequence[int] | np.ndarray,
        max_tokens: int,
        tenant: str,
        hint: int,
        block_hashes: Sequence[int] | None = None,
    ) -> OutputFeatures:
        """The output-length predictor's features of a tokenized prompt (``block_hashes``: its
        unsalted hashes of ``PREFIX_BLOCK_TOKENS``-token blocks, when the caller has them)."""
        if block_hashes is None:
            block_hashes = prompt_block_hashes(prompt[:PREFIX_BLOCK_TOKENS], PREFIX_BLOCK_TOKENS)
        return OutputFeatures(
            prompt_len=len(prompt),
            max_tokens=max_tokens,
            model=model,
            tenant=tenant,
            template_key=block_hashes[0] if block_hashes else 0,
            hint=hint,
        )

    def request(
        self,
        request_id: str,
        features: OutputFeatures,
        *,
        block_hashes: tuple[int, ...],
        prefix_block_tokens: int,
        priority: int = 0,
        ttft_slo_s: float = 0.0,
        tpot_slo_s: float = 0.0,
        best_effort: bool = False,
        adapter: str = "",
        followers: int = 0,
    ) -> PlacementRequest:
        """The one builder of what placement is asked to place."""
        prediction = self.predictor.predict(features)
        return PlacementRequest(
            request_id=request_id,
            model=features.model,
            prompt_len=features.prompt_len,
            max_tokens=features.max_tokens,
            tenant=features.tenant,
            priority=priority,
            block_hashes=block_hashes,
            prefix_block_tokens=prefix_block_tokens,
            predicted_output_len=round(prediction.mean),
            predicted_output_quantiles=prediction.quantiles,
            colocated=self._colocated,
            ttft_slo_s=ttft_slo_s,
            tpot_slo_s=tpot_slo_s,
            best_effort=best_effort,
            adapter=adapter,
            followers=followers,
        )

    # ------------------------------------------------------------------ deciding

    def snapshot(self, now: float, exclude: frozenset[str] = frozenset()) -> ClusterSnapshot:
        """Every node's view but those in ``exclude``."""
        return self._snapshot(now, list(self._nodes.node_states()), exclude)

    def _snapshot(
        self,
        now: float,
        all_states: list[NodeState],
        exclude: frozenset[str],
        only: frozenset[str] | None = None,
    ) -> ClusterSnapshot:
        self._observe_progress(now, all_states)
        states = [
            s
            for s in all_states
            if s.hello.worker_id not in exclude and (only is None or s.hello.worker_id in only)
        ]
        table = self.latency.table(
            now, [(s.hello.worker_id, s.hello.model, s.hello.accelerator) for s in all_states]
        )
        accelerators = self.config.accelerators
        views = []
        for s in states:
            node = self.ledger.node(s.hello.worker_id)
            if node is not None:
                views.append(node_view(s, node, table, accelerators, now))
        return ClusterSnapshot(tuple(views), table)

    def _observe_progress(self, now: float, states: list[NodeState]) -> None:
        """Every ``PROGRESS_INTERVAL_S``, what each node's batch decoded meanwhile teaches the decode
        model (a burst of long answers is seen while they decode, not ~a minute later when they end)."""
        if now - self._progress_at < PROGRESS_INTERVAL_S:
            return
        self._progress_at = now
        for s in states:
            node = self.ledger.node(s.hello.worker_id)
            sample = None if node is None else node.progress(now, s.load.decoded_tokens)
            if sample is not None:
                self.latency.observe_decode(sample)

    def place(
        self, preq: PlacementRequest, now: float, *, arrived_at: float, exclude: frozenset[str] = frozenset()
    ) -> Placement:
        """One decision, not booked. NO_WORKER: nothing has room yet; QUEUE_FULL: shed. A LoRA
        request sees only the nodes that serve its adapter. In a large cluster, on a sample of the
        nodes first (``PlacementConfig.sample``)."""
        preq = msgspec.structs.replace(preq, waited_s=max(0.0, now - arrived_at))
        states = list(self._nodes.node_states())
        if preq.adapter:
            exclude = exclude | frozenset(
                s.hello.worker_id for s in states if preq.adapter not in s.hello.adapters
            )
        sample = None
        if self.placer.samples and len(states) > self.config.sample:  # else no class is over it
            sample = self._sampler.sample(preq, [s.hello for s in states], self._holds, self._busy, exclude)
        if sample is not None:
            placement = None
            try:
                placement = self.placer.place(self._snapshot(now, states, exclude, sample), preq)
            except PdorchError as e:
                if e.code not in (ErrorCode.NO_WORKER, ErrorCode.QUEUE_FULL):
                    raise
            # It stands if each pool does its own phase; if on the sample the request would wait,
            # be shed or take a node lent to the other phase (the sample's own nodes are short of
            # room), the whole cluster may do better.
            stood = placement is not None and (preq.colocated or _split(placement, states))
            self._sampler.record(preq.request_id, stood)
            if placement is not None and stood:
                self.scope["sample"] += 1
                return placement
        self.scope["all"] += 1
        return self.placer.place(self._snapshot(now, states, exclude), preq)

    def _busy(self, worker_id: str, prefill: bool) -> int:
        """Prompt tokens queued to prefill on the node, or decoding there (booked)."""
        node = self.ledger.node(worker_id)
        if node is None:
            return sys.maxsize
        return node.pending_tokens if prefill else node.booked_tokens

    def _holds(self, worker_id: str) -> Holds:
        node = self.ledger.node(worker_id)
        return node.prefixes.membership() if node is not None else frozenset().__contains__

    def decide(
        self, preq: PlacementRequest, now: float, *, arrived_at: float, exclude: frozenset[str] = frozenset()
    ) -> Placement | None:
        """One decision, booked at once under the request's id (its job id); None: wait for room."""
        try:
            placement = self.place(preq, now, arrived_at=arrived_at, exclude=exclude)
        except PdorchError as e:
            if e.code is ErrorCode.NO_WORKER:
                return None
            raise
        self.book(placement, preq, now)
        return placement

    def follow(self, preq: PlacementRequest, worker_id: str, now: float) -> Placement | None:
        """Colocated on ``worker_id``, which holds the prompt's KV already, and booked: the other
        choices of a request with ``n`` > 1 go where the first one's KV landed, to share its prompt
        blocks (placement decided once for all of them). None if that worker is gone or draining."""
        state = next((s for s in self._nodes.node_states() if s.hello.worker_id == worker_id), None)
        node = self.ledger.node(worker_id)
        if state is None or state.draining or node is None:
            return None
        tokens = preq.prompt_len + predicted_output_tokens(preq, self.config.reservation)
        placement = Placement(worker_id, worker_id, blocks_for(tokens, node.block_size))
        self.book(placement, preq, now)
        # The prompt's full blocks are choice 0's, there and counted as used: its own are the last,
        # partial one and its output (as the first choice's room check counted them).
        node.grow(preq.request_id, preq.prompt_len // node.block_size * node.block_size)
        return placement

    def book(self, placement: Placement, preq: PlacementRequest, now: float) -> None:
        prefill = self.ledger.node(placement.prefill)
        cached = 0
        if prefill is not None and preq.block_hashes:
            per_block = preq.prefix_block_tokens or prefill.block_size
            cached = matched_prefix_blocks(preq.block_hashes, prefill.prefixes.view()) * per_block
        adapter_load = self._adapter_missing(placement.prefill, preq.adapter)
        self.ledger.book(
            preq.request_id, placement, _facts(preq), cached=cached, now=now, adapter_load=adapter_load
        )

    def _adapter_missing(self, worker_id: str, adapter: str) -> bool:
        """Whether ``worker_id`` must load ``adapter`` first: it reports slots, does not report it
        resident, and no request booked there uses it (checked before this one is booked)."""
        node = self.ledger.node(worker_id)
        if not adapter or node is None:
            return False
        state = next((s for s in self._nodes.node_states() if s.hello.worker_id == worker_id), None)
        if state is None or state.load.adapter_slots <= 0:
            return False
        return adapter not in state.load.adapters_resident and adapter not in node.adapter_of.values()

    def book_decode(self, job_id: str, worker_id: str, reserve_blocks: int, preq: PlacementRequest) -> None:
        """The job's KV goes to another decode node (the broker still holds it)."""
        self.ledger.book_decode(job_id, worker_id, reserve_blocks, _facts(preq))

    # ------------------------------------------------------------------ the lifecycle

    def first_token(self, job_id: str, now: float, cached: int | None = None) -> None:
        sample = self.ledger.first_token(job_id, now, cached)
        if sample is not None:
            self.latency.observe_prefill(sample)

    def kv_loaded(self, job_id: str, now: float) -> None:
        sample = self.ledger.kv_loaded(job_id, now)
        if sample is not None:
            self.latency.observe_handoff(sample)

    def grow(self, job_id: str, tokens_so_far: int, max_total_tokens: int) -> None:
        """The job holds ``tokens_so_far`` on its decode node: re-reserve once it outgrows its
        predicted footprint."""
        found = self.ledger.held_on_decode(job_id)
        if found is None:
            return
        node, held = found
        reserved = None
        if self.config.reservation.mode is ReservationMode.PREDICTED:
            reserved = regrow(
                held.reserved_blocks,
                tokens_so_far,
                node.block_size,
                max_total_tokens=max_total_tokens,
                factor=self.config.reservation.regrow_factor,
            )
        node.grow(job_id, tokens_so_far, reserved)

    def finished(self, job_id: str, now: float, decoded: int) -> None:
        """The job's decode ended after ``decoded`` tokens on its decode node; Unreserve everywhere."""
        outcome = self.ledger.finish(job_id, now, decoded)
        if outcome is not None:
            self.latency.observe_tpot(outcome)

    def release(self, job_id: str, now: float, worker_id: str | None = None) -> None:
        self.ledger.release(job_id, now, worker_id)

    def observe(self, features: OutputFeatures, output_len: int) -> None:
        self.predictor.observe(features, output_len)


def _split(placement: Placement, states: list[NodeState]) -> bool:
    """Prefilled on one node and decoded on another that is not a prefill node: each pool doing its
    own phase (the slo handler's first tier)."""
    if placement.colocated:
        return False
    return next(s.hello.role for s in states if s.hello.worker_id == placement.decode) is not Role.PREFILL


def _facts(preq: PlacementRequest) -> BookingFacts:
    return BookingFacts(
        prompt_tokens=preq.prompt_len,
        block_hashes=preq.block_hashes,
        prefix_block_tokens=preq.prefix_block_tokens,
        decode_steps=decode_steps(preq),
        tpot_slo_s=preq.tpot_slo_s,
        adapter=preq.adapter,
    )
