"""What placement sees and what it decides: plain immutable values, no I/O.

The live scheduler builds a :class:`ClusterSnapshot` from its registry; the simulator builds one
from its virtual cluster. Both hand it, with a :class:`PlacementRequest`, to the same placement
code, which returns a :class:`Placement`.
"""

from __future__ import annotations

import math
from collections.abc import Set as AbstractSet

import msgspec

from scheduler.placement.latency_model import LatencyTable
from transport.messages import Role


class NodeView(msgspec.Struct, frozen=True, gc=False):
    """One worker as placement sees it at one instant."""

    worker_id: str
    role: Role
    model: str
    accelerator: str = "cpu"
    draining: bool = False
    block_size: int = 16
    kv_bytes_per_token: int = 0
    blocks_total: int = 0
    blocks_used: int = 0  # as last reported by the worker
    blocks_reserved: int = 0  # held by the scheduler for in-flight requests' predicted growth
    running: int = 0
    waiting: int = 0
    queued_prefill_tokens: int = 0  # reported by the worker plus sent by us and not yet prefilled
    inflight: int = 0  # requests the scheduler has on this node
    kv_refusing: bool = False  # its KV endpoint turns transfers away for lack of room (for now)
    # Its KV network is taken as down, both ways, for now (handoffs with two or more peers lately
    # did not land); and the nodes whose handoffs to it lately did not land (one pair failing).
    kv_unreachable: bool = False
    kv_unreachable_from: frozenset[str] = frozenset()
    # It can take a KV handoff (it has a KV endpoint): a prefill node that can is lendable to
    # decoding a request prefilled on another node, not only one it prefills itself.
    takes_handoff: bool = False
    prefill_tokens_per_s: float = 0.0  # 0 = unknown
    # Hashes of prompt prefix blocks this node is believed to hold (prefix affinity): a read-only
    # set as of this instant (the live scheduler's is a frozenset; the simulator's a checked view).
    cached_block_hashes: AbstractSet[int] = frozenset()
    # What the scheduler's ledger and its learnt latency models say about the node (see
    # scheduler/node_view.py): seconds before a prefill sent now would start here; the requests
    # decoding here or on their way (booked) and their prompt tokens; and the tightest of them: the
    # extra delay (s) it can still absorb at the current step time and keep its TPOT objective,
    # spread over how many decode steps, and that objective (inf / 0 / 0: none has one); and the
    # prompt tokens per second it has lately been prefilling (its decode steps share its time).
    prefill_wait_s: float = 0.0
    decode_batch: int = 0
    decode_context_tokens: int = 0
    stall_tolerance_s: float = math.inf
    tolerance_steps: int = 0
    tolerance_tpot_s: float = 0.0
    prefilling_tokens_per_s: float = 0.0
    # LoRA: how many adapters the engine holds at once (0 = unknown or none: no load cost assumed);
    # the adapters it holds or will hold soon (reported resident, plus those of requests booked
    # here: a burst for a new adapter follows its first request); and those a request booked here
    # is using (queued prefill or decoding), which the engine will not evict.
    adapter_slots: int = 0
    adapters_resident: frozenset[str] = frozenset()
    adapters_in_use: frozenset[str] = frozenset()

    @property
    def can_prefill(self) -> bool:
        return self.role in (Role.PREFILL, Role.BOTH)

    def takes_kv_from(self, prefill: NodeView) -> bool:
        """A handoff from ``prefill`` to this node is expected to land (neither the sender's KV
        network nor the pair is backing off; this node's own is the health filter's)."""
        return not prefill.kv_unreachable and prefill.worker_id not in self.kv_unreachable_from

    @property
    def blocks_free(self) -> int:
        return max(0, self.blocks_total - self.blocks_used - self.blocks_reserved)


class ClusterSnapshot(msgspec.Struct, frozen=True, gc=False):
    nodes: tuple[NodeView, ...]
    # The latency models learnt so far (per node class), frozen for this decision.
    latency: LatencyTable = LatencyTable()


class PlacementRequest(msgspec.Struct, frozen=True, gc=False):
    request_id: str
    model: str
    prompt_len: int
    max_tokens: int
    tenant: str = ""
    priority: int = 0
    # Hashes of the prompt's full prefix blocks, chained (block i's hash covers blocks 0..i).
    block_hashes: tuple[int, ...] = ()
    predicted_output_len: int = 0  # 0 = no prediction; placement falls back to max_tokens
    # True when the deployment runs colocated (one 'both' worker does prefill and decode).
    colocated: bool = False
    # Tokens covered by one entry of block_hashes (0 = the node's block_size).
    prefix_block_tokens: int = 0
    # The output-length predictor's distribution, (quantile level, tokens) ascending; placement
    # picks the configured quantile from it (and falls back to predicted_output_len, then max_tokens).
    predicted_output_quantiles: tuple[tuple[float, int], ...] = ()
    # The LoRA adapter the request runs with ("" = the base model): only nodes serving it qualify.
    adapter: str = ""
    # The request's objectives (from config or its headers; 0 = none): time to first token, counted
    # from its arrival, and mean time per output token after the first.
    ttft_slo_s: float = 0.0
    tpot_slo_s: float = 0.0
    # Seconds since the request arrived, when this decision is taken (its TTFT has used that much).
    waited_s: float = 0.0
    # Place it even where its objectives will be missed (a request that is already streaming and
    # moves after a worker failure must go somewhere); never shed.
    best_effort: bool = False
    # The request's other choices (``n`` - 1): they decode beside it once its prompt's KV is on its
    # decode node, so that node needs room for them too.
    followers: int = 0


class Placement(msgspec.Struct, frozen=True, gc=False):
    """Where a request runs. ``prefill == decode`` means colocated on one node (no KV handoff)."""

    prefill: str
    decode: str
    reserve_blocks: int = 0  # KV blocks to reserve on the decode node (Reserve)
    # What the deciding handler predicted for the request there (0 = no prediction).
    predicted_ttft_s: float = 0.0
    predicted_tpot_s: float = 0.0

    @property
    def colocated(self) -> bool:
        return self.prefill == self.decode
