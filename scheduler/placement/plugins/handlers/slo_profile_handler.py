"""The SLO profile handler: choose the (prefill node, decode node) pair jointly on predicted latencies.

The candidates are every pair the profiles' filters allow: a prefill node and another decode node
(split, with a KV handoff), or one node doing both (a decode node prefilling locally, a "both"
node, and a prefill node with room for the reservation when ``fallback_to_prefill_node``). For each
the :class:`~scheduler.placement.slo_estimate.Estimator` predicts the request's TTFT, its own TPOT
and what it does to the requests already decoding on the nodes it uses, from latency models learnt
from the cluster.

Each pool does its own phase first. The candidates come in three tiers: split (each pool its
phase), then a decode node prefilling too (the decode pool lends prefill capacity), then a prefill
node decoding too (the prefill pool lends decode capacity): the whole request, or one that the
best other prefill node prefills and hands over (to a node with a KV endpoint); the node that
prefills must have no prompt queued, the one only decoding at most the late-binding bound unless
it decodes already. The first tier holding a candidate predicted to meet every
objective wins, and in it the candidate with the most headroom (ties: the larger sum of headrooms,
then the profiles' scorers, then a draw seeded by the request); in the third, a node already lent
comes first (lending another would chunk its prefills too). Headroom alone would take whichever
node is idlest now, and a node lent to the other phase slows its own (a prefill node that decodes
prefills slower for every later request, which no one request's prediction shows); the tiers lend
a node only when its own pool cannot meet the objectives.
``tiers: false`` drops the tiers (most headroom wherever it is; for comparison).

When no candidate is predicted to meet them ("the best candidate" below is the one with the most
headroom in the first tier that has any: no node is lent to the other phase for a late request):

* a request that could not meet them even on an idle cluster is placed on the best candidate (no
  amount of waiting or capacity would help it; it is served, late);
* a request whose TTFT objective can no longer be met anywhere is shed (``QUEUE_FULL``; with
  ``shed: false`` it is placed on the best candidate instead): waiting only makes it later, and
  running it would take capacity from requests that can still make it;
* otherwise it waits (``NO_WORKER``): the admission queue retries it as capacity frees.

A ``best_effort`` request (one that is already streaming and moves after a worker failure) goes to
the best candidate with room whatever its prediction. Without any objective (none configured, none
in the request's headers), every candidate meets them: the split pair with the lowest predicted
latency is taken. Split candidates are scored for the best prefill node of each accelerator class
only (the handoff depends on the pair of classes, the rest on each node), so a decision costs time
linear in the number of nodes.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Sequence

import msgspec

from scheduler.placement.context import Pool, RequestContext
from scheduler.placement.latency_model import LatencyTable
from scheduler.placement.plugin import Decider, Profiles
from scheduler.placement.slo_estimate import Estimator, Option
from scheduler.placement.types import NodeView, Placement
from transport.errors import ErrorCode, PdorchError
from transport.messages import Role

# Candidates whose headroom and sum differ by less than this are tied.
_TIE = 1e-9


class Tier(enum.IntEnum):
    SPLIT = 0  # prefill on a prefill node, decode on a decode node
    DECODE_NODE_PREFILLS = 1  # a decode (or "both") node does the whole request
    PREFILL_NODE_DECODES = 2  # a prefill node does the whole request


class SloProfileHandlerParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Refuse a request whose TTFT objective can no longer be met (false: place it anyway, late).
    shed: bool = True
    # Consider a decode node prefilling the request itself (no KV handoff).
    colocate: bool = True
    # Lend a node to the other phase only when its own pool cannot meet the objectives.
    tiers: bool = True
    # Late binding (with tiers): a candidate whose prefill node has more than this many seconds of
    # prefill queued does not count as meeting the objectives, so the request waits in the admission
    # queue (earliest deadline first) instead of in that node's FIFO. 0: off.
    max_prefill_wait_s: float = 0.5


class SloProfileHandler:
    # A placement off the first tier, a wait or a shed says the sample's pools were short of room.
    samples = True

    def __init__(self, params: SloProfileHandlerParams) -> None:
        self.params = params

    def place(
        self, profiles: Profiles, ctx: RequestContext, nodes: Sequence[NodeView], latency: LatencyTable
    ) -> Placement:
        est = Estimator(ctx, latency)
        decode = profiles.candidates(Pool.DECODE, ctx, nodes)
        prefill = () if ctx.request.colocated else profiles.candidates(Pool.PREFILL, ctx, nodes)
        # Every candidate, tier by tier; stop at the first tier with one meeting every objective.
        tiers: list[list[Option]] = []
        for tier in Tier:
            tiers.append(self._options(tier, profiles, ctx, est, prefill, decode, kv_paths=True))
            if self.params.tiers:
                meeting = [o for o in tiers[-1] if o.headroom >= 0 and self._bound(tier, o)]
                if tier is Tier.PREFILL_NODE_DECODES:
                    best = _fewest_lent(meeting)
                else:
                    # Spare the requests lent a prefill node's decode capacity where that costs nothing.
                    best = _best(profiles, ctx, [o for o in meeting if o.lent_ok] or meeting)
                if best is not None:
                    return _placed(ctx, best)
        if not any(tiers):
            # Nothing left but handoffs over KV paths that back off: those are tried (the failure
            # may have passed; the handoff is the probe) rather than the request turned away.
            tiers[Tier.SPLIT] = self._options(Tier.SPLIT, profiles, ctx, est, prefill, decode)
            meeting = [o for o in tiers[Tier.SPLIT] if o.headroom >= 0 and self._bound(Tier.SPLIT, o)]
            best = _best(profiles, ctx, meeting) if self.params.tiers else None
            if best is not None:
                return _placed(ctx, best)
        options = [o for tier_options in tiers for o in tier_options]
        if not self.params.tiers:
            meeting = [o for o in options if o.headroom >= 0]
            best = _best(profiles, ctx, [o for o in meeting if o.lent_ok] or meeting)
            if best is not None:
                return _placed(ctx, best)
        req = ctx.request
        # Served late, if at all: the best of the first tier with any candidate (lend no node for it).
        best = next((_best(profiles, ctx, t) for t in tiers if t), None) if self.params.tiers else None
        best = best or _best(profiles, ctx, options)
        if best is None:
            if not req.best_effort and self._deadline_passed(ctx):
                raise _shed(f"it waited {req.waited_s:.2f}s for room")
            raise PdorchError(ErrorCode.NO_WORKER, f"no worker for model {req.model!r} has room for it")
        if req.best_effort or not _feasible_when_idle(ctx, nodes, latency, self.params.colocate):
            return _placed(ctx, best)
        ttft = min(o.ttft_s for o in options)
        if req.ttft_slo_s > 0 and ttft > req.ttft_slo_s:
            if not self.params.shed:
                return _placed(ctx, best)
            raise _shed(f"its first token is predicted at {ttft:.2f}s > {req.ttft_slo_s:.2f}s")
        raise PdorchError(ErrorCode.NO_WORKER, "no candidate meets the request's objectives yet; waiting")

    def decode_prefills(self, decider: Decider) -> bool:
        return self.params.colocate

    def _bound(self, tier: Tier, o: Option) -> bool:
        if tier is Tier.PREFILL_NODE_DECODES:
            # The node that prefills has nothing queued: a node lent to decoding prefills every
            # prompt behind more slowly, a cost no one request's prediction shows. A node that only
            # decodes a request handed to it may have prompts queued if it decodes already (they
            # are chunked already; one more request adds only its share of each iteration) or if
            # they are within the late-binding bound (chunking them costs that little at most; with
            # late binding off, 0: nothing queued).
            if o.prefill.prefill_wait_s > 0:
                return False
            lent = o.decode
            return (
                lent.worker_id == o.prefill.worker_id
                or lent.decode_batch > 0
                or lent.prefill_wait_s <= self.params.max_prefill_wait_s
            )
        wait = self.params.max_prefill_wait_s
        return wait <= 0 or o.prefill.prefill_wait_s <= wait

    def _deadline_passed(self, ctx: RequestContext) -> bool:
        slo = ctx.request.ttft_slo_s
        return self.params.shed and slo > 0 and ctx.request.waited_s >= slo

    def _options(
        self,
        tier: Tier,
        profiles: Profiles,
        ctx: RequestContext,
        est: Estimator,
        prefill: Sequence[NodeView],
        decode: Sequence[NodeView],
        *,
        kv_paths: bool = False,
    ) -> list[Option]:
        """The candidates of one tier (a colocated deployment has only decode nodes doing both).
        ``kv_paths``: no handoff over a KV path that is backing off (``NodeView.takes_kv_from``)."""
        if tier is Tier.DECODE_NODE_PREFILLS:
            return [est.option(d, d) for d in decode] if self.params.colocate or ctx.request.colocated else []
        if tier is Tier.PREFILL_NODE_DECODES:
            if not ctx.config.fallback_to_prefill_node:
                return []
            lendable = [p for p in prefill if p.role is Role.PREFILL and ctx.has_room(p)]
            # The request whole on a lent node, or prefilled on the best other prefill node and
            # handed off to the lent one, which then only decodes it.
            hosts = [q for q in lendable if q.takes_handoff and not (kv_paths and q.kv_unreachable)]
            top = heapq.nlargest(2, prefill, key=est.prefill_rank) if hosts else []
            options = [est.option(p, p) for p in lendable]
            for q in hosts:
                p = next(
                    (p for p in top if p.worker_id != q.worker_id and (not kv_paths or q.takes_kv_from(p))),
                    None,
                )
                if p is not None:
                    options.append(est.option(p, q))
            return options
        if not prefill:
            return []
        # The best prefill node of each class: headroom, then the prefill profile's scorers.
        scores = profiles.scores(Pool.PREFILL, ctx, prefill) if len(prefill) > 1 else [0.0]
        ranked = [((*est.prefill_rank(p), score), p) for p, score in zip(prefill, scores, strict=True)]
        best = _best_of_each_class(ranked)
        # Most decisions see no KV path backing off: then nothing is checked pair by pair.
        kv_paths = kv_paths and (
            any(p.kv_unreachable for p in prefill) or any(d.kv_unreachable_from for d in decode)
        )
        options = []
        for d in decode:
            senders = best
            if kv_paths and any(not d.takes_kv_from(p) for _, p in best):
                senders = _best_of_each_class([(r, p) for r, p in ranked if d.takes_kv_from(p)])
            options += [est.option(p, d) for _, p in senders if p.worker_id != d.worker_id]
        return options


def _best_of_each_class(
    ranked: list[tuple[tuple[bool, float, float, float], NodeView]],
) -> list[tuple[tuple[bool, float, float, float], NodeView]]:
    by_class: dict[str, tuple[tuple[bool, float, float, float], NodeView]] = {}
    for rank, p in ranked:
        held = by_class.get(p.accelerator)
        if held is None or rank > held[0]:
            by_class[p.accelerator] = (rank, p)
    return list(by_class.values())


def _placed(ctx: RequestContext, o: Option) -> Placement:
    return ctx.placement(o.prefill, o.decode, ttft_s=o.ttft_s, tpot_s=o.tpot_s)


def _fewest_lent(options: list[Option]) -> Option | None:
    """Of the candidates that lend a prefill node to decoding, one whose node already decodes,
    then the most headroom: a prefill node decoding anything prefills every prompt in chunks, each
    paying an iteration's fixed cost (Sarathi-Serve's piggybacking), however few it decodes, so
    lending one more node costs more than adding to one already lent."""
    return max(options, key=lambda o: (o.decode.decode_batch > 0, o.headroom, o.total), default=None)


def _best(profiles: Profiles, ctx: RequestContext, options: list[Option]) -> Option | None:
    if not options:
        return None
    top = max(options, key=lambda o: (o.headroom, o.total))
    tied = [o for o in options if top.headroom - o.headroom <= _TIE and top.total - o.total <= _TIE]
    if len(tied) == 1:
        return tied[0]
    # Predictions do not tell them apart (e.g. idle nodes, nothing learnt yet): the profiles' scorers.
    decode = profiles.scores(Pool.DECODE, ctx, [o.decode for o in tied])
    prefill = profiles.scores(Pool.PREFILL, ctx, [o.prefill for o in tied])
    totals = [
        d + (p if o.prefill.worker_id != o.decode.worker_id else 0.0)
        for o, d, p in zip(tied, decode, prefill, strict=True)
    ]
    best = max(totals)
    tied = [o for o, t in zip(tied, totals, strict=True) if t >= best - _TIE]
    return tied[0] if len(tied) == 1 else ctx.rng("slo").choice(tied)


def _feasible_when_idle(
    ctx: RequestContext, nodes: Sequence[NodeView], latency: LatencyTable, colocate: bool
) -> bool:
    """Could any pair of node classes meet the request's objectives if they were idle?"""
    idle: dict[tuple[Role, str], NodeView] = {}
    for n in nodes:
        idle.setdefault(
            (n.role, n.accelerator),
            msgspec.structs.replace(
                n,
                # A name no node has: judged on the class's typical node, not on this one's own
                # speed (a straggler listed first would make the whole class look infeasible).
                worker_id=f"idle {n.role.value} {n.accelerator}",
                prefill_wait_s=0.0,
                decode_batch=0,
                decode_context_tokens=0,
                tolerance_steps=0,
                prefilling_tokens_per_s=0.0,
            ),
        )
    est = Estimator(ctx, latency, waited_s=0.0, margins=False)
    prefills = [n for n in idle.values() if n.can_prefill]
    decodes = [n for n in idle.values() if n.role in (Role.DECODE, Role.BOTH)]
    for d in decodes:
        if colocate and est.option(d, d).headroom >= 0:
            return True
        if any(est.option(p, d).headroom >= 0 for p in prefills if p.worker_id != d.worker_id):
            return True
    allowed = ctx.config.fallback_to_prefill_node
    return allowed and any(est.option(p, p).headroom >= 0 for p in prefills if p.role is Role.PREFILL)


def _shed(why: str) -> PdorchError:
    return PdorchError(ErrorCode.QUEUE_FULL, f"request cannot meet its TTFT objective: {why}; retry later")
