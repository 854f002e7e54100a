"""How many KV blocks a request should reserve on its decode node, and how the reservation grows.

Reserve = the request's predicted footprint, (prompt + predicted output) tokens rounded up to blocks.
Placement sees a node's occupancy as used + reserved, where ``blocks_reserved`` is the part of the
reservations not yet backed by used blocks (see :func:`outstanding_blocks`), so a request is not
counted twice. When a request outgrows its reservation, :func:`regrow` gives the new one; the live
flow and the simulator both call it.
"""

from __future__ import annotations

import itertools

from scheduler.placement.config import ReservationConfig, ReservationMode
from scheduler.placement.types import PlacementRequest


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-max(0, tokens) // max(1, block_size))


def quantile_from(quantiles: tuple[tuple[float, int], ...], level: float) -> int:
    """Linear interpolation in a (level, tokens) table; clamps outside its range."""
    if not quantiles:
        return 0
    if level <= quantiles[0][0]:
        return quantiles[0][1]
    for (q0, v0), (q1, v1) in itertools.pairwise(quantiles):
        if level <= q1:
            w = (level - q0) / (q1 - q0) if q1 > q0 else 1.0
            return round(v0 + w * (v1 - v0))
    return quantiles[-1][1]


def predicted_output_tokens(req: PlacementRequest, cfg: ReservationConfig) -> int:
    """Output tokens to plan for: the configured quantile, else the point prediction, else max_tokens."""
    if cfg.mode is ReservationMode.PROMPT:
        return 0
    if cfg.mode is ReservationMode.MAX_TOKENS:
        return req.max_tokens
    guess = quantile_from(req.predicted_output_quantiles, cfg.output_quantile)
    if guess <= 0:
        guess = req.predicted_output_len or req.max_tokens
    guess = max(guess, cfg.min_output_tokens)
    return min(guess, req.max_tokens) if req.max_tokens > 0 else guess


def regrow(
    current_reserved_blocks: int,
    tokens_so_far: int,
    block_size: int,
    *,
    max_total_tokens: int = 0,
    factor: float = 0.5,
) -> int:
    """The reservation (blocks) for a request holding ``tokens_so_far`` tokens (prompt + generated).

    Unchanged while the request fits; once it reaches its reservation, grows to
    ``tokens_so_far * (1 + factor)`` (at least one more block), capped at ``max_total_tokens`` (prompt +
    max_tokens) when given. Never shrinks.
    """
    used = blocks_for(tokens_so_far, block_size)
    if used < current_reserved_blocks:
        return current_reserved_blocks
    target = max(used + 1, blocks_for(int(tokens_so_far * (1.0 + factor)), block_size))
    if max_total_tokens > 0:
        target = min(target, max(used, blocks_for(max_total_tokens, block_size)))
    return max(current_reserved_blocks, target)


def outstanding_blocks(reserved_blocks: int, tokens_so_far: int, block_size: int) -> int:
    """The part of a reservation not yet backed by used blocks (what goes into ``blocks_reserved``)."""
    return max(0, reserved_blocks - blocks_for(tokens_so_far, block_size))
