"""Discrete-event simulation of a P/D cluster in virtual time, placing requests with the real placement code.

One run replays a trace against a cluster under one placement policy:

The scheduler side is the live scheduler's own :class:`~scheduler.planner.Planner`: the same
request builder, the same decision per request booked in the same
:class:`~scheduler.ledger.ledger.Ledger`, the same learnt latency models fed the same lifecycle
events, the same node views (each node's ``Hello`` and ``Load`` are what a live worker would send).

1. **Arrival**: the planner builds the request (output-length prediction, the SLO judge's
   objectives); it joins the fair admission queue (earliest TTFT deadline first) and is placed when
   it reaches the head (``Planner.decide``, booked at once). A policy that finds no node with room
   (NO_WORKER) leaves it waiting; it is retried when capacity frees. One that sheds it
   (QUEUE_FULL) fails it.
2. **Placement** submits the prompt to the prefill node (or, colocated, to the one node, which then
   decodes too); the booking holds the KV reservation on the decode node (Reserve).
3. **Prefill done** = first token (TTFT). A handoff asks the decode node for KV room; when admitted,
   the KV moves over the link (prompt tokens x KV bytes/token / link bandwidth, one transfer at a
   time per node NIC), the prefill node frees it and the decode node starts generating.
4. **Finish** releases the reservation (Unreserve), teaches the predictor the true length and may
   let waiting requests in. A request that outgrows its reservation gets a bigger one (``regrow``).

The engines (``simulate.fluid``, timed by ``workers.engines.sim.cost``) model continuous batching,
chunked prefill, KV capacity, preemption and prefix caching; this module only moves requests between them.
"""

from __future__ import annotations

import heapq
import math

import msgspec
import numpy as np

from scheduler.admission.policy import AdmissionPolicy, QueueOrder
from scheduler.admission.queue import FairQueue
from scheduler.ledger.ledger import Ledger
from scheduler.node_view import NodeState
from scheduler.placement.config import PlacementConfig, ReservationMode
from scheduler.placement.framework import Placer
from scheduler.placement.policies import is_colocated
from scheduler.placement.types import Placement, PlacementRequest
from scheduler.planner import Planner
from scheduler.prediction.latency import LatencyLearner
from scheduler.prediction.output_length import OutputFeatures, OutputLengthPredictor, PredictorConfig
from simulate.adapters import AdapterSpec, assign_adapters
from simulate.cluster import ClusterSpec
from simulate.fluid import EngineEvent, EngineParams, EventKind
from simulate.metrics import SimResult, percentile
from simulate.node import SimNode
from simulate.predictor_eval import features_of
from simulate.slo import SloJudge, SloSpec
from simulate.trace import Trace
from transport.errors import ErrorCode, PdorchError
from workers.engines.sim.cost import CostModel, model_shapes

_ARRIVAL, _ENGINE, _TRANSFER = 0, 1, 2
MIN_CHUNK_TOKENS = 128
# Share of the TPOT SLO one chunked-prefill iteration may take (the rest is the decode step's own).
CHUNK_BUDGET_OF_TPOT = 0.6


class SimConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str = "llama-2-70b"
    block_size: int = 16
    chunk_tokens: int = 0  # 0 = per node, the largest chunk whose prefill fits the chunk budget
    max_batch: int = 256
    # KV link per instance: four 200 Gb/s RDMA NICs for a 4-GPU instance (one per GPU, as in a DGX A100).
    link_gbytes_per_s: float = 100.0
    predictor: PredictorConfig = PredictorConfig()
    # LoRA adapters drawn for the trace's requests (none by default); every worker serves them all.
    adapters: AdapterSpec = AdapterSpec()


def chunk_tokens_for(cost: CostModel, tpot_s: float) -> int:
    """Sarathi-Serve's rule: the largest prefill chunk that keeps a mixed iteration within the TPOT SLO."""
    budget_ms = CHUNK_BUDGET_OF_TPOT * tpot_s * 1e3
    lo, hi = MIN_CHUNK_TOKENS, 1 << 16
    if cost.prefill_ms(0, lo) >= budget_ms:
        return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if cost.prefill_ms(0, mid) <= budget_ms else (lo, mid)
    return lo


class _Req:
    __slots__ = (
        "colocated",
        "decode",
        "done",
        "failed",
        "features",
        "first",
        "job",
        "predicted",
        "prefill",
        "preq",
    )

    def __init__(self, preq: PlacementRequest, features: OutputFeatures) -> None:
        self.preq = preq
        self.job = preq.request_id
        self.features = features
        self.prefill = -1
        self.decode = -1
        self.colocated = False
        self.predicted = (0.0, 0.0)  # the placement's predicted TTFT and TPOT (0: none)
        self.first = math.nan
        self.done = math.nan
        self.failed = False


class Simulation:
    def __init__(
        self,
        trace: Trace,
        cluster: ClusterSpec,
        placement: PlacementConfig,
        slo: SloSpec | None = None,
        config: SimConfig | None = None,
        *,
        policy_name: str = "custom",
        rate_scale: float = 1.0,
        max_misses: int | None = None,
    ) -> None:
        slo, config = slo or SloSpec(), config or SimConfig()
        shapes = model_shapes()
        if config.model not in shapes:
            raise PdorchError(
                ErrorCode.CONFIG, f"unknown model shape {config.model!r}; known: {sorted(shapes)}"
            )
        shape = shapes[config.model]
        lora = config.adapters
        trace = assign_adapters(trace, lora)
        self.trace = trace.scaled(rate_scale) if rate_scale != 1.0 else trace
        self.rate_scale = rate_scale
        self.policy_name = policy_name
        placer = Placer(placement)
        placement = placer.config  # validated
        colocated = is_colocated(placement)
        self.cluster = cluster.colocated() if colocated else cluster
        self.config = config
        self._watermarks = placement.reservation.mode is ReservationMode.PREDICTED
        self.judge = SloJudge(slo, CostModel(slo.reference_class, slo.reference_tp, shape))
        self.ledger = Ledger()
        self.planner = Planner(
            self,
            self.ledger,
            placer,
            OutputLengthPredictor(config.predictor),
            LatencyLearner(placement.accelerators),
            colocated=colocated,
        )
        self.nodes: list[SimNode] = []
        for i, spec in enumerate(self.cluster.instances):
            cost = CostModel(spec.accelerator, spec.tp, shape)
            chunk = config.chunk_tokens or chunk_tokens_for(cost, slo.tpot_s)
            params = EngineParams(
                block_size=config.block_size,
                chunk_tokens=chunk,
                max_batch=config.max_batch,
                prefix_block_tokens=trace.prefix_block_tokens,
                max_loras=lora.max_loras if lora.count else 0,
                adapter_load_s=lora.load_s,
            )
            node = SimNode(i, spec, shape, params, config.model, lora.names())
            self.nodes.append(node)
            self.ledger.add_node(
                node.worker_id,
                config.model,
                spec.accelerator,
                block_size=config.block_size,
                kv_bytes_per_token=shape.kv_bytes_per_token,
                capacity_tokens=node.hello.capacity_blocks * node.hello.block_size,
            )
        self._by_id = {n.worker_id: n for n in self.nodes}
        self._now = 0.0
        # Requests that found no room wait here; the most urgent (earliest TTFT deadline) goes first.
        self._queue = FairQueue(
            AdmissionPolicy(max_queued=len(trace.requests) + 1, order=QueueOrder.DEADLINE)
        )
        self._queued: dict[int, int] = {}  # admission ticket -> request index
        self._reqs: list[_Req | None] = [None] * len(self.trace.requests)
        self._heap: list[tuple[float, int, int, int, int]] = []
        self._seq = 0
        self._misses = 0
        self._max_misses = max_misses
        self._aborted = False
        self._kv_bytes = 0.0
        self._local = 0
        self._shed = 0
        self._link_bps = config.link_gbytes_per_s * 1e9
        self._finished = 0

    def node_states(self) -> list[NodeState]:
        """What every node reports now (the planner's node source)."""
        t = self._now
        return [n.state(t) for n in self.nodes]

    # ------------------------------------------------------------------ the loop

    def run(self) -> SimResult:
        if self.trace.requests:
            self._push(self.trace.requests[0].arrival_s, _ARRIVAL, 0)
        heap = self._heap
        while heap and not self._aborted:
            t, _, kind, x, y = heapq.heappop(heap)
            if kind == _ENGINE:
                node = self.nodes[x]
                if y == node.version:
                    self._touch(node, t)
            elif kind == _ARRIVAL:
                self._arrive(x, t)
            else:
                self._transfer_done(x, t)
        for ticket in list(self._queued):  # never placed: nothing will ever free room for them
            self._fail(self._queued.pop(ticket), None)
        return self._result()

    def _push(self, t: float, kind: int, x: int, y: int = 0) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, x, y))

    def _touch(self, node: SimNode, t: float) -> None:
        """Run ``node``'s engine to ``t``, react to what happened, and re-schedule its next event."""
        for ev in node.engine.advance(t):
            self._on_event(node, ev)
        node.version += 1
        nxt = node.engine.next_event_time()
        if nxt < math.inf:
            self._push(nxt, _ENGINE, node.index, node.version)

    # ------------------------------------------------------------------ arrivals and placement

    def _arrive(self, i: int, t: float) -> None:
        reqs = self.trace.requests
        if i + 1 < len(reqs):
            self._push(reqs[i + 1].arrival_s, _ARRIVAL, i + 1)
        r = reqs[i]
        features = features_of(r, self.config.model)
        ttft_slo = self.judge.ttft_limit_s(r.prompt_len)
        preq = self.planner.request(
            str(i),
            features,
            block_hashes=r.hash_ids,
            prefix_block_tokens=self.trace.prefix_block_tokens,
            ttft_slo_s=ttft_slo,
            tpot_slo_s=self.judge.slo.tpot_s,
            adapter=r.adapter,
        )
        self._reqs[i] = _Req(preq, features)
        entry = self._queue.push(r.tenant, 0, t, deadline_at=t + ttft_slo)
        self._queued[entry.ticket] = i
        self._pump(t)

    def _pump(self, t: float) -> None:
        """Place waiting requests in admission order until the head finds no room."""
        while True:
            head = self._queue.peek()
            if head is None:
                return
            i = self._queued[head.ticket]
            try:
                placed = self._try_place(i, t)
            except PdorchError as e:
                if e.code is not ErrorCode.QUEUE_FULL:
                    raise
                self._shed += 1
                self._queue.remove(head.ticket)
                del self._queued[head.ticket]
                self._fail(i, None)
                continue
            if not placed:
                return
            self._queue.pop(t)
            del self._queued[head.ticket]

    def _try_place(self, i: int, t: float) -> bool:
        req = self._reqs[i]
        assert req is not None
        self._now = t
        placement = self.planner.decide(req.preq, t, arrived_at=self.trace.requests[i].arrival_s)
        if placement is None:
            return False
        self._dispatch(i, req, placement, t)
        return True

    def _dispatch(self, i: int, req: _Req, placement: Placement, t: float) -> None:
        p, d = self._by_id[placement.prefill], self._by_id[placement.decode]
        req.prefill, req.decode = p.index, d.index
        req.colocated = p is d
        req.predicted = (placement.predicted_ttft_s, placement.predicted_tpot_s)
        if req.colocated and self.cluster.instances[d.index].role != "both":
            self._local += 1
        r = self.trace.requests[i]
        if self._watermarks:
            d.engine.set_watermark(t, i, placement.reserve_blocks * self.config.block_size)
        p.engine.submit_prefill(
            t,
            i,
            r.prompt_len,
            r.hash_ids,
            decode_here=req.colocated,
            output_len=r.output_len,
            adapter=r.adapter,
        )
        self._touch(p, t)

    # ------------------------------------------------------------------ engine events

    def _on_event(self, node: SimNode, ev: EngineEvent) -> None:
        kind, i, t = ev
        req = self._reqs[i]
        assert req is not None
        if kind == EventKind.PREFILL_DONE:
            if math.isnan(req.first):
                req.first = t
            self.planner.first_token(req.job, t, node.engine.prefill_hits.pop(i, None))
            if not req.colocated:
                self._handoff(i, req, node, t)
            if self._queued:  # a prefill queue got shorter: a waiting request may fit now
                self._pump(t)
        elif kind == EventKind.ADMITTED:
            self._start_transfer(i, req, node, t)
        elif kind == EventKind.FINISHED:
            self._finish(i, req, t)
        elif kind == EventKind.WATERMARK:
            self._regrow(i, req, node, t)
        elif kind == EventKind.DROPPED:
            if not req.colocated:  # the prefill node still holds the KV that found no home
                prefill = self.nodes[req.prefill]
                prefill.engine.release(t, i)
                self._touch(prefill, t)
            self._fail(i, t)

    def _handoff(self, i: int, req: _Req, prefill: SimNode, t: float) -> None:
        r = self.trace.requests[i]
        if r.output_len <= 1:  # the first token was the whole answer
            prefill.engine.release(t, i)
            self._finish(i, req, t)
            return
        decode = self.nodes[req.decode]
        decode.engine.request_admission(t, i, r.prompt_len, r.output_len - 1, r.hash_ids, r.adapter)
        self._touch(decode, t)

    def _start_transfer(self, i: int, req: _Req, decode: SimNode, t: float) -> None:
        prefill = self.nodes[req.prefill]
        size = self.trace.requests[i].prompt_len * decode.engine.cost.kv_bytes_per_token
        start = max(t, prefill.nic_free_at, decode.nic_free_at)
        end = start + size / self._link_bps
        prefill.nic_free_at = decode.nic_free_at = end
        self._kv_bytes += size
        self._push(end, _TRANSFER, i)

    def _transfer_done(self, i: int, t: float) -> None:
        req = self._reqs[i]
        assert req is not None
        decode, prefill = self.nodes[req.decode], self.nodes[req.prefill]
        self.planner.kv_loaded(req.job, t)
        decode.engine.join(t, i)
        self._touch(decode, t)
        prefill.engine.release(t, i)
        self._touch(prefill, t)

    def _regrow(self, i: int, req: _Req, node: SimNode, t: float) -> None:
        r = self.trace.requests[i]
        tokens = node.engine.context_at(t, i)
        self.planner.grow(req.job, tokens, r.prompt_len + r.max_tokens)
        held = self.ledger.node(node.worker_id).held.get(req.job)  # type: ignore[union-attr]
        if held is not None and held.reserved_blocks * self.config.block_size > tokens:
            node.engine.set_watermark(t, i, held.reserved_blocks * self.config.block_size)

    def _finish(self, i: int, req: _Req, t: float) -> None:
        if not math.isnan(req.done):
            raise PdorchError(ErrorCode.INTERNAL, f"request {i} finished twice")
        req.done = t
        self._finished += 1
        r = self.trace.requests[i]
        self.planner.finished(req.job, t, r.output_len - 1)
        self.planner.observe(req.features, r.output_len)
        if not self.judge.met(r.prompt_len, req.first - r.arrival_s, self._tpot(req, r.output_len)):
            self._miss()
        self._pump(t)

    def _fail(self, i: int, t: float | None) -> None:
        req = self._reqs[i]
        assert req is not None
        req.failed = True
        self.planner.release(req.job, self._now if t is None else t)
        self._miss()
        if t is not None:
            self._pump(t)

    def _miss(self) -> None:
        self._misses += 1
        if self._max_misses is not None and self._misses > self._max_misses:
            self._aborted = True

    @staticmethod
    def _tpot(req: _Req, output_len: int) -> float:
        return (req.done - req.first) / (output_len - 1) if output_len > 1 else 0.0

    # ------------------------------------------------------------------ results

    def _result(self) -> SimResult:
        reqs = self.trace.requests
        n = len(reqs)
        ttft = np.full(n, math.inf)
        tpot = np.full(n, math.inf)
        limit = np.empty(n)
        for i, (r, req) in enumerate(zip(reqs, self._reqs, strict=True)):
            limit[i] = self.judge.ttft_limit_s(r.prompt_len)
            if req is None or req.failed:
                continue
            if not math.isnan(req.first):
                ttft[i] = req.first - r.arrival_s
            if not math.isnan(req.done):
                tpot[i] = self._tpot(req, r.output_len)
        ttft_ok = ttft <= limit
        tpot_ok = tpot <= self.judge.slo.tpot_s
        done = np.isfinite(tpot)
        finished_ttft = ttft[done]
        finished_tpot = tpot[done]
        ttft_err = [
            abs(ttft[i] / q.predicted[0] - 1.0)
            for i, q in enumerate(self._reqs)
            if q is not None and q.predicted[0] > 0 and math.isfinite(ttft[i])
        ]
        tpot_err = [
            abs(tpot[i] / q.predicted[1] - 1.0)
            for i, q in enumerate(self._reqs)
            if q is not None and q.predicted[1] > 0 and math.isfinite(tpot[i]) and reqs[i].output_len > 1
        ]
        last_done = max((q.done for q in self._reqs if q is not None and not math.isnan(q.done)), default=0.0)
        return SimResult(
            policy=self.policy_name,
            trace=self.trace.name,
            cluster=self.cluster.describe(),
            rate_scale=self.rate_scale,
            request_rate=n / self.trace.duration_s if self.trace.duration_s > 0 else 0.0,
            requests=n,
            finished=self._finished,
            failed=sum(1 for q in self._reqs if q is not None and q.failed),
            aborted=self._aborted,
            ttft_p50_s=percentile(finished_ttft, 50),
            ttft_p90_s=percentile(finished_ttft, 90),
            ttft_p99_s=percentile(finished_ttft, 99),
            tpot_p50_s=percentile(finished_tpot, 50),
            tpot_p90_s=percentile(finished_tpot, 90),
            tpot_p99_s=percentile(finished_tpot, 99),
            attainment=float((ttft_ok & tpot_ok).mean()) if n else 0.0,
            ttft_attainment=float(ttft_ok.mean()) if n else 0.0,
            tpot_attainment=float(tpot_ok.mean()) if n else 0.0,
            kv_transfer_gb=self._kv_bytes / 1e9,
            preemptions=sum(node.engine.preemptions for node in self.nodes),
            prefix_hit_rate=sum(n.engine.cached_tokens for n in self.nodes)
            / max(1, sum(n.engine.prompt_tokens for n in self.nodes)),
            local_prefills=self._local,
            shed=self._shed,
            ttft_prediction_error=percentile(np.array(ttft_err), 50),
            tpot_prediction_error=percentile(np.array(tpot_err), 50),
            makespan_s=last_done - (reqs[0].arrival_s if reqs else 0.0),
            adapter_loads=sum(n.engine.adapter_loads for n in self.nodes),
        )


def simulate(
    trace: Trace,
    cluster: ClusterSpec,
    placement: PlacementConfig,
    slo: SloSpec | None = None,
    config: SimConfig | None = None,
    *,
    policy_name: str = "custom",
    rate_scale: float = 1.0,
    max_misses: int | None = None,
) -> SimResult:
    sim = Simulation(
        trace,
        cluster,
        placement,
        slo,
        config,
        policy_name=policy_name,
        rate_scale=rate_scale,
        max_misses=max_misses,
    )
    return sim.run()
