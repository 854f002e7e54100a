"""Predicted latencies of one request's candidate placements, and the headroom each leaves.

For the request placed with its prefill on node P and its decode on node D (P == D: colocated):

* **TTFT** = what it has already waited + P's prefill backlog (``prefill_wait_s``) + its own prefill
  on P (its uncached tokens there, slowed by P's decode batch if P decodes too).
* **its own TPOT** = D's decode step with it added, plus what delays its decode once it has its
  first token: the KV handoff P -> D and the local prefills still queued on D when it joins, spread
  over its predicted decode steps (the median predicted output length, less the first token).
* **the requests already decoding**: on D its arrival lengthens every step (and, colocated, its
  own prefill stalls them); on P, when split, its prefill stalls whatever decodes there. Each node
  reports its tightest decoding request's tolerance (``stall_tolerance_s`` over
  ``tolerance_steps``); the headroom is what is left of it.

A headroom is ``1 - predicted / objective`` (or the tolerance left over what it was allowed), so
objectives of different sizes compare; >= 0 means the objective is predicted to be met. The
latency models come from the snapshot (learnt online outside placement); a node class not seen yet
uses the prior of :mod:`scheduler.placement.latency_model`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from scheduler.placement.adapter_cost import load_delay_s
from scheduler.placement.context import RequestContext
from scheduler.placement.kv_budget import quantile_from
from scheduler.placement.latency_model import (
    ClassLatency,
    LatencyTable,
    LinearModel,
    class_key,
    class_latency,
    handoff_x,
    link_key,
    prefill_x,
    prior_handoff,
    step_s,
)
from scheduler.placement.types import NodeView, PlacementRequest
from transport.messages import Role

_PRIOR_HANDOFF = prior_handoff()


class Option(NamedTuple):
    """One candidate placement and how it is predicted to do."""

    prefill: NodeView
    decode: NodeView
    headroom: float  # the smallest headroom over every objective it touches (>= 0: all met)
    total: float  # sum of those headrooms (breaks ties), or minus the latency without objectives
    ttft_s: float
    tpot_s: float  # its own, over its median predicted output
    # Split on a prefill node: its prefill leaves the requests lent that node's decode capacity
    # within their TPOT (they are not among the objectives: see ``Estimator.prefill_stall``).
    lent_ok: bool = True


def decode_steps(req: PlacementRequest, level: float = 0.5) -> int:
    """Tokens the request is predicted to decode after its first, at quantile ``level`` of its
    predicted output length (the median by default)."""
    out = quantile_from(req.predicted_output_quantiles, level) or req.predicted_output_len or req.max_tokens
    return max(0, out - 1)


class Estimator:
    """Predictions for one request, memoised per node for one decision."""

    def __init__(
        self,
        ctx: RequestContext,
        table: LatencyTable,
        *,
        waited_s: float | None = None,
        margins: bool = True,
    ) -> None:
        """``margins``: judge TPOT against the objective less the learnt margin of the decode
        node's class (off: against the objective itself)."""
        self.ctx = ctx
        self.margins = margins
        self.req = ctx.request
        self.table = table
        self.waited_s = self.req.waited_s if waited_s is None else waited_s
        self.steps = decode_steps(self.req)
        # The handoff's cost per token is judged at the short end of the predicted output, as the KV
        # reservation is sized at its long end: the same central range of the distribution.
        self.short_steps = max(1, decode_steps(self.req, 1.0 - ctx.config.reservation.output_quantile))
        self._classes: dict[str, ClassLatency] = {}
        self._service: dict[str, float] = {}
        self._steps: dict[str, tuple[float, float]] = {}
        self._handoffs: dict[tuple[str, str], float] = {}

    # ------------------------------------------------------------------ models

    def _class(self, node: NodeView) -> ClassLatency:
        """The node's models: its class's, scaled by its own speed where that has been learnt."""
        key = node.worker_id if node.worker_id in self.table.nodes else node.accelerator
        found = self._classes.get(key)
        if found is None:
            found = class_latency(
                self.table, node.model, node.accelerator, self.ctx.config.accelerators, node.worker_id
            )
            self._classes[key] = found
        return found

    def _handoff_model(self, p: NodeView, d: NodeView) -> LinearModel:
        return self.table.handoffs.get(link_key(p.model, p.accelerator, d.accelerator), _PRIOR_HANDOFF)

    # ------------------------------------------------------------------ predictions

    def service_s(self, node: NodeView) -> float:
        """This request's own prefill on ``node``, once it starts."""
        hit = self._service.get(node.worker_id)
        if hit is None:
            ctx = self.ctx
            x = prefill_x(
                ctx.uncached_tokens(node),
                ctx.cached_tokens(node),
                node.decode_batch,
                node.decode_context_tokens,
            )
            hit = self._service[node.worker_id] = self._class(node).prefill.predict(x)
        return hit

    def ttft_s(self, node: NodeView) -> float:
        return self.waited_s + node.prefill_wait_s + self.service_s(node) + self.adapter_load_s(node)

    def tpot_margin(self, d: NodeView) -> float:
        """The share of the TPOT objective kept in reserve on ``d``'s class (learnt: latency.py)."""
        if not self.margins:
            return 0.0
        return self.table.tpot_margin.get(class_key(d.model, d.accelerator), 0.0)

    def adapter_load_s(self, node: NodeView) -> float:
        """Loading the request's LoRA adapter on ``node`` first (0: resident, or none)."""
        return load_delay_s(node, self.req.adapter, self.ctx.config.accelerators, self.table)

    def step_s(self, node: NodeView, *, with_request: bool) -> float:
        """One decode step on ``node`` now, or once this request has joined its batch."""
        steps = self._steps.get(node.worker_id)
        if steps is None:
            model, rate = self._class(node).decode, node.prefilling_tokens_per_s
            batch, context = node.decode_batch, node.decode_context_tokens
            now = step_s(model, batch, context, rate)
            after = step_s(model, batch + 1, context + self.req.prompt_len, rate)
            steps = self._steps[node.worker_id] = (now, after)
        return steps[1] if with_request else steps[0]

    def handoff_s(self, p: NodeView, d: NodeView) -> float:
        if p.worker_id == d.worker_id:
            return 0.0
        key = (p.accelerator, d.accelerator)
        hit = self._handoffs.get(key)
        if hit is None:
            x = handoff_x(self.req.prompt_len * d.kv_bytes_per_token)
            hit = self._handoffs[key] = self._handoff_model(p, d).predict(x)
        return hit

    def own_tpot_s(self, p: NodeView, d: NodeView) -> float:
        if self.steps < 1:
            return 0.0  # a one-token answer has no time per output token
        step = self.step_s(d, with_request=True)
        if p.worker_id == d.worker_id:
            return step
        handoff = self.handoff_s(p, d)
        # D's local prefills still queued when this request joins will stall it.
        joins_in = p.prefill_wait_s + self.service_s(p) + handoff
        # D loads the adapter before its first step if it lacks it (colocated, TTFT has it).
        first = handoff + max(0.0, d.prefill_wait_s - joins_in) + self.adapter_load_s(d)
        return step + first / self.short_steps

    @staticmethod
    def members_headroom(node: NodeView, added_step_s: float, stall_s: float) -> float:
        """Headroom left to ``node``'s tightest decoding request (inf: none has an objective)."""
        steps = node.tolerance_steps
        if steps <= 0 or node.tolerance_tpot_s <= 0:
            return math.inf
        left = node.stall_tolerance_s - steps * added_step_s - stall_s
        return left / (steps * node.tolerance_tpot_s)

    # ------------------------------------------------------------------ candidates

    def prefill_stall(self, p: NodeView) -> tuple[float, bool]:
        """What prefilling on ``p`` leaves to the requests decoding there: as a headroom among the
        objectives (inf: none decodes with one), and whether it spares them. On a prefill node it is
        no objective: those requests were lent its decode capacity (the last tier), and prefills
        come first there, or one of them close to its TPOT would stop every prefill on the node
        until it ends; sparing them only ranks the candidates that meet the objectives."""
        headroom = self.members_headroom(p, 0.0, self.service_s(p))
        if p.role is Role.PREFILL:
            return math.inf, headroom >= 0
        return headroom, True

    def prefill_rank(self, p: NodeView) -> tuple[bool, float, float]:
        """How good ``p`` is as a remote prefill node (TTFT and what decodes on p), comparable:
        meeting the objectives and sparing the lent requests first."""
        hs = []
        if self.req.ttft_slo_s > 0:
            hs.append(1.0 - self.ttft_s(p) / self.req.ttft_slo_s)
        on_p, spared = self.prefill_stall(p)
        if on_p != math.inf:
            hs.append(on_p)
        if not hs:
            return (spared, 0.0, -self.ttft_s(p))
        return (min(hs) >= 0 and spared, min(hs), sum(hs))

    def option(self, p: NodeView, d: NodeView) -> Option:
        req = self.req
        colocated = p.worker_id == d.worker_id
        ttft = self.ttft_s(p)
        own = self.own_tpot_s(p, d)
        hs: list[float] = []
        if req.ttft_slo_s > 0:
            hs.append(1.0 - ttft / req.ttft_slo_s)
        if req.tpot_slo_s > 0 and self.steps >= 1:
            hs.append(1.0 - own / (req.tpot_slo_s * (1.0 - self.tpot_margin(d))))
        added = self.step_s(d, with_request=True) - self.step_s(d, with_request=False)
        on_d = self.members_headroom(d, added, self.service_s(d) if colocated else 0.0)
        if on_d != math.inf:
            hs.append(on_d)
        lent_ok = True
        if not colocated:
            on_p, lent_ok = self.prefill_stall(p)
            if on_p != math.inf:
                hs.append(on_p)
        typical = self.typical_tpot_s(p, d, own)
        if not hs:
            # No objective anywhere: the fastest end to end.
            return Option(p, d, 0.0, -(ttft + self.steps * typical), ttft, typical, lent_ok)
        return Option(p, d, min(hs), sum(hs), ttft, typical, lent_ok)

    def typical_tpot_s(self, p: NodeView, d: NodeView, own: float) -> float:
        """Its own TPOT with the handoff spread over its median output, not the short end."""
        if self.steps < 1 or self.short_steps >= self.steps:
            return own
        step = self.step_s(d, with_request=True)
        return step + (own - step) * self.short_steps / self.steps
