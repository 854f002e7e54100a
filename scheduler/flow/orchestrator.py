"""One request's lifecycle: place -> reserve -> prefill -> handoff -> decode -> finish, and migrate.

``Orchestrator.generate`` is an async generator of token batches. A request runs as a sequence of
attempts (``attempt.py``): when a worker it depends on dies, stalls or fails it, ``recovery.py``
decides what to redo, and the request goes on from the tokens it already has on other workers; the
client sees a pause, never an error or a repeated token. Only the request's own faults, running
out of attempts (``max_attempts``) or of time (``request_timeout_s``), or finding no worker to
move to within ``queue_timeout_s`` end it with an error.

Every wait has a deadline, and every exit path (finish, error, client gone) releases what the
request holds: reservations (Unreserve), inbox entries, and jobs still running (Cancel).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

import msgspec
import numpy as np

from scheduler.cluster import Cluster
from scheduler.config import SchedulerConfig
from scheduler.control import ControlServer
from scheduler.flow.attempt import Attempt, Failure, Phase
from scheduler.flow.broker_health import BrokerHealth
from scheduler.flow.recovery import KV_PLANE_FAULTS, Recovery, kv_path_failed, recovery
from scheduler.flow.request import GenerationRequest, TokenBatch
from scheduler.inbox import Delivery, Inbox, KvBrokerLost, KvPathDown, Wake, WorkerLost
from scheduler.ledger.prefix_memory import PREFIX_BLOCK_TOKENS
from scheduler.metrics import Metrics
from scheduler.placement.prefix import prompt_block_hashes
from scheduler.placement.types import Placement, PlacementRequest
from scheduler.planner import Planner
from scheduler.prediction.output_length import OutputFeatures
from transport.errors import ErrorCode, PdorchError
from transport.messages import (
    Cancel,
    DecodeJob,
    GenerateJob,
    JobError,
    KvArriving,
    KvLoaded,
    KvMode,
    KvRoute,
    PrefillJob,
    TokenOutput,
)
from transport.token_ids import extend_token_ids

log = logging.getLogger("pdorch.flow")

# How often a request that is moving to other workers looks for room when none is free.
_PLACE_RETRY_S = 0.05
# A timer may go off this much before its deadline by the time the request looks at the clock
# (event loops keep time in milliseconds): close enough, rather than setting it again for the rest.
_TIMER_SLACK_S = 0.002
# How long a decode worker that turned a handoff away for lack of room is left out of decode (as
# long as a KV endpoint reports itself refusing after doing so).
KV_BUSY_S = 5.0
# The longest a KV path whose handoffs did not land (a pair of nodes, or a node with two or more
# peers) is backed off at once (from kv_path_backoff_s, doubling while failures repeat). The
# nodes' control connections may be fine (only the KV network is down), so nothing else would
# keep requests from waiting out their handoff timeout there one after another.
KV_PATH_MAX_S = 60.0


@dataclass
class _Run:
    """A request's progress across its attempts."""

    req: GenerationRequest
    preq: PlacementRequest  # what the current attempt was placed as
    attempt: Attempt | None = None
    tokens: list[int] = field(default_factory=list)  # every token given to the client so far
    progress_at: float = field(default_factory=time.monotonic)  # the last sign of progress
    # Workers that failed the request while staying registered: placed elsewhere when possible.
    avoid: set[str] = field(default_factory=set)
    lost_since: float | None = None  # when the progress a migration has to make up was made
    # Told once where the prompt's KV is resident (see ``Orchestrator.generate``), then None.
    on_resident: Callable[[str], None] | None = None
    # The request's one timer (see ``Orchestrator._next``) and when it goes off.
    timer: asyncio.TimerHandle | None = None
    timer_at: float = math.inf


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
        kv_broker_key: str = "",
    ) -> None:
        """``kv_broker_key``: the broker's public key, pinned by KV connections to it."""
        self._cfg = cfg
        self._shortest_timeout_s = min(
            cfg.first_token_timeout_s, cfg.kv_handoff_timeout_s, cfg.token_timeout_s
        )
        self._kv_broker_key = kv_broker_key
        self._cluster = cluster
        self._control = control
        self._inbox = inbox
        self._planner = planner
        self._metrics = metrics
        self._on_capacity = on_capacity
        self.broker = BrokerHealth(cfg.kv_broker_backoff_s)
        # Attempts whose handoff has not landed (through the broker or peer to peer), by job id:
        # those a lost broker or a KV path found down concerns.
        self._unlanded: dict[str, Attempt] = {}

    def broker_lost(self, reason: str) -> None:
        """The KV broker died or restarted: every handoff going through it is lost."""
        for job_id, a in list(self._unlanded.items()):
            if a.kv_mode is KvMode.CENTRALIZED:
                self._inbox.notify(job_id, KvBrokerLost(reason))

    def plan(self, req: GenerationRequest, followers: int = 0) -> tuple[OutputFeatures, PlacementRequest]:
        """What placement is asked to place for ``req``; ``followers``: its other choices (``n`` - 1),
        which will decode beside it."""
        return self._plan(
            req, req.request_id, req.prompt_token_ids, req.sampling.max_tokens, followers=followers
        )

    def _plan(
        self,
        req: GenerationRequest,
        job_id: str,
        prompt: np.ndarray,
        max_tokens: int,
        *,
        resumed: bool = False,
        followers: int = 0,
    ) -> tuple[OutputFeatures, PlacementRequest]:
        # Salted with the adapter: affinity among nodes that served this adapter's prefix.
        block_hashes = prompt_block_hashes(prompt, PREFIX_BLOCK_TOKENS, req.adapter)
        features = self._planner.features(
            req.model, prompt, max_tokens, req.tenant, req.hint, None if req.adapter else block_hashes
        )
        slo = self._cfg.slo
        preq = self._planner.request(
            job_id,
            features,
            block_hashes=block_hashes,
            prefix_block_tokens=PREFIX_BLOCK_TOKENS,
            priority=req.priority,
            # A resumed request's first token is long out: its next one should come as soon as it can.
            ttft_slo_s=0.0 if resumed else req.ttft_slo_s or slo.ttft_s,
            tpot_slo_s=req.tpot_slo_s or slo.tpot_s,
            best_effort=resumed,
            adapter=req.adapter,
            followers=followers,
        )
        return features, preq

    def decide(self, req: GenerationRequest, preq: PlacementRequest) -> Placement | None:
        """Admission's room check: the request's one placement, booked at once; None = no room yet.
        Raises ``QUEUE_FULL`` when placement sheds it."""
        return self._planner.decide(preq, time.monotonic(), arrived_at=req.arrival)

    def forget(self, req: GenerationRequest) -> None:
        """Unreserve whatever the request's first attempt booked (a no-op once ``generate`` ran)."""
        self._planner.release(req.request_id, time.monotonic())

    # ------------------------------------------------------------------ the lifecycle

    async def generate(
        self,
        req: GenerationRequest,
        plan: tuple[OutputFeatures, PlacementRequest] | None = None,
        placement: Placement | None = None,
        *,
        follow: str = "",
        on_resident: Callable[[str], None] | None = None,
    ) -> AsyncGenerator[TokenBatch, bool | None]:
        """The request's tokens as they come. ``placement``: its decision, booked by :meth:`decide`
        at admission (without one, it is decided here, once). ``on_resident(worker_id)`` is called
        once, when the prompt's KV is complete on the worker that generates the rest (the decode
        worker once the handoff landed; the prefill worker if the request ended at its first
        token). ``follow`` starts the request colocated on that worker instead of placing it, when
        it is still there: the other choices of an ``n`` > 1 request share the prompt's cached
        blocks there. Sending True (``asend``) instead of asking for the next batch ends the
        request where it is (a stop string showed up): its jobs are cancelled, and its tokens so
        far are its output's length, as if it had finished."""
        rid = req.request_id
        features, preq = plan or self.plan(req)
        queue = self._inbox.open(rid)
        run = _Run(req, preq, on_resident=on_resident)
        finished = stopped = False
        try:
            if placement is None and follow:
                placement = self._planner.follow(preq, follow, time.monotonic())
            if placement is None:
                placement = self.decide(req, preq)
                if placement is None:
                    raise PdorchError(ErrorCode.NO_WORKER, "no worker has room for the request")
            run.attempt = self._dispatch(run, preq, placement, 0)
            while True:
                attempt = run.attempt
                item = await self._next(run, attempt, queue)
                batch, failure = item if isinstance(item, tuple) else (None, item)
                if batch is not None:
                    if batch.finish_reason is not None:
                        self._finished(run, attempt)
                        # Before the yield: a consumer that has what it wants stops here and
                        # closes the stream, and nothing after the yield would run.
                        finished = True
                    stopped = bool((yield batch))
                    if finished or stopped:
                        return
                if failure is not None:
                    await self._recover(run, attempt, failure)
        finally:
            if run.timer is not None:
                run.timer.cancel()
            self._inbox.close(rid)
            if run.attempt is not None:
                if finished:
                    _resident(run, run.attempt.prefill)
                self._abandon(run, run.attempt)
                self._metrics.attempts.observe(run.attempt.number + 1)
            else:
                self.forget(req)
            if finished or stopped:
                self._planner.observe(features, len(run.tokens))
                self._metrics.output_length_error.observe(abs(len(run.tokens) - preq.predicted_output_len))

    def _finished(self, run: _Run, a: Attempt) -> None:
        # Tokens the attempt's decode side produced after its first (which came from prefill).
        decoded = len(run.tokens) - a.generated - 1
        self._planner.finished(a.job_id, time.monotonic(), decoded)

    async def _next(
        self, run: _Run, attempt: Attempt, queue: asyncio.Queue[Delivery]
    ) -> tuple[TokenBatch | None, Failure | None] | Failure:
        """The next batch for the client and/or failure of the attempt (waiting as long as allowed).

        A request has one timer, set no later than its deadline and moved only when the deadline
        comes closer: progress pushes the deadline back without touching the timer, which then goes
        off early, is seen to be early and is set again. (A timeout scope per wait armed and
        cancelled a timer for every batch of tokens.)"""
        while True:
            timeout, code, what = self._phase_timeout(run, attempt)
            phase_end = run.progress_at + timeout
            request_end = run.req.arrival + self._cfg.request_timeout_s
            if queue.empty():
                deadline = min(phase_end, request_end)
                now = time.monotonic()
                if now >= deadline - _TIMER_SLACK_S:
                    if request_end <= phase_end:
                        raise PdorchError(
                            ErrorCode.DEADLINE_EXCEEDED,
                            f"request did not finish within {self._cfg.request_timeout_s:g}s",
                        )
                    return Failure(attempt.progress_worker(), code, f"{what} within {timeout:g}s", "stalled")
                if deadline < run.timer_at:
                    # No later than the shortest phase timeout from now: a phase's deadline counts
                    # from the progress that began it, so the timer seldom has to come closer.
                    _set_timer(run, queue, min(deadline, now + self._shortest_timeout_s), now)
                worker_id, job_id, event = await queue.get()
            else:
                worker_id, job_id, event = queue.get_nowait()
            if isinstance(event, Wake) or job_id != attempt.job_id:
                continue  # the clock, or a message of an attempt that was abandoned since
            batch, failure = self._on_event(run, attempt, worker_id, event)
            if batch is not None or failure is not None:
                return batch, failure

    def _on_event(
        self,
        run: _Run,
        a: Attempt,
        worker_id: str,
        event: TokenOutput | KvLoaded | KvArriving | JobError | WorkerLost | KvBrokerLost | KvPathDown,
    ) -> tuple[TokenBatch | None, Failure | None]:
        if isinstance(event, TokenOutput):
            if a.split and worker_id == a.prefill and a.first_token_in:
                return None, None  # token 0 already came with KvLoaded
            if (gap := _gap(run, a, worker_id, event)) is not None:
                return None, gap
            if a.split and worker_id == a.prefill:
                self._first_token(run, a, event.cached_tokens)
                held, a.held = a.held, None
                batch = self._accept(run, a, worker_id, _joined(event, a.early))
                a.early.clear()
                # The prefill's token stands; a decode failure held for it counts only if the
                # request goes on (the decode side saw "prefill stopped" when it ended there).
                return batch, held if event.finish_reason is None else None
            if not a.first_token_in:
                if a.split:
                    a.early.append(event)  # decode ran ahead of the prefill's token (see KvLoaded)
                    return None, None
                self._first_token(run, a, event.cached_tokens)
            return self._accept(run, a, worker_id, event), None
        if isinstance(event, KvLoaded):
            self._kv_loaded(run, a)
            if not a.first_token_in and event.first_token >= 0 and not _prefill_reports(run.req):
                # The prefill worker's token is still on its way; decode's copy wins.
                self._first_token(run, a)
                return self._accept(run, a, worker_id, TokenOutput(a.job_id, [event.first_token])), None
            return None, None
        if isinstance(event, JobError):
            code = _code(event.code)
            if code in KV_PLANE_FAULTS:
                self._metrics.handoffs.labels(self._handoff_mode(a), str(code)).inc()
            return None, Failure(worker_id, code, f"worker {worker_id}: {event.message}", "error")
        if isinstance(event, KvArriving):
            if not a.kv_loaded:  # the handoff moves: its stall timeout counts from now
                run.progress_at = time.monotonic()
            return None, None
        if isinstance(event, KvPathDown):
            if a.kv_loaded or not self._another_way(run):
                return None, None
            where = _path_name(event.path)
            message = f"the KV path {where} backs off: a handoff over it did not land ({event.reason})"
            return None, Failure("", ErrorCode.KV_TIMEOUT, message, "path_down")
        if isinstance(event, KvBrokerLost):
            if a.kv_loaded:
                return None, None  # came after the KV landed: nothing of this attempt was lost
            return None, Failure("", ErrorCode.KV_TRUNCATED, f"the KV broker {event.reason}", "lost")
        return None, Failure(
            worker_id, ErrorCode.WORKER_LOST, f"worker {worker_id} was lost: {event.reason}", "lost"
        )

    def _accept(self, run: _Run, a: Attempt, worker_id: str, event: TokenOutput) -> TokenBatch:
        """Take an attempt's tokens as the request's (``worker_id``: who sent the last of them)."""
        run.tokens.extend(event.token_ids)
        self._progress(run)
        if worker_id == a.decode:
            prompt_len = len(run.req.prompt_token_ids)
            self._planner.grow(
                a.job_id, prompt_len + len(run.tokens), prompt_len + run.req.sampling.max_tokens
            )
        if event.finish_reason is not None:
            a.open.discard(worker_id)
        return TokenBatch(
            list(event.token_ids),
            event.finish_reason,
            event.cached_tokens,
            list(event.logprobs),
            list(event.prompt_logprobs),
        )

    def _progress(self, run: _Run) -> None:
        run.progress_at = time.monotonic()
        if run.lost_since is not None:
            self._metrics.migration_seconds.observe(run.progress_at - run.lost_since)
            run.lost_since = None

    def _first_token(self, run: _Run, a: Attempt, cached_tokens: int | None = None) -> None:
        a.first_token_in = True
        self._progress(run)
        if not a.split:
            _resident(run, a.prefill)
        # A prefill queue got shorter: a waiting request may fit now.
        self._planner.first_token(a.job_id, run.progress_at, cached_tokens)
        self._on_capacity()

    def _kv_loaded(self, run: _Run, a: Attempt) -> None:
        a.kv_loaded = True
        self._progress(run)
        _resident(run, a.decode)
        self._metrics.handoffs.labels(self._handoff_mode(a), "ok").inc()
        if a.kv_mode is KvMode.P2P:
            self._planner.ledger.kv_handoff_landed(a.prefill, a.decode, time.monotonic())
        if a.kv_mode is KvMode.CENTRALIZED:
            self.broker.succeeded()
        self._unlanded.pop(a.job_id, None)
        # The prefill side's part is over; its node no longer holds anything for this attempt.
        a.open.discard(a.prefill)
        self._inbox.stop_expecting(a.job_id, a.prefill)
        self._planner.kv_loaded(a.job_id, run.progress_at)
        self._on_capacity()

    def _phase_timeout(self, run: _Run, a: Attempt) -> tuple[float, ErrorCode, str]:
        """How long the attempt may go without progress now, and what it means if it does."""
        phase = a.phase
        if phase is Phase.PREFILL:
            return self._cfg.first_token_timeout_s, ErrorCode.DEADLINE_EXCEEDED, "no first token"
        if phase is Phase.HANDOFF:
            # Prefill has answered, so the KV is computed and on the wire: it must land soon.
            worker = self._cluster.get(a.decode)
            kv_bytes = (len(run.req.prompt_token_ids) + a.generated) * (
                worker.hello.kv_bytes_per_token if worker else 0
            )
            return (
                self._cfg.kv_handoff_timeout_s + kv_bytes / 1e9,
                ErrorCode.KV_TIMEOUT,
                "the KV handoff did not complete after prefill finished",
            )
        return self._cfg.token_timeout_s, ErrorCode.DEADLINE_EXCEEDED, "no next token"

    # ------------------------------------------------------------------ placing an attempt

    def _dispatch(self, run: _Run, preq: PlacementRequest, placement: Placement, number: int) -> Attempt:
        """Send the jobs of a new attempt, whose placement the planner has booked. A worker that
        cannot be reached is dropped by the control server, which delivers ``WorkerLost`` to this
        job like any other loss."""
        req = run.req
        generated = len(run.tokens)
        job_id = req.request_id if number == 0 else f"{req.request_id}.{number}"
        prompt = extend_token_ids(req.prompt_token_ids, run.tokens)
        sampling = req.sampling
        if generated and sampling.prompt_logprobs >= 0:  # the client has them from the first attempt
            sampling = msgspec.structs.replace(sampling, prompt_logprobs=-1)
        deadline = self._cfg.first_token_timeout_s
        p, d = placement.prefill, placement.decode
        run.preq = preq
        now = run.progress_at = time.monotonic()
        self._metrics.placements.labels(self._placement_kind(placement)).inc()
        if placement.colocated:
            a = run.attempt = Attempt(number, job_id, p, p, generated, now)
            self._expect(run, a, p)
            self._control.send(p, GenerateJob(job_id, prompt, sampling, deadline, generated, req.adapter))
            return a
        # The attempt is the request's from here: whatever fails below, the request's exit releases
        # its booking and cancels what was sent.
        a = run.attempt = Attempt(number, job_id, p, d, generated, now)
        self._expect(run, a, p)
        if req.sampling.max_tokens - generated == 1:
            # Prefill produces the only token left: nothing to hand off, nothing held on d.
            self._planner.release(job_id, now, d)
            a.decode = p
            self._control.send(
                p, PrefillJob(job_id, prompt, sampling, None, deadline, generated, req.adapter)
            )
            return a
        a.kv_mode = self._route_mode(d)
        self._unlanded[job_id] = a
        a.transfer_id = self._transfer_id(p)
        p_route, d_route = self._kv_routes(a.kv_mode, d, a.transfer_id)
        a.decode_tried.add(d)
        self._expect(run, a, d)
        # Decode first, so its receiver expects the transfer by the time prefill streams it.
        self._control.send(d, DecodeJob(job_id, prompt, sampling, d_route, deadline, generated, req.adapter))
        self._control.send(p, PrefillJob(job_id, prompt, sampling, p_route, deadline, generated, req.adapter))
        return a

    def _expect(self, run: _Run, a: Attempt, worker_id: str) -> None:
        self._inbox.expect(run.req.request_id, a.job_id, worker_id)
        a.open.add(worker_id)

    def _route_mode(self, decode_worker: str) -> KvMode:
        """Through the broker in centralized mode while it works; peer to peer otherwise."""
        if self._cfg.kv_mode is KvMode.CENTRALIZED and (
            self.broker.usable() or not self._kv_endpoint(decode_worker)
        ):
            return KvMode.CENTRALIZED
        return KvMode.P2P

    def _placement_kind(self, placement: Placement) -> str:
        if not placement.colocated:
            return "split"
        worker = self._cluster.get(placement.prefill)
        return str(worker.hello.role) if worker is not None else "unknown"

    def _handoff_mode(self, a: Attempt) -> str:
        return str(a.kv_mode or self._cfg.kv_mode)

    def _kv_endpoint(self, worker_id: str) -> str:
        worker = self._cluster.get(worker_id)
        return worker.hello.kv_endpoint if worker is not None else ""

    def _transfer_id(self, prefill_worker: str) -> str:
        """In the sending worker's scope (``<its key name>/``): KV servers take a transfer only from
        a peer authenticated under that name."""
        worker = self._cluster.get(prefill_worker)
        scope = worker.key_name if worker is not None else ""
        random = os.urandom(16).hex()
        return f"{scope}/{random}" if scope else random

    def _kv_routes(self, mode: KvMode, decode_worker: str, transfer_id: str) -> tuple[KvRoute, KvRoute]:
        """(route for the prefill side, route for the decode side), each naming the key of the
        server it reaches."""
        if mode is KvMode.CENTRALIZED:
            r = KvRoute(KvMode.CENTRALIZED, self._cfg.kv_broker, transfer_id, self._kv_broker_key)
            return r, r
        worker = self._cluster.get(decode_worker)
        endpoint = worker.hello.kv_endpoint if worker is not None else ""
        if worker is None or not endpoint:
            raise PdorchError(ErrorCode.NO_WORKER, f"decode worker {decode_worker} advertises no KV endpoint")
        return (
            KvRoute(KvMode.P2P, endpoint, transfer_id, worker.public_key),
            KvRoute(KvMode.P2P, "", transfer_id),
        )

    # ------------------------------------------------------------------ failures

    async def _recover(self, run: _Run, a: Attempt, failure: Failure) -> None:
        decision = recovery(failure, a)
        if decision is Recovery.HOLD:
            a.held = failure
            return
        phase = a.phase
        if (
            a.kv_mode is KvMode.CENTRALIZED
            and phase is not Phase.DECODE
            and (failure.code in KV_PLANE_FAULTS or (failure.kind == "stalled" and phase is Phase.HANDOFF))
        ):
            self.broker.failed(failure.message, a.started_at)
        if kv_path_failed(failure, a):
            self._back_off_kv_path(a, failure)
        if decision is not Recovery.GIVE_UP and a.number + 1 >= self._cfg.max_attempts:
            decision = Recovery.GIVE_UP
        self._metrics.migrations.labels(str(phase), failure.kind, str(decision)).inc()
        if decision is Recovery.GIVE_UP:
            raise PdorchError(failure.code, failure.message)
        log.warning(
            "request %s (%s phase, %d tokens out): %s; %s",
            run.req.request_id,
            phase,
            len(run.tokens),
            failure.message,
            "another decode worker takes the KV" if decision is Recovery.NEW_DECODE else "resuming elsewhere",
        )
        if failure.code is ErrorCode.KV_BUSY and a.split:
            # The decode side turned the KV away for lack of room: it is congested, not the
            # prefill worker that reported it. Leave it out of decode for a while (every request).
            node = self._planner.ledger.node(a.decode)
            if node is not None:
                node.kv_busy(time.monotonic(), KV_BUSY_S)
            run.avoid.add(a.decode)
        elif failure.worker_id and not failure.worker_gone:
            run.avoid.add(failure.worker_id)
        if run.lost_since is None:
            run.lost_since = run.progress_at
        if decision is Recovery.NEW_DECODE and self._new_decode(run, a, failure):
            return
        self._abandon(run, a)
        run.attempt = None
        _, preq = self._plan(
            run.req,
            f"{run.req.request_id}.{a.number + 1}",
            extend_token_ids(run.req.prompt_token_ids, run.tokens),
            run.req.sampling.max_tokens - len(run.tokens),
            resumed=True,
        )
        run.attempt = self._dispatch(run, preq, await self._place(run, preq), a.number + 1)

    def _back_off_kv_path(self, a: Attempt, failure: Failure) -> None:
        for backed_off, seconds in self._planner.ledger.kv_handoff_failed(
            a.prefill, a.decode, time.monotonic(), a.started_at, self._cfg.kv_path_backoff_s, KV_PATH_MAX_S
        ):
            pair = len(backed_off) == 2
            self._metrics.kv_path_backoffs.labels("pair" if pair else "worker").inc()
            why = f"one did not land ({failure.message})" if pair else "those with two peers did not land"
            log.warning("no handoff %s for %gs: %s", _path_name(backed_off), seconds, why)
            # The handoffs still on their way over it are as good as lost: their requests move on
            # now rather than each waiting out its own timeout (see ``_another_way``).
            for job_id, other in list(self._unlanded.items()):
                if other is not a and other.kv_mode is KvMode.P2P and _over(backed_off, other):
                    self._inbox.notify(job_id, KvPathDown(backed_off, failure.message))

    def _another_way(self, run: _Run) -> bool:
        """Whether placement now finds the request a way over no KV path that backs off. With none,
        it probes one (its own, say) again: moving the request there would only start its wait
        over and throw the prefill's work away."""
        now = time.monotonic()
        try:
            placement = self._planner.place(run.preq, now, arrived_at=run.req.arrival)
        except PdorchError:  # no room anywhere yet (or shed): the handoff under way is the best hope
            return False
        return placement.colocated or not self._planner.ledger.kv_path_backs_off(
            placement.prefill, placement.decode, now
        )

    async def _place(self, run: _Run, preq: PlacementRequest) -> Placement:
        """Where to move the request (one decision, booked); waits (bounded) while no worker has room."""
        end = min(time.monotonic() + self._cfg.queue_timeout_s, run.req.arrival + self._cfg.request_timeout_s)
        while True:
            for exclude in (frozenset(run.avoid), frozenset()) if run.avoid else (frozenset(),):
                placement = self._planner.decide(
                    preq, time.monotonic(), arrived_at=run.req.arrival, exclude=exclude
                )
                if placement is not None:
                    return placement
            if time.monotonic() >= end:
                raise PdorchError(ErrorCode.NO_WORKER, "no worker has room to move the request to")
            await asyncio.sleep(_PLACE_RETRY_S)

    def _new_decode(self, run: _Run, a: Attempt, failure: Failure) -> bool:
        """Centralized: the broker keeps the KV, so another decode worker fetches the same transfer
        (same job id). False if there is none to take it."""
        try:
            placement = self._planner.place(
                run.preq,
                time.monotonic(),
                arrived_at=run.req.arrival,
                exclude=frozenset(a.decode_tried | run.avoid),
            )
        except PdorchError as e:
            if e.code is not ErrorCode.NO_WORKER:
                raise
            return False
        d = placement.decode
        if d == a.prefill or d in a.decode_tried:
            return False
        old = a.decode
        self._release_worker(a, old, cancel=not failure.worker_gone)
        a.decode = d
        a.decode_tried.add(d)
        a.held = None
        self._planner.book_decode(a.job_id, d, placement.reserve_blocks, run.preq)
        self._expect(run, a, d)
        _, d_route = self._kv_routes(KvMode.CENTRALIZED, d, a.transfer_id)
        prompt = extend_token_ids(run.req.prompt_token_ids, run.tokens[: a.generated])
        job = DecodeJob(
            a.job_id,
            prompt,
            run.req.sampling,
            d_route,
            self._cfg.first_token_timeout_s,
            a.generated,
            run.req.adapter,
        )
        self._control.send(d, job)
        return True

    def _release_worker(self, a: Attempt, worker_id: str, *, cancel: bool) -> None:
        self._planner.release(a.job_id, time.monotonic(), worker_id)
        self._inbox.stop_expecting(a.job_id, worker_id)
        if worker_id in a.open:
            a.open.discard(worker_id)
            if cancel:
                self._control.send(worker_id, Cancel(a.job_id))

    def _abandon(self, run: _Run, a: Attempt) -> None:
        """Unreserve everywhere and cancel whatever may still run for the attempt."""
        self._inbox.forget_job(a.job_id)
        self._unlanded.pop(a.job_id, None)
        # Released before the Cancels go out: a Cancel that finds its worker gone drops it, and
        # this job must not be reported lost again.
        open_workers = list(a.open)
        a.open.clear()
        now = time.monotonic()
        for wid in a.decode_tried:
            self._planner.release(a.job_id, now, wid)
        self._planner.release(a.job_id, now)
        for wid in open_workers:
            self._control.send(wid, Cancel(a.job_id))
        self._on_capacity()


def _path_name(path: tuple[str, ...]) -> str:
    """A KV path as the logs name it: "from P to D" for a pair, "to or from W" for a worker."""
    return "from {} to {}".format(*path) if len(path) == 2 else f"to or from {path[0]}"


def _over(path: tuple[str, ...], a: Attempt) -> bool:
    """Whether the attempt's handoff takes ``path``: a pair, or any pair with that one worker."""
    return (a.prefill, a.decode) == path if len(path) == 2 else path[0] in (a.prefill, a.decode)


def _set_timer(run: _Run, queue: asyncio.Queue[Delivery], at: float, now: float) -> None:
    if run.timer is not None:
        run.timer.cancel()
    run.timer = asyncio.get_running_loop().call_later(at - now, _wake, run, queue)
    run.timer_at = at


def _wake(run: _Run, queue: asyncio.Queue[Delivery]) -> None:
    run.timer, run.timer_at = None, math.inf
    queue.put_nowait(("", "", _WAKE))


_WAKE = Wake()


def _resident(run: _Run, worker_id: str) -> None:
    if run.on_resident is not None:
        tell, run.on_resident = run.on_resident, None
        tell(worker_id)


def _prefill_reports(req: GenerationRequest) -> bool:
    """Only the prefill worker's message has what the client asked for with token 0 (its
    logprobs, the prompt's): decode's copy of the token (``KvLoaded``) cannot stand in for it."""
    return req.sampling.logprobs >= 0 or req.sampling.prompt_logprobs >= 0


def _gap(run: _Run, a: Attempt, worker_id: str, event: TokenOutput) -> Failure | None:
    """A failure if ``event``'s tokens are not the next ones: a message before it was lost (the
    request resumes from the tokens it has, with no gap)."""
    if a.split and worker_id != a.prefill and not a.first_token_in:  # decode ahead of token 0
        expected = a.generated + 1 + sum(len(m.token_ids) for m in a.early)
    else:
        expected = len(run.tokens)
    if event.index < 0 or event.index == expected:
        return None
    return Failure(
        worker_id,
        ErrorCode.BAD_MESSAGE,
        f"worker {worker_id} sent tokens from output index {event.index} where {expected} came next",
        "error",
    )


def _joined(first: TokenOutput, later: list[TokenOutput]) -> TokenOutput:
    """The prefill's token followed by what the decode side sent before it arrived."""
    if not later:
        return first
    return TokenOutput(
        first.request_id,
        [t for m in (first, *later) for t in m.token_ids],
        later[-1].finish_reason,
        first.cached_tokens,
        [lp for m in (first, *later) for lp in m.logprobs],
        first.prompt_logprobs,
    )


def _code(raw: str) -> ErrorCode:
    try:
        return ErrorCode(raw)
    except ValueError:
        return ErrorCode.JOB_FAILED
