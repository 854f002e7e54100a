"""A node as placement sees it: what the worker reports, what the ledger booked, the learnt models.

The live scheduler (a worker's ``Hello`` and last ``Load``) and the simulator (a simulated engine's,
in the same messages) both build placement's :class:`~scheduler.placement.types.NodeView` with
:func:`node_view`, so they show placement the same things computed the same way:

* occupancy = blocks the worker reports used + the ledger's reservations not yet backed by them;
* the prefill queue = the larger of what the worker reports and what the ledger sent and has not
  had answered (the report lags; the ledger does not see progress), and ``prefill_wait_s``, the
  learnt prefill time of the prompts the ledger has queued there less what the head has run, or of
  the tokens the worker reports queued if that is more;
* the decode batch and its prompt tokens as booked, the prompt tokens per second the node has
  lately been prefilling, and the tightest member's tolerance: for each request booked to decode
  there with a TPOT objective, the time its objective allows for the steps it has decoded and
  will decode, less the time those it has decoded took (counted from the node's decode
  observations: every stall and slow step is in it), its handoff, the rest at the current step
  time, and the prefill time of the prompts still queued there. A member already past saving is not
  protected;
* LoRA adapters: the slots and resident adapters the worker reports, plus the adapters of requests
  booked there (resident soon: the report lags, and a burst for a new adapter should follow its
  first request), and those of requests prefilling or decoding there (in use: not evictable).

The parts that depend only on the ledger and the models are cached on the node's ledger until
either changes.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from scheduler.ledger.node_ledger import NodeLedger
from scheduler.placement.config import AcceleratorProfile
from scheduler.placement.latency_model import LatencyTable, class_latency, decode_x, prefill_x, work_x
from scheduler.placement.types import NodeView
from transport.messages import Hello, Load

# Prompt length at which a node's prefill throughput is quoted (for the plugins that use a rate).
RATE_PROMPT_TOKENS = 2048


class NodeState(NamedTuple):
    hello: Hello
    load: Load
    draining: bool = False


class _Derived(NamedTuple):
    key: tuple[int, int]
    queued_s: float  # learnt prefill time of every prompt queued there
    head_start: float  # when the head of that queue could start (-inf: nothing queued)
    rate: float
    tolerance_s: float
    tolerance_steps: int
    tolerance_tpot_s: float
    adapters_booked: frozenset[str]
    adapters_in_use: frozenset[str]


def kv_refusing(load: Load, ledger: NodeLedger, now: float) -> bool:
    """Its KV endpoint turns handoffs away: the worker says so, or a handoff to it was (kv_busy)."""
    return load.kv_refusing or now < ledger.kv_busy_until


def node_view(
    state: NodeState,
    ledger: NodeLedger,
    latency: LatencyTable,
    accelerators: dict[str, AcceleratorProfile],
    now: float,
) -> NodeView:
    hello, load = state.hello, state.load
    d = _derived(ledger, latency, accelerators)
    timed = bool(ledger.pending)  # only the prefill backlog moves with time
    refusing = kv_refusing(load, ledger, now)
    unreachable = ledger.kv_path.open(now)
    unreachable_from = ledger.kv_unreachable_from(now)
    key = (d, load, state.draining, refusing, unreachable, unreachable_from, now if timed else None)
    last = ledger.last_view
    if last is not None and last[0][0] is d and last[0][1] is load and last[0][2:] == key[2:]:
        return last[1]
    wait = max(0.0, d.queued_s - max(0.0, now - d.head_start)) if ledger.pending else 0.0
    if load.queued_prefill_tokens and d.rate > 0:
        # Work the worker reports queued that this scheduler did not send (or a fresher count).
        wait = max(wait, load.queued_prefill_tokens / d.rate)
    tolerance = d.tolerance_s - wait if d.tolerance_steps else math.inf
    view = NodeView(
        worker_id=hello.worker_id,
        role=hello.role,
        model=hello.model,
        accelerator=hello.accelerator,
        draining=state.draining,
        block_size=hello.block_size,
        kv_bytes_per_token=hello.kv_bytes_per_token,
        blocks_total=load.blocks_total or hello.capacity_blocks,
        blocks_used=load.blocks_used,
        blocks_reserved=ledger.reserved_blocks,
        running=load.running,
        waiting=load.waiting,
        queued_prefill_tokens=max(load.queued_prefill_tokens, ledger.pending_tokens),
        inflight=len(ledger.held),
        kv_refusing=refusing,
        kv_unreachable=unreachable,
        kv_unreachable_from=unreachable_from,
        takes_handoff=bool(hello.kv_endpoint),
        prefill_tokens_per_s=d.rate,
        cached_block_hashes=ledger.prefixes.view(),
        prefill_wait_s=wait,
        decode_batch=len(ledger.members),
        decode_context_tokens=ledger.booked_tokens,
        stall_tolerance_s=tolerance,
        tolerance_steps=d.tolerance_steps,
        tolerance_tpot_s=d.tolerance_tpot_s,
        prefilling_tokens_per_s=ledger.prefilling_tokens_per_s,
        adapter_slots=load.adapter_slots,
        adapters_resident=d.adapters_booked.union(load.adapters_resident)
        if load.adapter_slots
        else frozenset(),
        adapters_in_use=d.adapters_in_use if load.adapter_slots else frozenset(),
    )
    ledger.last_view = (key, view)
    return view


def _derived(
    ledger: NodeLedger, latency: LatencyTable, accelerators: dict[str, AcceleratorProfile]
) -> _Derived:
    key = (ledger.version, latency.version)
    cached = ledger.view_cache
    if isinstance(cached, _Derived) and cached.key == key:
        return cached
    models = class_latency(latency, ledger.model, ledger.accelerator, accelerators, ledger.worker_id)
    batch, context = len(ledger.members), ledger.booked_tokens
    queued = models.prefill.predict(work_x(ledger.pending_work, batch, context)) if ledger.pending else 0.0
    head_start = -math.inf
    if ledger.pending:
        head_start = max(next(iter(ledger.pending.values())).sent_at, ledger.last_departure)
    per_prompt = models.prefill.predict(prefill_x(RATE_PROMPT_TOKENS, 0, batch, context))
    rate = RATE_PROMPT_TOKENS / per_prompt if per_prompt > 0 else 0.0
    step = models.decode.predict(decode_x(batch, context)) if batch else 0.0
    tolerance, steps, tpot = ledger.tightest_member(step)
    derived = _Derived(
        key,
        queued,
        head_start,
        rate,
        tolerance,
        steps,
        tpot,
        ledger.adapters_booked(),
        ledger.adapters_in_use(),
    )
    ledger.view_cache = derived
    return derived
