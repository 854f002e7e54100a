"""The three kinds of placement plugin and helpers to turn raw signals into scores in [0, 1].

A plugin is a small object built from its params Struct by the registry. It reads the candidates and
the :class:`~scheduler.placement.context.RequestContext`, and never does I/O or reads a clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from scheduler.placement.context import RequestContext
from scheduler.placement.types import NodeView


class Filter(Protocol):
    def filter(self, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[NodeView]: ...


class Scorer(Protocol):
    def score(self, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[float]:
        """One score in [0, 1] per node, higher is better. The profile supplies the weight."""
        ...


class Picker(Protocol):
    def pick(self, ctx: RequestContext, nodes: Sequence[NodeView], scores: Sequence[float]) -> NodeView:
        """Choose one of ``nodes`` (non-empty) given their weighted total ``scores``."""
        ...


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
