"""Whether and where to prefill remotely, given the decode pick (conditional disaggregation).

The decode profile runs first (its node must hold the request's KV reservation). Then, by mode:

* ``always``: prefill on the prefill profile's pick (llm-d's P/D profile with threshold 0).
* ``never``: prefill on the decode node itself (colocated serving).
* ``threshold``: prefill locally when the decode node would have to compute at most
  ``threshold_tokens`` uncached prompt tokens (llm-d's prefix-based decider).
* ``conditional``: prefill locally when that is cheap (at most ``threshold_tokens`` uncached) or
  clearly faster: the decode node's estimated prefill time (its queue plus the uncached tokens at its
  rate, times ``local_slowdown`` for sharing the GPU with its decode batch) is below ``local_speedup``
  times the remote estimate (best prefill node's queue and uncached tokens, plus the KV transfer).
  Prompts with more than ``local_max_uncached_tokens`` uncached tokens always go remote. When the
  prefill pool is empty or filtered out (e.g. every backlog is too long) the decode node prefills,
  unless its own backlog exceeds ``local_max_wait_s``: then NO_WORKER, and the request waits in
  admission for a queue to drain. With ``tpot_target_s`` set, a request whose KV transfer alone,
  spread over its predicted output (``short_output_quantile``), would take more than
  ``short_output_share`` of the TPOT target (a long prompt, a short answer) runs colocated on the
  prefill node instead, if that node has room for its reservation.

When no decode node qualifies (no KV room anywhere), the request runs colocated on a node that can
prefill and has room for the whole reservation ("both" nodes, and "prefill" nodes when
``fallback_to_prefill_node``); otherwise NO_WORKER, and the caller's admission queue waits for room.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from scheduler.placement.config import DeciderMode, PlacementConfig
from scheduler.placement.context import Pool, RequestContext
from scheduler.placement.kv_budget import quantile_from
from scheduler.placement.prefill_backlog import backlog_ok
from scheduler.placement.prefill_cost import kv_transfer_s
from scheduler.placement.types import NodeView, Placement
from transport.errors import ErrorCode, PdorchError

Select = Callable[[Pool, RequestContext, Sequence[NodeView]], NodeView | None]


def validate_decider(config: PlacementConfig) -> None:
    d = config.decider
    problems = []
    if d.threshold_tokens < 0:
        problems.append(f"threshold_tokens must be >= 0, got {d.threshold_tokens}")
    if d.local_max_uncached_tokens < 0:
        problems.append(f"local_max_uncached_tokens must be >= 0, got {d.local_max_uncached_tokens}")
    if not d.local_speedup > 0:
        problems.append(f"local_speedup must be > 0, got {d.local_speedup}")
    if not d.local_slowdown >= 1:
        problems.append(f"local_slowdown must be >= 1, got {d.local_slowdown}")
    if d.kv_link_gbytes_per_s < 0:
        problems.append(f"kv_link_gbytes_per_s must be >= 0, got {d.kv_link_gbytes_per_s}")
    if d.local_max_wait_s < 0 or d.local_max_wait_relative < 0:
        problems.append("local_max_wait_s and local_max_wait_relative must be >= 0")
    if d.tpot_target_s < 0 or d.short_output_share <= 0 or not 0 < d.short_output_quantile < 1:
        problems.append("need tpot_target_s >= 0, short_output_share > 0, 0 < short_output_quantile < 1")
    r = config.reservation
    if not 0.0 < r.output_quantile < 1.0:
        problems.append(f"reservation.output_quantile must be in (0, 1), got {r.output_quantile}")
    if r.regrow_factor < 0 or r.min_output_tokens < 0:
        problems.append("reservation.regrow_factor and min_output_tokens must be >= 0")
    if problems:
        raise PdorchError(ErrorCode.CONFIG, "placement.decider: " + "; ".join(problems))


def decide(select: Select, ctx: RequestContext, nodes: Sequence[NodeView]) -> Placement:
    mode = ctx.config.decider.mode
    if ctx.request.colocated:
        mode = DeciderMode.NEVER
    decode = select(Pool.DECODE, ctx, nodes)
    if decode is None:
        return _fallback(select, ctx, nodes)
    local = Placement(decode.worker_id, decode.worker_id, ctx.reserve_blocks(decode))
    if mode is DeciderMode.NEVER:
        return local
    if mode is DeciderMode.THRESHOLD and ctx.uncached_tokens(decode) <= ctx.config.decider.threshold_tokens:
        return local
    if mode is DeciderMode.CONDITIONAL and ctx.uncached_tokens(decode) <= ctx.config.decider.threshold_tokens:
        return local
    prefill = select(Pool.PREFILL, ctx, [n for n in nodes if n.worker_id != decode.worker_id])
    if prefill is None:
        if mode is DeciderMode.ALWAYS and not decode.can_prefill:
            raise PdorchError(ErrorCode.NO_WORKER, f"no prefill worker for model {ctx.request.model!r}")
        d = ctx.config.decider
        gated = d.local_max_wait_s > 0 or d.local_max_wait_relative > 0
        if (
            mode is DeciderMode.CONDITIONAL
            and gated
            and not backlog_ok(ctx, decode, d.local_max_wait_s, d.local_max_wait_relative)
        ):
            raise PdorchError(ErrorCode.NO_WORKER, "every prefill queue is full; wait for one to drain")
        return local
    if mode is DeciderMode.CONDITIONAL:
        if _local_is_better(ctx, decode, prefill):
            return local
        if _handoff_too_slow(ctx, decode) and prefill.blocks_free >= ctx.reserve_blocks(prefill):
            return Placement(prefill.worker_id, prefill.worker_id, ctx.reserve_blocks(prefill))
    return Placement(prefill.worker_id, decode.worker_id, ctx.reserve_blocks(decode))


def _handoff_too_slow(ctx: RequestContext, decode: NodeView) -> bool:
    """Would the KV transfer alone, over the predicted output, eat the TPOT budget?"""
    d = ctx.config.decider
    if d.tpot_target_s <= 0 or not ctx.request.predicted_output_quantiles:
        return False
    out = quantile_from(ctx.request.predicted_output_quantiles, d.short_output_quantile)
    link = kv_transfer_s(ctx.request.prompt_len, decode.kv_bytes_per_token, d.kv_link_gbytes_per_s)
    return link / max(1, out - 1) > d.short_output_share * d.tpot_target_s


def _local_is_better(ctx: RequestContext, decode: NodeView, prefill: NodeView) -> bool:
    d = ctx.config.decider
    if ctx.uncached_tokens(decode) > d.local_max_uncached_tokens:
        return False
    link = kv_transfer_s(ctx.request.prompt_len, decode.kv_bytes_per_token, d.kv_link_gbytes_per_s)
    remote = ctx.prefill_delay_s(prefill) + link
    local = ctx.prefill_delay_s(decode) * d.local_slowdown
    return local < d.local_speedup * remote


def _fallback(select: Select, ctx: RequestContext, nodes: Sequence[NodeView]) -> Placement:
    ctx.fallback = True
    try:
        node = select(Pool.DECODE, ctx, nodes)
    finally:
        ctx.fallback = False
    if node is None:
        raise PdorchError(
            ErrorCode.NO_WORKER, f"no decode worker for model {ctx.request.model!r} has room for the request"
        )
    return Placement(node.worker_id, node.worker_id, ctx.reserve_blocks(node))
