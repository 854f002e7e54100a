"""Conditional disaggregation: prefill remotely only when that is estimated to be faster.

After the decode pick D:

1. Prefill on D when at most ``threshold_tokens`` of the prompt are uncached there, or when D's
   estimate (its prefill queue and the uncached tokens at its rate, times ``local_slowdown`` for
   sharing the GPU with its decode batch) is below ``local_speedup`` times the remote one (the best
   prefill node's queue and uncached tokens, plus the KV transfer). Prompts with more than
   ``local_max_uncached_tokens`` uncached tokens on D always go remote.
2. With ``tpot_target_s`` set: a request whose KV transfer alone, spread over its predicted output
   (``short_output_quantile``), would take more than ``short_output_share`` of the TPOT target (a
   long prompt, a short answer) runs colocated on the prefill node, if it has room for the reservation.
3. Otherwise prefill on the prefill node P, decode on D.
4. When the prefill pool has no candidate (e.g. every backlog is too long), D prefills, unless its
   own backlog exceeds ``local_max_wait_s`` (or ``local_max_wait_relative`` x its own work): then
   NO_WORKER, and the request waits in admission for a queue to drain (late binding).
"""

from __future__ import annotations

import msgspec

from scheduler.placement.context import RequestContext
from scheduler.placement.kv_budget import quantile_from
from scheduler.placement.plugin import PickPrefill
from scheduler.placement.prefill_backlog import backlog_ok
from scheduler.placement.prefill_cost import kv_transfer_s
from scheduler.placement.types import NodeView, Placement
from transport.errors import ErrorCode, PdorchError


class ConditionalDeciderParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # Always prefill this few uncached tokens on the decode node.
    threshold_tokens: int = 256
    # Never prefill more uncached tokens than this on a decode node (protects its TPOT).
    local_max_uncached_tokens: int = 65536
    # Prefill locally only when it is estimated at least this much faster (ratio < 1).
    local_speedup: float = 0.8
    # A decode node's own prefill counts as slower by this factor (it shares the GPU with the decode
    # batch, which it also slows down).
    local_slowdown: float = 1.5
    # KV link speed used to estimate the handoff's cost (bytes / bandwidth).
    kv_link_gbytes_per_s: float = 25.0
    # With the prefill pool filtered out, the decode node prefills only if its own prefill backlog is
    # at most this (seconds; 0 = no limit) ...
    local_max_wait_s: float = 0.0
    # ... or this times its own uncached prefill time there.
    local_max_wait_relative: float = 0.0
    # The time per output token the deployment aims for (0 = never keep a request on its prefill node).
    tpot_target_s: float = 0.0
    short_output_share: float = 0.2
    # Which quantile of the predicted output length that judgement uses.
    short_output_quantile: float = 0.5


def _problems(p: ConditionalDeciderParams) -> list[str]:
    out = []
    if p.threshold_tokens < 0:
        out.append(f"threshold_tokens must be >= 0, got {p.threshold_tokens}")
    if p.local_max_uncached_tokens < 0:
        out.append(f"local_max_uncached_tokens must be >= 0, got {p.local_max_uncached_tokens}")
    if not p.local_speedup > 0:
        out.append(f"local_speedup must be > 0, got {p.local_speedup}")
    if not p.local_slowdown >= 1:
        out.append(f"local_slowdown must be >= 1, got {p.local_slowdown}")
    if p.kv_link_gbytes_per_s < 0:
        out.append(f"kv_link_gbytes_per_s must be >= 0, got {p.kv_link_gbytes_per_s}")
    if p.local_max_wait_s < 0 or p.local_max_wait_relative < 0:
        out.append("local_max_wait_s and local_max_wait_relative must be >= 0")
    if p.tpot_target_s < 0 or p.short_output_share <= 0 or not 0 < p.short_output_quantile < 1:
        out.append("need tpot_target_s >= 0, short_output_share > 0, 0 < short_output_quantile < 1")
    return out


class ConditionalDecider:
    prefills_on_decode = True

    def __init__(self, params: ConditionalDeciderParams) -> None:
        problems = _problems(params)
        if problems:
            raise ValueError("; ".join(problems))
        self.params = params

    def decide(self, ctx: RequestContext, decode: NodeView, pick_prefill: PickPrefill) -> Placement:
        p = self.params
        if ctx.uncached_tokens(decode) <= p.threshold_tokens:
            return ctx.placement(decode, decode)
        prefill = pick_prefill()
        if prefill is None:
            gated = p.local_max_wait_s > 0 or p.local_max_wait_relative > 0
            if gated and not backlog_ok(ctx, decode, p.local_max_wait_s, p.local_max_wait_relative):
                raise PdorchError(ErrorCode.NO_WORKER, "every prefill queue is full; wait for one to drain")
            return ctx.placement(decode, decode)
        if self._local_is_better(ctx, decode, prefill):
            return ctx.placement(decode, decode)
        if self._handoff_too_slow(ctx, decode) and ctx.has_room(prefill):
            return ctx.placement(prefill, prefill)
        return ctx.placement(prefill, decode)

    def _local_is_better(self, ctx: RequestContext, decode: NodeView, prefill: NodeView) -> bool:
        p = self.params
        if ctx.uncached_tokens(decode) > p.local_max_uncached_tokens:
            return False
        link = kv_transfer_s(ctx.request.prompt_len, decode.kv_bytes_per_token, p.kv_link_gbytes_per_s)
        remote = ctx.prefill_delay_s(prefill) + link
        local = ctx.prefill_delay_s(decode) * p.local_slowdown
        return local < p.local_speedup * remote

    def _handoff_too_slow(self, ctx: RequestContext, decode: NodeView) -> bool:
        """Would the KV transfer alone, over the predicted output, eat the TPOT budget?"""
        p = self.params
        if p.tpot_target_s <= 0 or not ctx.request.predicted_output_quantiles:
            return False
        out = quantile_from(ctx.request.predicted_output_quantiles, p.short_output_quantile)
        link = kv_transfer_s(ctx.request.prompt_len, decode.kv_bytes_per_token, p.kv_link_gbytes_per_s)
        return link / max(1, out - 1) > p.short_output_share * p.tpot_target_s
