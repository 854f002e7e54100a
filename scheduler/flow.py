"""One request's lifecycle: place -> reserve -> prefill -> handoff -> decode -> finish.

``Orchestrator.generate`` is an async generator of token batches. Every wait has a deadline, and
every exit path (finish, error, client gone) releases what the request holds: reservations
(Unreserve), inbox entry, and jobs still running on workers (Cancel).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from scheduler.cluster import Cluster
from scheduler.config import SchedulerConfig
from scheduler.control import ControlServer
from scheduler.inbox import Inbox, WorkerLost
from scheduler.metrics import Metrics
from scheduler.placement.types import Placement, PlacementRequest
from scheduler.planner import Planner
from scheduler.prediction.output_length import OutputFeatures
from transport.errors import ErrorCode, PdorchError
from transport.messages import (
    Cancel,
    DecodeJob,
    FinishReason,
    GenerateJob,
    JobError,
    KvLoaded,
    KvRoute,
    PrefillJob,
    SamplingParams,
    TokenOutput,
)

log = logging.getLogger("pdorch.flow")

# Decode jobs re-placed after their worker died before taking the KV (centralized mode only).
_MAX_DECODE_TRIES = 3


@dataclass
class GenerationRequest:
    request_id: str
    model: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    tenant: str = ""
    priority: int = 0
    hint: int = 0  # the client's expected output length (a header), 0 = none
    arrival: float = field(default_factory=time.monotonic)


@dataclass
class TokenBatch:
    token_ids: list[int]
    finish_reason: FinishReason | None
    cached_tokens: int = 0


@dataclass
class _Route:
    """Who is working on the request right now."""

    prefill: str
    decode: str
    transfer_id: str
    open_workers: set[str]
    kv_loaded: bool = False
    prefill_pending: bool = False
    tried_decode: set[str] = field(default_factory=set)

    @property
    def split(self) -> bool:
        return self.prefill != self.decode


class Orchestrator:
    def __init__(
        self,
        cfg: SchedulerConfig,
        cluster: Cluster,
        control: ControlServer,
        inbox: Inbox,
        planner: Planner,
        metrics: Metrics,
        on_capacity: Callable[[], None] = lambda: None,
    ) -> None:
        self._cfg = cfg
        self._cluster = cluster
        self._control = control
        self._inbox = inbox
        self._planner = planner
        self._metrics = metrics
        self._on_capacity = on_capacity

    def plan(self, req: GenerationRequest) -> tuple[OutputFeatures, PlacementRequest]:
        features = self._planner.features(
            req.model, req.prompt_token_ids, req.sampling.max_tokens, req.tenant, req.hint
        )
        return features, self._planner.request(req.request_id, features, req.prompt_token_ids, req.priority)

    # ------------------------------------------------------------------ the lifecycle

    async def generate(
        self, req: GenerationRequest, plan: tuple[OutputFeatures, PlacementRequest] | None = None
    ) -> AsyncIterator[TokenBatch]:
        rid = req.request_id
        features, preq = plan or self.plan(req)
        queue = self._inbox.open(rid)
        route: _Route | None = None
        generated = 0
        finished = False
        try:
            route = self._dispatch(req, preq, self._planner.place(preq))
            while True:
                timeout, code, what = self._next_timeout(req, route, generated)
                remaining = self._cfg.request_timeout_s - (time.monotonic() - req.arrival)
                try:
                    worker_id, event = await asyncio.wait_for(queue.get(), max(0.0, min(timeout, remaining)))
                except TimeoutError:
                    if remaining < timeout:
                        code, what = ErrorCode.DEADLINE_EXCEEDED, "request did not finish"
                    raise PdorchError(code, f"{what} within {min(timeout, remaining):.0f}s") from None
                if isinstance(event, TokenOutput):
                    if worker_id == route.prefill and route.split:
                        if not route.prefill_pending:
                            continue  # token 0 already came with KvLoaded
                        self._prefill_answered(req, route)
                    generated += len(event.token_ids)
                    if worker_id == route.decode:
                        self._planner.grow(
                            worker_id,
                            rid,
                            len(req.prompt_token_ids) + generated,
                            len(req.prompt_token_ids) + req.sampling.max_tokens,
                        )
                    if event.finish_reason is not None:
                        route.open_workers.discard(worker_id)
                        finished = True
                    yield TokenBatch(list(event.token_ids), event.finish_reason, event.cached_tokens)
                    if finished:
                        return
                elif isinstance(event, KvLoaded):
                    self._handoff_done(rid, route)
                    if route.prefill_pending and event.first_token >= 0:
                        # The prefill worker's token 0 is still on its way; decode's copy wins.
                        self._prefill_answered(req, route)
                        generated += 1
                        yield TokenBatch([event.first_token], None)
                elif isinstance(event, JobError):
                    route.open_workers.discard(worker_id)
                    if event.code.startswith("kv_"):
                        self._metrics.handoffs.labels(self._cfg.kv_mode, event.code).inc()
                    raise PdorchError(_code(event.code), f"worker {worker_id}: {event.message}")
                elif isinstance(event, WorkerLost):
                    route.open_workers.discard(worker_id)
                    if self._can_retry_decode(route, worker_id):
                        self._retry_decode(req, preq, route)
                        continue
                    raise PdorchError(ErrorCode.WORKER_LOST, f"worker {worker_id} was lost: {event.reason}")
        finally:
            self._inbox.close(rid)
            if route is not None:
                self._close(req, route)
            if finished:
                self._planner.observe(features, generated)

    # ------------------------------------------------------------------ steps

    def _kv_route(self, decode_worker: str, transfer_id: str) -> tuple[KvRoute, KvRoute]:
        """(route for the prefill side, route for the decode side)."""
        if self._cfg.kv_mode == "centralized":
            r = KvRoute("centralized", self._cfg.kv_broker, transfer_id)
            return r, r
        worker = self._cluster.get(decode_worker)
        endpoint = worker.hello.kv_endpoint if worker is not None else ""
        if not endpoint:
            raise PdorchError(ErrorCode.NO_WORKER, f"decode worker {decode_worker} advertises no KV endpoint")
        return KvRoute("p2p", endpoint, transfer_id), KvRoute("p2p", "", transfer_id)

    def _dispatch(self, req: GenerationRequest, preq: PlacementRequest, placement: Placement) -> _Route:
        rid = req.request_id
        prompt = req.prompt_token_ids
        deadline = self._cfg.first_token_timeout_s
        p, d = placement.prefill, placement.decode
        if placement.colocated:
            route = _Route(p, p, "", {p})
            self._cluster.assign(p, rid, placement.reserve_blocks, len(prompt), preq.block_hashes)
            self._inbox.expect_from(rid, p)
            self._send_or_fail(p, GenerateJob(rid, prompt, req.sampling, deadline))
            return route
        route = _Route(p, d, uuid.uuid4().hex, {p}, tried_decode={d})
        self._cluster.assign(p, rid, 0, 0, preq.block_hashes)
        self._inbox.expect_from(rid, p)
        if req.sampling.max_tokens == 1:
            # Prefill produces the only token: nothing to hand off.
            route.decode = p
            self._send_or_fail(p, PrefillJob(rid, prompt, req.sampling, None, deadline))
            self._prefill_sent(req, route)
            return route
        p_route, d_route = self._kv_route(d, route.transfer_id)
        self._cluster.assign(d, rid, placement.reserve_blocks, len(prompt), preq.block_hashes)
        self._inbox.expect_from(rid, d)
        route.open_workers.add(d)
        # Decode first, so its receiver expects the transfer by the time prefill streams it.
        self._send_or_fail(d, DecodeJob(rid, prompt, req.sampling, d_route, deadline))
        self._send_or_fail(p, PrefillJob(rid, prompt, req.sampling, p_route, deadline))
        self._prefill_sent(req, route)
        return route

    def _send_or_fail(self, worker_id: str, job: PrefillJob | DecodeJob | GenerateJob) -> None:
        if not self._control.send(worker_id, job):
            raise PdorchError(ErrorCode.WORKER_LOST, f"worker {worker_id} is unreachable")

    def _prefill_sent(self, req: GenerationRequest, route: _Route) -> None:
        route.prefill_pending = True
        self._cluster.add_pending_prefill(route.prefill, len(req.prompt_token_ids))

    def _prefill_answered(self, req: GenerationRequest, route: _Route) -> None:
        route.prefill_pending = False
        self._cluster.add_pending_prefill(route.prefill, -len(req.prompt_token_ids))
        self._on_capacity()

    def _handoff_done(self, rid: str, route: _Route) -> None:
        route.kv_loaded = True
        self._metrics.handoffs.labels(self._cfg.kv_mode, "ok").inc()
        # The prefill side's part is over; its node no longer holds anything for this request.
        route.open_workers.discard(route.prefill)
        self._inbox.stop_expecting(rid, route.prefill)
        self._cluster.release(route.prefill, rid)
        self._on_capacity()

    def _next_timeout(
        self, req: GenerationRequest, route: _Route, generated: int
    ) -> tuple[float, ErrorCode, str]:
        """How long to wait for the next event, and what it means if nothing comes."""
        if generated == 0:
            return self._cfg.first_token_timeout_s, ErrorCode.DEADLINE_EXCEEDED, "no first token"
        if route.split and not route.kv_loaded:
            # Prefill has answered, so the KV is computed and on the wire: it must land soon.
            worker = self._cluster.get(route.decode)
            kv_bytes = len(req.prompt_token_ids) * (worker.hello.kv_bytes_per_token if worker else 0)
            return (
                self._cfg.kv_handoff_timeout_s + kv_bytes / 1e9,
                ErrorCode.KV_TIMEOUT,
                "the KV handoff did not complete after prefill finished",
            )
        return self._cfg.token_timeout_s, ErrorCode.DEADLINE_EXCEEDED, "no next token"

    def _close(self, req: GenerationRequest, route: _Route) -> None:
        """Unreserve everywhere and cancel whatever may still run for the request."""
        if route.prefill_pending:
            self._prefill_answered(req, route)
        for wid in route.open_workers:
            self._control.send(wid, Cancel(req.request_id))
        for wid in {route.prefill, route.decode, *route.tried_decode}:
            self._cluster.release(wid, req.request_id)
        self._on_capacity()

    def _can_retry_decode(self, route: _Route, lost: str) -> bool:
        # Only the broker keeps the KV when its receiver dies before taking it.
        return (
            self._cfg.kv_mode == "centralized"
            and lost == route.decode
            and route.split
            and not route.kv_loaded
            and len(route.tried_decode) < _MAX_DECODE_TRIES
        )

    def _retry_decode(self, req: GenerationRequest, preq: PlacementRequest, route: _Route) -> None:
        placement = self._planner.place(preq, exclude=frozenset(route.tried_decode))
        d = placement.decode
        if d == route.prefill:
            raise PdorchError(ErrorCode.NO_WORKER, "decode worker lost and no other decode worker is free")
        log.warning(
            "request %s: decode worker %s lost before taking the KV; retrying on %s",
            req.request_id,
            route.decode,
            d,
        )
        self._metrics.decode_retries.inc()
        route.decode = d
        route.tried_decode.add(d)
        route.open_workers.add(d)
        prompt = req.prompt_token_ids
        self._cluster.assign(d, req.request_id, placement.reserve_blocks, len(prompt), preq.block_hashes)
        self._inbox.expect_from(req.request_id, d)
        _, d_route = self._kv_route(d, route.transfer_id)
        self._send_or_fail(
            d, DecodeJob(req.request_id, prompt, req.sampling, d_route, self._cfg.first_token_timeout_s)
        )


def _code(raw: str) -> ErrorCode:
    try:
        return ErrorCode(raw)
    except ValueError:
        return ErrorCode.JOB_FAILED
