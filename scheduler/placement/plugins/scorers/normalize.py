"""Turning a raw per-node signal into scores in [0, 1], for scorers."""

from __future__ import annotations

from collections.abc import Sequence


def lower_is_better(values: Sequence[float]) -> list[float]:
    """Min-max normalisation: the lowest value scores 1, the highest 0; all equal -> all 1."""
    lo, hi = min(values), max(values)
    if hi <= lo:
        return [1.0] * len(values)
    span = hi - lo
    return [(hi - v) / span for v in values]


def ratio_to_best(costs: Sequence[float]) -> list[float]:
    """best / cost for non-negative costs: keeps proportions (twice the cost -> half the score)."""
    best = min(costs)
    if best <= 0:
        return [1.0 if c <= 0 else 0.0 for c in costs]
    return [best / c for c in costs]


def share_of_max(values: Sequence[float]) -> list[float]:
    top = max(values)
    if top <= 0:
        return [0.0] * len(values)
    return [max(0.0, v) / top for v in values]
