"""The kinds of placement plugin: every interface in one small file (as in the Gateway API
Inference Extension's ``plugins.go``).

A plugin is a small object built by the registry from its params Struct. It reads the candidates and
the :class:`~scheduler.placement.context.RequestContext`, and never does I/O or reads a clock. Each
kind lives in its own folder under ``plugins/``; the registry types every plugin by its protocol.
Filters, scorers and a picker make a profile; a decider turns the decode profile's pick into a
:class:`~scheduler.placement.types.Placement`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from scheduler.placement.context import RequestContext
from scheduler.placement.types import NodeView, Placement

# Runs the prefill profile over every node but the decode pick; None when its filters leave nothing.
PickPrefill = Callable[[], NodeView | None]


@runtime_checkable
class Filter(Protocol):
    def filter(self, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[NodeView]:
        """The candidates that may serve the request (a subset of ``nodes``, in order)."""
        ...


@runtime_checkable
class Scorer(Protocol):
    def score(self, ctx: RequestContext, nodes: Sequence[NodeView]) -> list[float]:
        """One score in [0, 1] per node, higher is better. The profile supplies the weight."""
        ...


@runtime_checkable
class Picker(Protocol):
    def pick(self, ctx: RequestContext, nodes: Sequence[NodeView], scores: Sequence[float]) -> NodeView:
        """Choose one of ``nodes`` (non-empty) given their weighted total ``scores``."""
        ...


@runtime_checkable
class Decider(Protocol):
    def decide(self, ctx: RequestContext, decode: NodeView, pick_prefill: PickPrefill) -> Placement:
        """Whether and where to prefill, given the decode profile's pick (llm-d's P/D decider).

        ``pick_prefill`` runs the prefill profile only when called. Raising ``PdorchError(NO_WORKER)``
        makes the request wait in admission.
        """
        ...
