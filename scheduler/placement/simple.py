"""A simple load-aware placement: least-loaded prefill node, decode node with most free blocks.

Stands in until the plugin framework lands; it implements the same ``place`` signature.
"""

from __future__ import annotations

from scheduler.placement.types import ClusterSnapshot, NodeView, Placement, PlacementRequest
from transport.errors import ErrorCode, PdorchError


def blocks_needed(tokens: int, block_size: int) -> int:
    return -(-tokens // max(1, block_size))


def _eligible(snapshot: ClusterSnapshot, req: PlacementRequest) -> list[NodeView]:
    return [n for n in snapshot.nodes if n.model == req.model and not n.draining]


def place(snapshot: ClusterSnapshot, req: PlacementRequest) -> Placement:
    nodes = _eligible(snapshot, req)
    total = req.prompt_len + (req.predicted_output_len or req.max_tokens)
    if req.colocated:
        both = [n for n in nodes if n.can_prefill and n.can_decode]
        if not both:
            raise PdorchError(ErrorCode.NO_WORKER, f"no worker can serve {req.model!r} colocated")
        node = max(both, key=lambda n: (n.blocks_free, -n.inflight, n.worker_id))
        return Placement(node.worker_id, node.worker_id, blocks_needed(total, node.block_size))
    prefill = [n for n in nodes if n.role == "prefill"] or [n for n in nodes if n.can_prefill]
    decode = [n for n in nodes if n.role == "decode"] or [n for n in nodes if n.can_decode]
    if not prefill:
        raise PdorchError(ErrorCode.NO_WORKER, f"no prefill worker for model {req.model!r}")
    if not decode:
        raise PdorchError(ErrorCode.NO_WORKER, f"no decode worker for model {req.model!r}")
    p = min(prefill, key=lambda n: (n.queued_prefill_tokens, n.inflight, n.worker_id))
    # Prefer a decode node other than the prefill node, so the two jobs really split.
    others = [n for n in decode if n.worker_id != p.worker_id] or decode
    d = max(others, key=lambda n: (n.blocks_free, -n.inflight, n.worker_id))
    return Placement(p.worker_id, d.worker_id, blocks_needed(total, d.block_size))
